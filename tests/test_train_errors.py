"""Bad input to `upcycle-ds train --nproc N`: caught by the preflight in the parent process before any rank starts —
one line on stderr naming the problem, exit code 2, no traceback, no run files (OUT/train_args.yaml is written only
right before the `deepspeed` launcher starts). Also: `--help` documents every field."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import make_dense, make_jsonl, make_moe, make_tokenizer

from upcycle_ds.cli import main
from upcycle_ds.cli_args import field_docs
from upcycle_ds.train.config import TrainArgs

PREFIX = "upcycle-ds train: error: "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_errors")
    moe = make_moe("mixtral", root / "moe", num_experts=4, top_k=2)
    make_tokenizer(moe)
    dense = make_dense("llama", root / "dense")
    make_tokenizer(dense)
    return {"root": root, "moe": moe, "dense": dense, "data": make_jsonl(root / "train.jsonl", 20)}


def train(capsys, tiny, out: Path, *flags: str, model: Path | None = None, data: Path | None = None,
          nproc: str = "2") -> tuple[int, str]:
    argv = ["train", "--nproc", nproc, "--model", str(model or tiny["moe"]), "--data", str(data or tiny["data"]),
            "--out", str(out), *flags]
    rc = main(argv)
    cap = capsys.readouterr()
    assert cap.out == ""
    return rc, cap.err


def assert_clean_error(rc: int, err: str, out: Path, *must_contain: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert "Traceback" not in err and "launching" not in err
    for s in must_contain:
        assert s in lines[0], (s, lines[0])
    assert not (out / "train_args.yaml").exists()  # the launcher was never reached


def test_missing_data_file(capsys, tiny, tmp_path):
    rc, err = train(capsys, tiny, tmp_path / "out", data=tmp_path / "nope.jsonl")
    assert_clean_error(rc, err, tmp_path / "out", "data file not found", "nope.jsonl")
    assert not (tmp_path / "out").exists()


def test_rows_without_usable_columns(capsys, tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": f"{i}?", "answer": str(i)}) + "\n" for i in range(5)))
    rc, err = train(capsys, tiny, tmp_path / "out", data=bad)
    assert_clean_error(rc, err, tmp_path / "out", "bad.jsonl", "messages", "'answer'", "'question'")

    # one row among good ones lacks the response
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(6)]
    rows[4] = {"prompt": "4+1="}
    one = tmp_path / "one_bad_row.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = train(capsys, tiny, tmp_path / "out", data=one)
    assert_clean_error(rc, err, tmp_path / "out", "one_bad_row.jsonl", "row 4", "prompt")


def test_eval_data_is_checked_too(capsys, tiny, tmp_path):
    rc, err = train(capsys, tiny, tmp_path / "out", "--eval-data", str(tmp_path / "eval.jsonl"))
    assert_clean_error(rc, err, tmp_path / "out", "data file not found", "eval.jsonl")


@pytest.mark.parametrize("nproc,ep,msg", [
    ("3", "3", "--ep-size 3 must divide the number of experts (4)"),
    ("3", "2", "--ep-size 2 must divide the world size (3 ranks)"),
    ("2", "0", "--ep-size 0 must divide the number of experts (4)"),
])
def test_ep_size_must_divide_experts_and_world(capsys, tiny, tmp_path, nproc, ep, msg):
    rc, err = train(capsys, tiny, tmp_path / "out", "--ep-size", ep, nproc=nproc)
    assert_clean_error(rc, err, tmp_path / "out", msg)


def test_zero3_with_moe(capsys, tiny, tmp_path):
    rc, err = train(capsys, tiny, tmp_path / "out", "--zero-stage", "3")
    assert_clean_error(rc, err, tmp_path / "out", "--zero-stage 3 is not supported with DeepSpeed-MoE")


def test_fp16_refused(capsys, tiny, tmp_path):
    # as a flag: argparse's choices (one line, not the usage block)
    with pytest.raises(SystemExit) as exc:
        train(capsys, tiny, tmp_path / "out", "--dtype", "fp16")
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert_clean_error(2, err, tmp_path / "out", "--dtype", "invalid choice: 'fp16'")
    # from a --config YAML file (argparse does not check choices of defaults): the preflight's own check
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"dtype": "fp16"}))
    rc, err = train(capsys, tiny, tmp_path / "out", "--config", str(cfg))
    assert_clean_error(rc, err, tmp_path / "out", "fp16 is not supported; use --dtype bf16 or fp32")
    cfg.write_text(yaml.safe_dump({"dtype": "int8"}))
    rc, err = train(capsys, tiny, tmp_path / "out", "--config", str(cfg))
    assert_clean_error(rc, err, tmp_path / "out", "--dtype must be bf16 or fp32 (got 'int8')")


def test_global_batch_size_must_multiply_out(capsys, tiny, tmp_path):
    rc, err = train(capsys, tiny, tmp_path / "out", "--micro-batch-size", "2", "--grad-accum", "3",
                    "--global-batch-size", "16")
    assert_clean_error(rc, err, tmp_path / "out",
                       "--global-batch-size 16 != --micro-batch-size 2 x --grad-accum 3 x 2 ranks = 12")


def test_out_with_checkpoints_needs_resume(capsys, tiny, tmp_path):
    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "global_step3").mkdir(parents=True)
    (ckpts / "latest").write_text("global_step3")
    rc, err = train(capsys, tiny, tmp_path / "out")
    assert_clean_error(rc, err, tmp_path / "out", str(ckpts), "already holds a checkpoint", "--resume")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]


def test_dense_model_needs_num_experts(capsys, tiny, tmp_path):
    rc, err = train(capsys, tiny, tmp_path / "out", model=tiny["dense"])
    assert_clean_error(rc, err, tmp_path / "out", "dense llama checkpoint", "--num-experts")


def test_subprocess_error_is_fast_and_starts_no_rank(tiny, tmp_path):
    """The real `upcycle-ds` executable: exit 2 with one stderr line, well before a `deepspeed` launch could."""
    exe = Path(sys.executable).parent / "upcycle-ds"
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run([str(exe), "train", "--nproc", "2", "--model", str(tiny["moe"]), "--data", str(tiny["data"]),
                        "--out", str(out), "--zero-stage", "3"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        PREFIX + "--zero-stage 3 is not supported with DeepSpeed-MoE (native MoE supports ZeRO 0/1/2)"]
    assert r.stdout == "" and not out.exists()
    assert took < 30, took


def test_help_explains_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    squashed = "".join(text.split())  # argparse re-wraps (and may break at hyphens): compare without whitespace
    docs = field_docs(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert docs.get(f.name), f"TrainArgs.{f.name} has no docstring"
        assert "".join(docs[f.name].split()) in squashed, f.name
    assert "--config FILE.yaml" in text and "--no-resume" in text


def test_config_yaml_supplies_and_flags_override(tmp_path):
    """Parsing only (the launched runs in test_train.py use it for real): YAML values fill in, flags win,
    an unknown YAML key is an error."""
    from upcycle_ds.cli_args import parse_into
    from upcycle_ds.errors import UserError

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", "out": "o", "lr": 3e-4, "ep_size": 2,
                                   "freeze": ["embed_tokens"], "export_hf": False}))
    args = parse_into(TrainArgs, ["--config", str(cfg), "--ep-size", "4", "--export-hf"], prog="t", description="",
                      yaml_config=True)
    assert (args.model, args.lr, args.ep_size, args.freeze, args.export_hf) == ("m", 3e-4, 4, ["embed_tokens"], True)
    cfg.write_text(yaml.safe_dump({"model": "m", "learning_rate": 1.0}))
    with pytest.raises(UserError, match="unknown field 'learning_rate'"):
        parse_into(TrainArgs, ["--config", str(cfg)], prog="t", description="", yaml_config=True)
