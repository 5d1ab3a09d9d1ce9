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
from pathlib import Path

import pytest
import torch

from tiny import make_jsonl, make_moe, make_tokenizer

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PREFIX = "upcycle-ds train: error: "


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        env.pop(var, None)
    return env


def train(tiny, out: Path, nproc: int, *flags: str, model: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "upcycle-ds"), "train", "--nproc", str(nproc), "--model", str(model or tiny["moe"]), "--data",
           str(tiny["data"]), "--out", str(out), "--ep-size", str(nproc), "--zero-stage", "1", "--dtype", "fp32",
           "--max-steps", "4", "--save-every", "1", "--micro-batch-size", "2", "--max-length", "64",
           "--wandb-mode", "disabled", "--no-export-hf", "--eval-fraction", "0", *flags]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


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
