"""argparse from kw_only dataclasses: one flag per field (`--num-experts`), the field's docstring is its --help.

A field without a default is a required flag. `X | None` takes an X (default None); `bool` becomes
`--flag/--no-flag`; `list[X]` takes one or more values; `Literal[...]` gives choices. With `yaml_config=True` the
parser also takes `--config FILE.yaml` whose keys (field names) become defaults that flags override.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
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


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = docs.get(f.name, "")
        if not required and default is not None and tp is not bool:
            help_ += f" (default: {default})"
        kw: dict = {"dest": f.name, "help": help_.replace("%", "%%") or None}
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif origin in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            kw["nargs"] = "+"
            kw["type"] = _scalar(inner)
        else:
            kw["type"] = _scalar(tp)
            kw["metavar"] = f.name.upper()
        parser.add_argument(flag, **kw)
        for alias in f.metadata.get("aliases", ()):  # old spellings: accepted, not shown in --help
            hidden = {**kw, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS, "required": False}
            hidden.pop("metavar", None)
            parser.add_argument("--" + alias.replace("_", "-"), **hidden)


def _scalar(tp):
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return str
    return str


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (not the whole usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_into(cls, argv: list[str], prog: str, description: str, yaml_config: bool = False):
    """Parse argv into an instance of dataclass `cls` (exits 2 with a one-line error on bad flags)."""
    parser = _OneLineErrors(prog=prog, description=description)
    if yaml_config:
        parser.add_argument("--config", default=None, metavar="FILE.yaml",
                            help="YAML file of field values (snake_case keys); flags given here override it")
    add_dataclass_args(parser, cls)
    if yaml_config:
        cfg_path = _find_config(argv)
        if cfg_path is not None:
            parser.set_defaults(**_load_yaml(cfg_path, cls))
            for action in parser._actions:  # a value from the YAML file satisfies a required flag
                if action.dest in parser._defaults and action.required:
                    action.required = False
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    return cls(**ns)


def _find_config(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _load_yaml(path: str, cls) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value")
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        key = aliases.get(key, key)
        if key not in names:
            raise UserError(f"--config {path}: unknown field {k!r}")
        if isinstance(v, str) and typing.get_origin(_unwrap_optional(hints[key])[0]) is list:
            v = [v]  # `data: x.jsonl` for a list field, as `--data x.jsonl` gives
        out[key] = v
    return out
