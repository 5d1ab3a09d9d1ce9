"""`--resume` on another layout (world size, ep size, ZeRO stage, dtype), with real DeepSpeed ranks on CPU, against
uninterrupted runs of the same data (docs/training.md, "Resuming on another layout").

A tiny Mixtral (2 layers, 4 experts, top 2), max_length 64, micro batch 2, 8 steps, lr 1e-3. Launches, shared:
    ref        2 ranks, ep 2, ZeRO-2, fp32, a checkpoint every 2 steps: the reference losses and checkpoints
    shrunk     ref@4 -> 1 rank, ep 1, ZeRO-1 (--grad-accum becomes 2 by itself), steps 5-8
    grown      shrunk@6 -> 2 ranks, ep 2, ZeRO-2, steps 7-8 (back up; ZeRO-1 -> ZeRO-2)
    converted  `convert --to ds --with-optimizer` of ref@4 -> 1 rank, ep 1, ZeRO-0 (plain torch AdamW), steps 5-8
    zero0      converted@6 (ZeRO-0 fp32 files) -> 1 rank, ZeRO-2, steps 7-8
    ref_bf16   2 ranks, ep 2, ZeRO-1, bf16, a checkpoint every 2 steps
    bf16       ref_bf16@4 -> 1 rank, ep 1, ZeRO-0 (DeepSpeed's per-parameter bf16 optimizer), steps 5-8, and that
               run's @6 -> 1 rank, ZeRO-2, steps 7-8
    reset      ref@4 with its AdamW state zeroed -> as `shrunk`, 2 steps: must differ (else the test cannot fail)
1-rank runs are started in-process (no launcher). fp32 losses must match the reference to 1e-5 relative (the
layouts sum gradients in different orders; measured <= 1e-7; the reset differs by 2e-3 to 3e-2). bf16 to 2e-3: two
uninterrupted bf16 runs of the same data, 2 ranks vs 1 rank x grad accum 2 (both ZeRO-1), already differ by up to
7e-4 within 8 steps (rounding in another order); the resumed bf16 runs stay within that (measured 6e-4).

ZeRO-0 appears only at ep 1: with expert parallelism DeepSpeed's ZeRO-0 clips gradients by the mean of the ranks'
local norms, ZeRO-1/2 by the global norm (docs/training.md), so those runs would not follow each other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cli_proc import cli, cli_env
from tiny import make_jsonl, make_moe, make_tokenizer

from upcycle_ds.cli import main as cli_main
from upcycle_ds.io.safe_load import safe_load

pytestmark = pytest.mark.slow
TOL, BF16_TOL = 1e-5, 2e-3
COMMON = ["--micro-batch-size", "2", "--max-length", "64", "--seed", "0", "--lr", "1e-3", "--max-steps", "8",
          "--wandb-mode", "disabled", "--no-export-hf", "--eval-fraction", "0"]
PREFIX = "upcycle-ds train: error: "


def _env() -> dict:
    return cli_env(drop=("WANDB_MODE",))


def train(tiny, out: Path, nproc: int, *flags: str, model: Path | None = None, check: bool = True):
    """`upcycle-ds train` on `nproc` ranks (1: this rank in-process, no launcher)."""
    cmd = [*cli("train"), *(["--nproc", str(nproc)] if nproc > 1 else []), "--model",
           str(model or tiny["moe"]), "--data", str(tiny["data"]), "--out", str(out), *COMMON, *flags]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)
    if check:
        assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def rel_diffs(got: dict[int, float], want: dict[int, float], steps) -> dict[int, float]:
    return {s: abs(got[s] - want[s]) / abs(want[s]) for s in steps}


def assert_close(got: dict[int, float], want: dict[int, float], steps, tol: float) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    diffs = rel_diffs(got, want, steps)
    print(f"relative loss differences, steps {list(steps)}: max {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= tol, {s: (got[s], want[s], f"{d:.1e}") for s, d in diffs.items()}


def from_checkpoint(src: Path, tag: str, dst: Path) -> Path:
    """A run dir holding `src`'s checkpoint `tag` as `latest` (plus its model files) and its metrics up to there."""
    ckpts = src / "checkpoints"
    shutil.copytree(ckpts, dst / "checkpoints",
                    ignore=lambda d, names: [n for n in names if Path(d) == ckpts and n.startswith("global_step")
                                             and n != tag])
    (dst / "checkpoints" / "latest").write_text(tag)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    moe = make_moe("mixtral", root / "moe", num_experts=4, top_k=2, num_hidden_layers=2)
    make_tokenizer(moe)
    return {"root": root, "moe": moe, "data": make_jsonl(root / "train.jsonl", 200)}


@pytest.fixture(scope="module")
def ref(tiny):
    out = tiny["root"] / "ref"
    train(tiny, out, 2, "--ep-size", "2", "--zero-stage", "2", "--dtype", "fp32", "--save-every", "2")
    assert sorted(losses(out)) == list(range(1, 9))
    return out


@pytest.fixture(scope="module")
def shrunk(tiny, ref):
    out = from_checkpoint(ref, "global_step4", tiny["root"] / "shrunk")
    r = train(tiny, out, 1, "--ep-size", "1", "--zero-stage", "1", "--dtype", "fp32", "--save-every", "2", "--resume")
    return out, r.stderr


@pytest.fixture(scope="module")
def converted(tiny, ref):
    out = tiny["root"] / "converted"
    out.mkdir()
    assert cli_main(["convert", "--input", str(ref / "checkpoints"), "--tag", "global_step4", "--output",
                     str(out / "checkpoints"), "--to", "ds", "--ep-size", "1", "--with-optimizer"]) == 0
    shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
    r = train(tiny, out, 1, "--ep-size", "1", "--zero-stage", "0", "--dtype", "fp32", "--save-every", "2", "--resume")
    return out, r.stderr


@pytest.fixture(scope="module")
def ref_bf16(tiny):
    out = tiny["root"] / "ref_bf16"
    train(tiny, out, 2, "--ep-size", "2", "--zero-stage", "1", "--dtype", "bf16", "--save-every", "2")
    return out


@pytest.fixture(scope="module")
def shrunk_bf16(tiny, ref_bf16):
    out = from_checkpoint(ref_bf16, "global_step4", tiny["root"] / "shrunk_bf16")
    r = train(tiny, out, 1, "--ep-size", "1", "--zero-stage", "0", "--dtype", "bf16", "--save-every", "2",
              "--resume")
    return out, r.stderr


# ------------------------------------------------------------------------------------------------------- tests
def test_two_ranks_to_one_keeps_optimizer_state(ref, shrunk):
    """The issue's case: 2 ranks, ep 2, ZeRO-2, 4 steps -> 1 rank, ep 1, grad accum 2, 4 more steps."""
    out, stderr = shrunk
    assert "--grad-accum 1 -> 2: keeps the checkpoint's global batch of 4 rows per step" in stderr, stderr[-3000:]
    assert ("at step 4 on another layout (world_size 2 -> 1, ep_size 2 -> 1, zero_stage 2 -> 1): optimizer state of "
            "41 parameters re-partitioned, RNG re-seeded") in stderr, stderr[-3000:]
    got, want = losses(out), losses(ref)
    assert {s: got[s] for s in range(1, 5)} == {s: want[s] for s in range(1, 5)}  # logged before the checkpoint
    assert_close(got, want, range(5, 9), TOL)
    assert (out / "checkpoints" / "latest").read_text() == "global_step8"


def test_reset_optimizer_state_would_be_caught(tiny, ref, shrunk, tmp_path):
    """The same resume from a copy of the checkpoint whose AdamW state was zeroed (steps 0, moments 0): the weights
    and data are the same, so step 5's loss (computed before the first update) agrees, and step 6's clearly not."""
    out = from_checkpoint(ref, "global_step4", tmp_path / "reset")
    for f in (out / "checkpoints" / "global_step4").glob("zero_pp_rank_*_optim_states.pt"):
        sd = safe_load(f)
        for state in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                state[key].zero_()
        torch.save(sd, f)
    train(tiny, out, 1, "--ep-size", "1", "--zero-stage", "1", "--dtype", "fp32", "--resume", "--exit-after-steps",
          "2")
    got, want, elastic = losses(out), losses(ref), losses(shrunk[0])
    assert got[5] == pytest.approx(want[5], rel=TOL)
    reset, kept = rel_diffs(got, want, [6])[6], rel_diffs(elastic, want, [6])[6]
    print(f"step 6: reset optimizer {reset:.1e}, elastic resume {kept:.1e} relative to the uninterrupted run")
    assert reset > 100 * TOL and kept <= TOL


MATRIX = {
    # case: (source fixture, tag, flags of the resumed run, steps compared, reference fixture, tolerance)
    "1_rank_zero1_to_2_ranks_zero2": ("shrunk", "global_step6", (2, "--ep-size", "2", "--zero-stage", "2",
                                                                 "--dtype", "fp32"), range(7, 9), "ref", TOL),
    "zero0_fp32_to_zero2": ("converted", "global_step6", (1, "--ep-size", "1", "--zero-stage", "2", "--dtype",
                                                          "fp32"), range(7, 9), "ref", TOL),
    "bf16_zero0_to_zero2": ("shrunk_bf16", "global_step6", (1, "--ep-size", "1", "--zero-stage", "2", "--dtype",
                                                            "bf16"), range(7, 9), "ref_bf16", BF16_TOL),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_resume_on_another_layout(case, request, tiny, tmp_path):
    src, tag, (nproc, *flags), steps, reference, tol = MATRIX[case]
    src_dir = request.getfixturevalue(src)
    src_dir = src_dir[0] if isinstance(src_dir, tuple) else src_dir
    out = from_checkpoint(src_dir, tag, tmp_path / "run")
    r = train(tiny, out, nproc, *flags, "--resume")
    assert f"resumed from {out / 'checkpoints'}/{tag}" in r.stderr and "on another layout" in r.stderr, r.stderr[-3000:]
    assert_close(losses(out), losses(request.getfixturevalue(reference)), steps, tol)


def test_bf16_two_ranks_zero1_to_one_rank_zero0(ref_bf16, shrunk_bf16):
    """bf16: ZeRO-1 partitions (bf16_zero_pp files) into DeepSpeed's per-parameter bf16 optimizer (ZeRO-0)."""
    out, stderr = shrunk_bf16
    assert "on another layout (world_size 2 -> 1, ep_size 2 -> 1, zero_stage 1 -> 0)" in stderr, stderr[-3000:]
    assert_close(losses(out), losses(ref_bf16), range(5, 9), BF16_TOL)


def test_converted_checkpoint_resumes_into_zero0(ref, converted):
    """`convert --with-optimizer` (layout-free optimizer state) -> 1 rank, ep 1, ZeRO-0 (plain torch AdamW)."""
    out, stderr = converted
    tag = out / "checkpoints" / "global_step4"
    assert (tag / "universal_optim_states.pt").is_file()
    assert len(list(tag.glob("layer_*_expert_*_universal_optim_states.pt"))) == 2 * 4
    assert not list(tag.glob("*zero_pp_rank_*"))  # no DeepSpeed optimizer files: the universal ones are read
    assert "on another layout (world_size 2 -> 1, ep_size 2 -> 1, zero_stage 2 -> 0)" in stderr, stderr[-3000:]
    assert_close(losses(out), losses(ref), range(5, 9), TOL)


# ---------------------------------------------------------------------------------------------------- bad input
def _bad_model(tiny, kind: str) -> Path:
    path = tiny["root"] / f"bad_{kind}"
    if not path.exists():
        extra = {"experts": {"num_experts": 8}, "layers": {"num_hidden_layers": 3}}[kind]
        make_moe("mixtral", path, **{"top_k": 2, "num_experts": 4, "num_hidden_layers": 2, **extra})
        make_tokenizer(path)
    return path


@pytest.mark.parametrize("kind,why", [("experts", "num_local_experts is 4"), ("layers", "num_hidden_layers is 2"),
                                      ("module_only", "no optimizer state"),
                                      ("global_batch", "global batch of 4 rows per step")])
def test_bad_resume_is_one_line(kind, why, tiny, ref, tmp_path):
    out = from_checkpoint(ref, "global_step4", tmp_path / "run")
    model, flags = None, ["--ep-size", "1", "--zero-stage", "1", "--dtype", "fp32"]
    if kind in ("experts", "layers"):
        model = _bad_model(tiny, kind)
    elif kind == "module_only":  # a converted checkpoint without --with-optimizer holds weights only
        shutil.rmtree(out / "checkpoints")
        assert cli_main(["convert", "--input", str(ref / "checkpoints"), "--tag", "global_step4", "--output",
                         str(out / "checkpoints"), "--to", "ds", "--out-tag", "global_step4"]) == 0
    else:  # 4 rows per step cannot be made of micro batches of 3 on 1 rank
        flags += ["--micro-batch-size", "3"]  # (the last of two flags wins)
    r = train(tiny, out, 1, *flags, "--resume", model=model, check=False)
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and why in lines[0], lines


def test_convert_with_optimizer_needs_optimizer_state(ref, tmp_path, capsys):
    module_only = tmp_path / "module_only"
    assert cli_main(["convert", "--input", str(ref / "checkpoints"), "--tag", "global_step4", "--output",
                     str(module_only), "--to", "ds"]) == 0
    capsys.readouterr()
    assert cli_main(["convert", "--input", str(module_only), "--output", str(tmp_path / "out"), "--to", "ds",
                     "--with-optimizer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upcycle-ds convert: error: ") and "no optimizer state" in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- SIGUSR1 through --nproc N
def test_sigusr1_to_the_launcher_saves_and_stops(tiny, tmp_path):
    """`kill -USR1` on `upcycle-ds train --nproc 2` (what a Slurm time-limit signal does through sbatch): the launcher
    passes it to the ranks, which save at the next logging step and exit 0, with a complete checkpoint of that step."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [*cli("train"), "--nproc", "2", "--model", str(tiny["moe"]), "--data", str(tiny["data"]),
           "--out", str(out), "--ep-size", "2", "--zero-stage", "2", "--dtype", "fp32", *COMMON,
           "--max-steps", "400"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(losses(out)) < 2 if (out / "metrics.jsonl").is_file() else True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training steps in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 0, err[-3000:]
    assert "stopping at step" in err and "SIGUSR1" in err, err[-3000:]
    stopped = int((out / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped < 400 and max(losses(out)) == stopped
    tag_dir = out / "checkpoints" / f"global_step{stopped}"
    assert {f"rng_rank{r}.pt" for r in range(2)} <= {p.name for p in tag_dir.iterdir()}
