"""The package's shape, checked from its source (no ranks, no models): no import circle among upcycle_ds modules
(function-level imports included), io/ never imports train/, every user-error message written in one place, the
run's settings grouped and classified for --resume, and a Trainer whose methods stay short."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections import defaultdict
from pathlib import Path

import pytest

import upcycle_ds

PKG = Path(upcycle_ds.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the upcycle_ds modules it imports anywhere in its source (module level or inside functions)."""
    mods = _modules()
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_and_io_imports_nothing_from_train():
    graph = import_graph()
    assert len(graph) > 80 and "upcycle_ds.train.setup" in graph["upcycle_ds.train.trainer"]
    assert cycles(graph) == []
    bad = {m: sorted(t for t in ts if t.startswith("upcycle_ds.train")) for m, ts in graph.items()
           if m.startswith("upcycle_ds.io")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _message(call: ast.Call) -> str | None:
    """The text of a UserError(...)'s message with every {expression} as `{}` (None if not a literal)."""
    if not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return " ".join(arg.value.split())
    if isinstance(arg, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
        return " ".join(text.split())
    return None


def user_error_messages() -> dict[str, set[str]]:
    found = defaultdict(set)
    for mod, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError":
                msg = _message(node)
                if msg and len(msg.replace("{}", "")) > 12:  # not a bare "{path}: {reason}"
                    found[msg].add(mod)
    return found


def test_each_user_error_message_is_written_in_one_module():
    found = user_error_messages()
    assert len(found) > 200
    assert any("already holds a checkpoint" in m for m in found)
    assert {m: sorted(mods) for m, mods in found.items() if len(mods) > 1} == {}


def _stage_configs():
    from upcycle_ds.train.config import TrainArgs
    from upcycle_ds.upit.router_init import RouterInitConfig
    from upcycle_ds.upit.sft import SFTConfig

    return [TrainArgs, SFTConfig, RouterInitConfig]


@pytest.mark.parametrize("cls", _stage_configs(), ids=lambda c: c.__name__)
def test_every_setting_is_in_one_section_and_classified_for_resume(cls):
    from upcycle_ds.train.resume import RESUME_APPLIED, RESUME_MUST_MATCH

    names = [f.name for f in dataclasses.fields(cls) if f.init]
    placed = [n for fields in cls.SECTIONS.values() for n in fields]
    assert sorted(placed) == sorted(set(placed)), "a field in two sections"
    assert set(names) - set(placed) == set(), "fields in no section of --print-config / --config"
    assert set(placed) - set(names) == set(), "sections name fields that do not exist"
    assert set(RESUME_MUST_MATCH) & RESUME_APPLIED == set()
    assert set(names) - set(RESUME_MUST_MATCH) - RESUME_APPLIED == set(), "settings --resume neither refuses nor applies"


def test_print_config_is_grouped_and_reads_back(tmp_path):
    import yaml

    from upcycle_ds.cli_args import parse_into
    from upcycle_ds.train.config import TrainArgs

    argv = ["--model", "m", "--data", "d.jsonl", "--out", "o", "--lr", "0.002", "--ep-size", "2"]
    with pytest.raises(SystemExit):
        parse_into(TrainArgs, argv + ["--print-config"], prog="t", description="")
    cfg = tmp_path / "run.yaml"
    from upcycle_ds.cli_args import dump_settings, settings_of

    args = parse_into(TrainArgs, argv, prog="t", description="")
    cfg.write_text(dump_settings(settings_of(args), TrainArgs))
    grouped = yaml.safe_load(cfg.read_text())
    assert list(grouped)[:6] == ["model", "data", "parallelism", "optimizer", "checkpointing", "logging"]
    assert grouped["optimizer"]["lr"] == 0.002 and grouped["parallelism"]["ep_size"] == 2
    assert settings_of(parse_into(TrainArgs, ["--config", str(cfg)], prog="t", description="")) == settings_of(args)


def test_trainer_methods_are_short():
    from upcycle_ds.train.trainer import Trainer

    long = {}
    for name, fn in inspect.getmembers(Trainer, inspect.isfunction):
        lines = len(inspect.getsource(fn).splitlines())
        if lines > 42:
            long[name] = lines
    assert long == {}
