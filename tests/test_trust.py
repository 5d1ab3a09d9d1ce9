"""Runs a team can trust (issue 22): no command writes over or inside its inputs, no output silently replaces
another, outputs follow the umask, floating-point weights only, corrupt data and a corrupt token cache are one line
(or rebuilt), content-keyed caching — in the style of tests/test_bad_input.py: a table of cases, each one line on
stderr, exit code 2, nothing created or changed; then the cases that need a real process or a second writer.
All in this process: no DeepSpeed rank starts here (tests/test_orphans.py holds the one real launch)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from test_bad_input import Case, assert_one_line_error, copy, jsonl, snapshot, train, w  # noqa: F401  (w: fixture)

from upcycle_ds.cli import main
from upcycle_ds.errors import UserError


def _moe_at(w, d: Path, rel: str) -> Path:
    return copy(w["moe"], d / rel)


def _data_dir(w, d: Path) -> Path:
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text(w["data"].read_text())
    return d / "data"


def assert_last_line_error(rc: int, err: str, cmd: str, must=()) -> str:
    """Exit 2, no traceback, and one error line, the last (progress lines of the work done before may precede it)."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    return assert_one_line_error(rc, lines[-1], cmd, must)


# ----------------------------------------------------------------------------------------------------- the table
CASES = [
    # ---- (1) no command writes over or inside one of its inputs
    Case("apart-upcycle-out-inside-model", lambda w, d: [
        "upcycle", "--model", str(copy(w["qwen2"], d / "m")), "--out", str(d / "m" / "moe"), "--num-experts", "2"],
        ("--out", "is inside the input --model", "write the output elsewhere")),
    Case("apart-convert-out-inside-model", lambda w, d: [
        "convert", "--model", str(copy(w["moe"], d / "m")), "--out", str(d / "m" / "ds"), "--to", "ds"],
        ("is inside the input --model",)),
    Case("apart-convert-out-inside-ds-model", lambda w, d: [
        "convert", "--model", str(copy(w["ds"], d / "ds")), "--out", str(d / "ds" / "global_step0" / "hf"), "--to",
        "hf-moe"], ("is inside the input --model",)),
    Case("apart-convert-out-holds-calib-data", lambda w, d: [
        "convert", "--model", str(w["moe"]), "--out", str(_data_dir(w, d)), "--to", "hf-dense", "--merge",
        "router-weighted", "--calib-data", str(d / "data" / "train.jsonl"), "--overwrite"],
        ("contains the input --calib-data",)),
    Case("apart-assemble-out-inside-checkpoint", lambda w, d: [
        "upit-assemble", "--checkpoints", str(copy(w["llama"], d / "m")), "--out", str(d / "m" / "moe")],
        ("is inside the input --checkpoints",)),
    Case("apart-seed-data-out-inside-experts", lambda w, d: [
        "seed-data", "--experts", str(copy(w["llama"], d / "m")), "--data", str(w["data"]), "--out",
        str(d / "m" / "seed")], ("is inside the input --experts",)),
    Case("apart-eval-out-is-data", lambda w, d: [
        "eval", "--model", str(w["llama"]), "--data", str(_data_dir(w, d) / "train.jsonl"), "--out",
        str(d / "data" / "train.jsonl")], ("--out", "is the input --data",)),
    Case("apart-train-out-holds-model", train(model=lambda w, d: _moe_at(w, d, "run/hf"), out="run"),
         ("--out", "run contains the input --model", "run/hf")),
    Case("apart-train-out-inside-model", train(model=lambda w, d: _moe_at(w, d, "m"), out="m/run"),
         ("is inside the input --model",)),
    Case("apart-train-out-is-data", train(data=lambda w, d: _data_dir(w, d) / "train.jsonl",
                                          out=lambda w, d: d / "data" / "train.jsonl"),
         ("is the input --data",)),
    Case("apart-train-cache-inside-data", train("--data-cache", lambda w, d: str(d / "data" / "cache"),
                                                 data=lambda w, d: _data_dir(w, d)),
         ("the data cache", "is inside the input --data")),
    Case("apart-sft-out-holds-model", train(model=lambda w, d: copy(w["llama"], d / "run" / "hf"), out="run",
                                            cmd="sft"), ("contains the input --model",)),
    Case("apart-router-init-out-holds-model", train(model=lambda w, d: _moe_at(w, d, "run/hf"), out="run",
                                                    cmd="router-init"), ("contains the input --model",)),
    Case("apart-router-hidden-out-holds-model", lambda w, d: [
        "router-init", "--mode", "hidden", "--model", str(_moe_at(w, d, "run/hf")), "--out", str(d / "run"),
        "--prompts", str(d / "p.yaml")], ("contains the input --model",)),
    Case("apart-upit-out-holds-data", lambda w, d: [
        "upit", "--model", str(w["llama"]), "--data", str(_data_dir(w, d) / "train.jsonl"), "--out",
        str(d / "data")], ("contains the input --data",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, w, tmp_path, capsys):
    d = tmp_path / "case"
    d.mkdir()
    argv = case.build(w, d)
    before = snapshot(d)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.err, argv[0], case.must)
    assert cap.out == ""
    assert snapshot(d) == before


# ----------------------------------------------------- (2) an output that appeared meanwhile is never replaced
class _Rival:
    """Stands in for `tempfile` in io.atomic: right after the writer made its temp dir (all checks passed), another
    job's finished OUT appears, as when two runs with one --out race."""

    def __init__(self, out: Path):
        self.out = out

    def mkdtemp(self, **kw):
        tmp = tempfile.mkdtemp(**kw)
        self.out.mkdir()
        (self.out / "theirs.txt").write_text("the other job's output")
        return tmp

    def __getattr__(self, name):
        return getattr(tempfile, name)


WRITERS = {
    "upcycle": lambda w, out: ["upcycle", "--model", str(w["qwen2"]), "--out", str(out), "--num-experts", "2"],
    "convert-to-ds": lambda w, out: ["convert", "--model", str(w["moe"]), "--out", str(out), "--to", "ds"],
    "convert-to-hf-moe": lambda w, out: ["convert", "--model", str(w["ds"]), "--out", str(out), "--to", "hf-moe"],
    "convert-merge": lambda w, out: ["convert", "--model", str(w["moe"]), "--out", str(out), "--to", "hf-dense"],
    "upit-assemble": lambda w, out: ["upit-assemble", "--checkpoints", str(w["llama"]), str(w["sharded"]), "--out",
                                     str(out), "--num-experts", "2"],
    "seed-data": lambda w, out: ["seed-data", "--experts", str(w["llama"]), str(w["llama"]), "--data",
                                 str(w["data"]), "--out", str(out), "--fraction", "0.1"],
    "demo": lambda w, out: ["demo", "--out", str(out), "--rows", "4"],
    "scripts": lambda w, out: ["scripts", "--out", str(out)],
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_output_that_appeared_meanwhile_is_kept(writer, w, tmp_path, capsys, monkeypatch):
    import upcycle_ds.io.atomic as atomic

    out = tmp_path / "out"
    monkeypatch.setattr(atomic, "tempfile", _Rival(out))
    argv = WRITERS[writer](w, out)
    rc = main(argv)
    assert_last_line_error(rc, capsys.readouterr().err, argv[0], (f"{out} appeared while this command was writing",
                                                                   "--overwrite"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


def test_overwrite_still_replaces_what_appeared(w, tmp_path, capsys, monkeypatch):
    import upcycle_ds.io.atomic as atomic

    out = tmp_path / "out"
    monkeypatch.setattr(atomic, "tempfile", _Rival(out))
    assert main(["upcycle", "--model", str(w["qwen2"]), "--out", str(out), "--num-experts", "2", "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "theirs.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- outputs follow the user's umask
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def test_outputs_follow_the_umask(w, tmp_path, umask_022, capsys):
    """Under umask 022 a written checkpoint is 0755 dirs / 0644 files (like `mkdir` / `cp`), as is a record file
    written atomically (train_args.yaml, checkpoints/latest), and a data cache entry."""
    from upcycle_ds.data import DataConfig, prepare_cache
    from upcycle_ds.io.atomic import write_text_atomic

    assert main(["upcycle", "--model", str(w["qwen2"]), "--out", str(tmp_path / "moe"), "--num-experts", "2"]) == 0
    assert _modes(tmp_path / "moe") == {("d", 0o755), ("f", 0o644)}
    write_text_atomic(tmp_path / "latest", "global_step3", fsync=True)
    assert stat.S_IMODE((tmp_path / "latest").stat().st_mode) == 0o644
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(w["moe"])
    split = prepare_cache(DataConfig(data=str(w["data"]), max_length=64, cache_dir=str(tmp_path / "cache")), tok)
    assert _modes(split) == {("d", 0o755), ("f", 0o644)}
    os.umask(0o077)
    write_text_atomic(tmp_path / "private", "x")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


def test_eval_results_follow_the_umask(w, tmp_path, umask_022, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(w["llama"]), "--data", str(w["data"]), "--out", str(out),
                 "--max-rows", "2"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_check_apart_directions(tmp_path):
    from upcycle_ds.io.paths import check_apart

    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "m")
    check_apart(tmp_path / "o", [("--model", tmp_path / "m"), None and ("--x", None)])
    for out, how in ((tmp_path / "m", "is the input"), (tmp_path / "link", "is the input"),
                     (tmp_path / "m" / "sub" / "o", "is inside the input"), (tmp_path, "contains the input"),
                     (tmp_path / "link" / "o", "is inside the input")):
        with pytest.raises(UserError, match=how):
            check_apart(out, [("--model", tmp_path / "m")])
