"""`--resume` treats a checkpoint as untrusted input, with real runs (DeepSpeed's own checkpoint files):

- a pickle whose `__reduce__` runs a command, planted in each kind of file a resume reads (the model states, an
  expert file, a ZeRO optimizer partition, our RNG file), makes `upcycle-ds train --resume` exit 2 with one line
  naming the file — and the command never ran. One case on 2 ranks (rank 1's optimizer partition: rank 0 reports it
  once for the whole job), the others on 1 rank (every file is checked by rank 0 before DeepSpeed opens any);
- `latest` naming a missing tag, or a path outside the checkpoint dir, is refused with one line that names the
  newest complete checkpoint; a checkpoint of a different model is refused naming the setting that differs;
- `--keep-last N` keeps the N newest checkpoints (and the one `latest` names).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_proc import cli, cli_env
from tiny import make_jsonl, make_moe, make_tokenizer

pytestmark = pytest.mark.slow
PREFIX = "upcycle-ds train: error: "


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env() -> dict:
    return cli_env()


def train_argv(tiny, out: Path, nproc: int, *flags: str, model: Path | None = None) -> list[str]:
    return ["train", "--model", str(model or tiny["moe"]), "--data", str(tiny["data"]), "--out", str(out),
            "--ep-size", str(nproc), "--zero-stage", "1", "--dtype", "fp32", "--max-steps", "4", "--save-every", "1",
            "--micro-batch-size", "2", "--max-length", "64", "--wandb-mode", "disabled", "--no-export-hf",
            "--eval-fraction", "0", *flags]


def train_cmd(tiny, out: Path, nproc: int, *flags: str, model: Path | None = None) -> list[str]:
    argv = train_argv(tiny, out, nproc, *flags, model=model)
    return [*cli(argv[0]), "--nproc", str(nproc), *argv[1:]]


def train(tiny, out: Path, nproc: int, *flags: str, model: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(tiny, out, nproc, *flags, model=model), env=_env(), capture_output=True,
                          text=True, timeout=300)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_security")
    moe = make_moe("mixtral", root / "moe", num_experts=2, top_k=1, num_hidden_layers=2)
    make_tokenizer(moe)
    data = make_jsonl(root / "train.jsonl", 60)
    runs = {}
    for nproc in (1, 2):
        out = root / f"saved{nproc}"
        r = train({"moe": moe, "data": data}, out, nproc, "--exit-after-steps", "2", "--keep-last", "1")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc] = out
    return {"root": root, "moe": moe, "data": data, "runs": runs}


def test_keep_last_keeps_only_the_newest(tiny):
    ckpts = tiny["runs"][1] / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step2"]


def _planted(tiny, nproc: int, pick, tmp_path: Path) -> tuple[Path, Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(tiny["runs"][nproc], out)
    tag = out / "checkpoints" / "global_step2"
    victim = pick(tag)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, victim)
    return out, victim, marker


KINDS = {
    "model_states": lambda d: d / "mp_rank_00_model_states.pt",
    "expert_file": lambda d: d / "layer_1_expert_0_mp_rank_00_model_states.pt",
    "optimizer_partition": lambda d: d / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng_file": lambda d: d / "rng_rank0.pt",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_pickle_payload_in_a_checkpoint_never_runs(tiny, tmp_path, kind):
    out, victim, marker = _planted(tiny, 1, KINDS[kind], tmp_path)
    r = train(tiny, out, 1, "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and victim.name in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the payload ran"


def test_pickle_payload_in_rank1_partition_is_reported_once(tiny, tmp_path):
    out, victim, marker = _planted(tiny, 2, lambda d: d / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tmp_path)
    r = train(tiny, out, 2, "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 1 and victim.name in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("latest,why", [("global_step9", "missing"), ("/etc", "only a name inside its directory"),
                                         ("../saved1", "only a name inside its directory")])
def test_latest_must_name_a_complete_tag_inside(tiny, tmp_path, latest, why):
    out = tmp_path / "run"
    shutil.copytree(tiny["runs"][1], out)
    (out / "checkpoints" / "latest").write_text(latest)
    r = train(tiny, out, 1, "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 1 and why in lines[0], r.stderr[-3000:]
    if why == "missing":
        assert "global_step2" in lines[0]  # names the newest complete checkpoint


def test_resume_with_another_model_names_the_difference(tiny, tmp_path):
    other = make_moe("mixtral", tmp_path / "other", num_experts=4, top_k=1, num_hidden_layers=2)
    make_tokenizer(other)
    out = tmp_path / "run"
    shutil.copytree(tiny["runs"][1], out)
    r = train(tiny, out, 1, "--resume", model=other)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 1 and "num_local_experts is 2" in lines[0] and "4 now" in lines[0], lines


# ------------------------------------------------------------------- what a resume continues from, and how it ends
def test_resume_with_an_expert_file_missing_is_refused_before_any_rank_starts(tiny, tmp_path):
    """A tag with one expert file missing: the launcher names it (one line, exit 2) before it starts a rank; a job
    started without our launcher (`deepspeed` directly) is refused by rank 0's checks for the whole job, before any
    rank enters the collective load (where a rank missing a file would leave the others waiting)."""
    out = tmp_path / "run"
    shutil.copytree(tiny["runs"][2], out)
    (out / "checkpoints" / "global_step2" / "layer_1_expert_1_mp_rank_00_model_states.pt").unlink()
    r = train(tiny, out, 2, "--resume")
    assert r.returncode == 2 and "launching" not in r.stderr, r.stderr[-3000:]
    assert error_lines(r) == [f"{PREFIX}--resume: checkpoint {out}/checkpoints/global_step2 is incomplete: "
                              f"layer_1_expert_1_mp_rank_00_model_states.pt is missing; use a new --out"]

    from upcycle_ds.launch.dist_env import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank",
           "--module", "upcycle_ds.cli", *train_argv(tiny, out, 2, "--resume")]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and time.monotonic() - t0 < 120
    assert len(error_lines(r)) == 1 and "layer_1_expert_1_mp_rank_00_model_states.pt is missing" in r.stderr


def test_a_rank_failing_while_the_others_train_ends_the_job(tiny, tmp_path):
    """Rank 1 fails inside the resume load (as DeepSpeed does on a file it cannot read) while rank 0 loads and
    enters its first step, where it waits for rank 1 in the experts' all_to_all: the job ends, its error printed
    once, well within --dist-timeout-s (rank 1 exits at once, without waiting in a barrier for rank 0; the launcher
    then ends rank 0)."""
    out = tmp_path / "run"
    shutil.copytree(tiny["runs"][2], out)
    inject = str(Path(__file__).parent / "inject")
    env = _env()
    env.update(UPCYCLE_DS_TEST_FAIL_IN_LOAD="1", PYTHONPATH=os.pathsep.join([inject, env["PYTHONPATH"]]))
    t0 = time.monotonic()
    r = subprocess.run(train_cmd(tiny, out, 2, "--resume", "--dist-timeout-s", "600"), env=env, capture_output=True,
                       text=True, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stderr[-3000:]
    assert took < 120, f"the job took {took:.0f} s to end"
    assert [line for line in error_lines(r) if "(injected)" in line] == [
        f"upcycle-ds train: error: layer_0_expert_1_mp_rank_00_model_states.pt: No such file or directory "
        f"(injected)"], r.stderr[-3000:]


def test_resume_on_changed_data_is_refused_then_continues_from_its_start_when_allowed(tiny, tmp_path):
    """The checkpoint records which tokenised rows it was trained on. Resuming after the data file changed (same
    path, other rows) is refused with one line; with --resume-data-changed ok the run continues at the saved step
    from the start of the new data (logged). A flag changed on resume (--lr) is applied — the LR of the next step is
    the new schedule's — logged, and recorded in OUT/train_args.yaml."""
    import json

    import yaml

    from upcycle_ds.cli_args import flatten_sections
    from upcycle_ds.train.config import TrainArgs
    from upcycle_ds.train.optim import lr_lambda

    data = tmp_path / "data.jsonl"
    shutil.copy(tiny["data"], data)
    run = {**tiny, "data": data}
    out = tmp_path / "run"
    r = train(run, out, 1, "--exit-after-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[len(rows) // 2:] + rows[: len(rows) // 2]) + "\n")  # other rows first

    r = train(run, out, 1, "--resume")
    assert r.returncode == 2 and error_lines(r) == [
        f"{PREFIX}--resume: the training data changed since {out}/checkpoints/global_step2 was saved (--data {data} "
        f"now tokenises to other rows); pass --resume-data-changed ok to continue on the new data from its start, "
        f"or use a new --out"], r.stderr[-3000:]

    r = train(run, out, 1, "--resume", "--resume-data-changed", "ok", "--lr", "3e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training continues at step 2 from the start of the new data (epoch 0)" in r.stderr
    applied = next(line for line in r.stderr.splitlines() if "--resume with changed settings (applied): " in line)
    assert "--lr 0.0001 -> 0.0003" in applied and "--exit-after-steps 2 -> None" in applied
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr3 = next(rec["train/lr"] for rec in recs if rec.get("step") == 3 and "train/lr" in rec)
    assert lr3 == pytest.approx(3e-4 * lr_lambda(0, 4, 0.1)(2), rel=1e-9)
    recorded = flatten_sections(yaml.safe_load((out / "train_args.yaml").read_text()), TrainArgs)
    assert recorded["lr"] == 3e-4 and recorded["resume_data_changed"] == "ok"
