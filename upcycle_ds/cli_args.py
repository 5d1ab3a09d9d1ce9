"""argparse from kw_only dataclasses: one flag per field (`--num-experts`), the field's docstring is its --help.

A field without a default is a required flag. `X | None` takes an X (default None: the flag's text says what not
giving it means); `bool` becomes `--flag/--no-flag`; `list[X]` takes one or more values; `Literal[...]` gives
choices. --help shows the subcommand's description as written (line breaks, examples) and each default once: as
`(default: X)` unless the field's text already states it. A field's `metadata={"aliases": [...]}` adds old flag
spellings and `metadata={"value_aliases": {old: new}}` old values, both accepted (flags, --config) but not shown.
Every parser also takes `--config FILE.yaml`, whose keys (field names) become defaults that flags override; its
values are type-checked against the fields (one error line naming the field); `--print-config` prints the resolved
settings as such a YAML and exits; `--verbose` lets the libraries' own messages through (`library_logs`).
`--config env:UPCYCLE_DS_...` reads the YAML from that environment variable instead (how `upcycle-ds train --nproc
N` hands the run's settings to its ranks: no shared file another launch could overwrite). Every float, from a flag
or the YAML file, must be finite.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import textwrap
import types
import typing
from pathlib import Path

from .errors import UserError


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the litgpt/torchtitan convention), for every class in the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_STATES_DEFAULT = re.compile(r"\(default|\bdefault:|\(None\b|\bby default\b", re.IGNORECASE)
"""A field text that already says what its default is: `(default: ...)`, `default: ...`, `(None = ...)`, `off by
default`; --help then adds no `(default: X)` of its own."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags (init fields not starting with `_` and not in the class's `NOT_FLAGS`: a
    subclass's inherited fields that do not apply to it), the required ones first (so the usage line starts with
    what must be given). A field not offered as a flag keeps its default, and a --config file may still set it
    (how a launcher hands every setting to its ranks)."""
    hidden = getattr(cls, "NOT_FLAGS", frozenset())
    fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_") and f.name not in hidden]
    return sorted(fields, key=lambda f: not (f.default is dataclasses.MISSING
                                             and f.default_factory is dataclasses.MISSING))


def default_shown(doc: str, default, is_bool: bool) -> str:
    """` (default: X)` for --help, or "" when `doc` already states the default or there is none to show (None, an
    empty list: not given)."""
    if _STATES_DEFAULT.search(doc) or default is None or default in ([], {}, ()):
        return ""
    return f" (default: {('on' if default else 'off') if is_bool else default})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in cli_fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        flag = _flag(f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = docs.get(f.name, "")
        if not required:
            help_ += default_shown(help_, default, tp is bool)
        kw: dict = {"dest": f.name, "help": help_.replace("%", "%%") or None}
        if required:
            kw["required"] = True  # old spellings are rewritten to this flag before parsing (`_canonical_argv`)
        else:
            kw["default"] = default
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            old = f.metadata.get("value_aliases", {})
            kw["type"] = _with_value_aliases(type(kw["choices"][0]), old)
        elif origin in (list, tuple):
            inner = typing.get_args(tp)
            fixed = origin is tuple and len(inner) > 1 and inner[-1] is not Ellipsis
            kw["nargs"] = len(inner) if fixed else "+"
            kw["type"] = _scalar(inner[0])
        else:
            kw["type"] = _scalar(tp)
            kw["metavar"] = f.name.upper()
        parser.add_argument(flag, **kw)


def _with_value_aliases(convert, old: dict):
    """argparse `type` of a choices flag: an old value becomes its new spelling before the choices are checked."""
    if not old:
        return convert

    def parse(text: str):
        return convert(old.get(text, text))

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def _canonical_argv(cls, argv: list[str]) -> list[str]:
    """argv with each old flag spelling (a field's `aliases`) replaced by the field's flag, so argparse sees one
    flag (a required one stays required and shows as such in the usage line)."""
    renames: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        for alias in f.metadata.get("aliases", ()):
            renames[_flag(alias)] = _flag(f.name)
            if _unwrap_optional(hints[f.name])[0] is bool:
                renames["--no-" + _flag(alias)[2:]] = "--no-" + _flag(f.name)[2:]
    out = []
    for a in argv:
        name, eq, value = a.partition("=")
        out.append(renames[name] + eq + value if name in renames else a)
    return out


def canonical_settings(values: dict, cls) -> dict:
    """A field: value mapping (a YAML section, a recorded config) with old spellings of field names and values
    (`aliases`, `value_aliases`) replaced by the current ones, and a string given for a list field as a list of one
    (as `--config` reads it: `data: x.jsonl`); anything else unchanged."""
    hints = typing.get_type_hints(cls)
    by_alias = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    old_values = {f.name: f.metadata.get("value_aliases", {}) for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        k = by_alias.get(k, k)
        if isinstance(v, str):
            v = old_values.get(k, {}).get(v, v)
            if k in hints and typing.get_origin(_unwrap_optional(hints[k])[0]) is list:
                v = [v]
        out[k] = v
    return out


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, and not nan / inf."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return v


def _scalar(tp):
    if tp is float:
        return finite_float
    if tp is int:
        return int
    return str


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (not the whole usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_into(cls, argv: list[str], prog: str, description: str, yaml_config: bool = True):
    """Parse argv into an instance of dataclass `cls` (exits 2 with a one-line error on bad flags). With
    `--print-config`, print the resolved settings as YAML (a valid `--config` file) and exit 0."""
    parser = _OneLineErrors(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = _canonical_argv(cls, argv)
    if yaml_config:
        parser.add_argument("--config", default=None, metavar="FILE.yaml",
                            help="YAML file of field values (snake_case keys); flags given here override it")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved settings (defaults, --config, flags) as YAML and exit")
        parser.add_argument("--verbose", action="store_true",
                            help="also show the libraries' own messages (progress bars without a TTY, the deepspeed "
                                 "launcher's INFO lines, DeepSpeed and torch notices); also UPCYCLE_DS_VERBOSE=1")
    add_dataclass_args(parser, cls)
    if yaml_config:
        cfg_path = _find_config(argv)
        if cfg_path is not None:
            parser.set_defaults(**_load_yaml(cfg_path, cls))
            for action in parser._actions:  # a value from the YAML file satisfies a required flag
                if action.dest in parser._defaults and action.required:
                    action.required = False
        if "--print-config" in argv:  # required fields need not be given just to see the rest
            for action in parser._actions:
                action.required = False
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    if ns.pop("verbose", False):
        from .library_logs import set_verbose

        set_verbose()
    if ns.pop("print_config", False):
        import sys

        sys.stdout.write(dump_settings(ns, cls))
        raise SystemExit(0)
    return cls(**ns)


def settings_of(obj) -> dict:
    """A dataclass instance's fields as plain data (tuples as lists), flat."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def dump_settings(values: dict, cls) -> str:
    """`values` (field: value) as the YAML a `--config` file takes: grouped by `cls.SECTIONS` (section: field names)
    where the class has them, flat otherwise."""
    import yaml

    values = {k: _plain(v) for k, v in values.items()}
    sections = getattr(cls, "SECTIONS", None)
    if not sections:
        return yaml.safe_dump(values, sort_keys=False)
    grouped: dict = {}
    for section, names in sections.items():
        part = {n: values[n] for n in names if n in values}
        if part:
            grouped[section] = part
    placed = {n for names in sections.values() for n in names}
    grouped.update({k: v for k, v in values.items() if k not in placed})
    return yaml.safe_dump(grouped, sort_keys=False)


def flatten_sections(data: dict, cls) -> dict:
    """A `--config` mapping with `cls.SECTIONS` groups (section: {field: value}) as one flat field: value mapping;
    flat keys pass through (both spellings are accepted)."""
    sections = getattr(cls, "SECTIONS", None) or {}
    flat: dict = {}
    for k, v in data.items():
        if k in sections and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def _find_config(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


ENV_PREFIX = "UPCYCLE_DS_"


def _read_config_text(path: str) -> str:
    if path.startswith("env:"):
        name = path[4:]
        if not name.startswith(ENV_PREFIX):
            raise UserError(f"--config {path}: only {ENV_PREFIX}* environment variables can hold settings")
        if name not in os.environ:
            raise UserError(f"--config {path}: environment variable {name} is not set")
        return os.environ[name]
    p = Path(path)
    if not p.exists():
        raise UserError(f"--config {path}: no such file")
    if not p.is_file():
        raise UserError(f"--config {path}: not a file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not a UTF-8 text file (byte {e.start}); expected YAML") from None
    except OSError as e:
        raise UserError(f"--config {path}: cannot read ({e.strerror})") from None


def _load_yaml(path: str, cls) -> dict:
    import yaml

    text = _read_config_text(path)
    if "\x00" in text:
        raise UserError(f"--config {path}: not a text file (holds NUL bytes); expected YAML")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value")
    data = flatten_sections(data, cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    old_values = {f.name: f.metadata.get("value_aliases", {}) for f in dataclasses.fields(cls)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        key = aliases.get(key, key)
        if key not in names:
            raise UserError(f"--config {path}: unknown field {k!r}")
        if isinstance(v, str) and v in old_values.get(key, {}):
            v = old_values[key][v]
        if isinstance(v, str) and typing.get_origin(_unwrap_optional(hints[key])[0]) is list:
            v = [v]  # `data: x.jsonl` for a list field, as `--data x.jsonl` gives
        out[key] = coerce(v, hints[key], f"--config {path}: field {key!r}")
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        fixed = origin is tuple and len(args) > 1 and args[-1] is not Ellipsis
        return f"a list of {len(args)} values ({_type_name(args[0])})" if fixed else \
            f"a list (of {_type_name(args[0])})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _number_from_str(v, kind):
    """A string holding a number of `kind` (int or float) as that number; anything else unchanged."""
    if isinstance(v, str):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def coerce(v, tp, where: str):
    """`v` (a YAML value) as field type `tp`, or a one-line UserError naming `where`. Numbers written as strings
    (YAML reads `1e-4` as a string) are accepted for number fields; floats must be finite."""
    tp, optional = _unwrap_optional(tp)
    if v is None:
        if optional:
            return None
        raise UserError(f"{where}: expected {_type_name(tp)}, got null")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        v = _number_from_str(v, int)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        v = _number_from_str(v, float)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise UserError(f"{where}: must be a finite number (got {v})")
            return float(v)
    elif tp in (str, Path):
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # e.g. `layers: 3`
    elif origin is typing.Literal:
        if v in typing.get_args(tp):
            return v
        raise UserError(f"{where}: must be {_type_name(tp)} (got {v!r})")
    elif origin in (list, tuple):
        args = typing.get_args(tp)
        fixed = origin is tuple and len(args) > 1 and args[-1] is not Ellipsis
        if isinstance(v, (list, tuple)):
            if fixed and len(v) != len(args):
                raise UserError(f"{where}: expected a list of {len(args)} values (got {len(v)})")
            return [coerce(x, args[i] if fixed else args[0], f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, str):
            raise UserError(f"{where}: expected {_type_name(tp)}, got the string {v!r} (write [{v}] for a list "
                            f"of one)")
    elif tp is dict or origin is dict:
        if isinstance(v, dict):
            return v
    else:
        return v
    shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
    raise UserError(f"{where}: expected {_type_name(tp)}, got {type(v).__name__} {shown}")
