"""Device discipline of the training step, made visible on a CPU (which cannot see a device bug by itself):

1. static: no tensor factory in the step path (moe/, the Trainer, its metrics) without an explicit device — every new
   tensor is on the device of what it is derived from (`new_*`, `*_like`, `device=`);
2. runtime, on 2 real DeepSpeed ranks at ep=2 (a 4-layer MoE): every tensor handed to a torch.distributed collective
   is on the engine's device; our code makes no collective in the step but the expert all_to_alls and (with
   --aux-loss-scope global, used here) one all_reduce of the expert counts per micro-step, and exactly one
   all_reduce per logging step; host syncs made by our code (`.item()`, `.tolist()`, `float/int/bool(tensor)`,
   `repeat_interleave` without `output_size`) are at most one per MoE layer per forward, plus one per logging step.
   (tests/dist_scripts/trainer_step_probe.py instruments torch in the test process only.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import make_jsonl, make_moe, make_tokenizer

PKG = Path(__file__).resolve().parents[1] / "upcycle_ds"
STEP_PATH = sorted((PKG / "moe").glob("*.py")) + [PKG / "train" / "trainer.py", PKG / "train" / "metrics.py"]
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "eye", "linspace"}


def factory_calls_without_device(path: Path) -> list[str]:
    """torch.<factory>(...) calls without device= — outside `__init__` (modules are constructed under a device
    context, on the meta device, and materialised on the rank's device; their parameters are not step tensors)."""
    tree = ast.parse(path.read_text())
    in_init = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
               for n in ast.walk(f)}
    bad = []
    for node in ast.walk(tree):
        if id(node) in in_init:
            continue
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        if f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch":
            if not any(k.arg == "device" for k in node.keywords):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} torch.{f.attr}(...) without device=")
    return bad


def test_step_path_creates_no_tensor_without_a_device():
    assert len(STEP_PATH) >= 5
    bad = [b for p in STEP_PATH for b in factory_calls_without_device(p)]
    assert bad == [], "\n".join(bad)


def test_the_static_check_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import torch\na = torch.zeros(3)\nb = torch.zeros(3, device=x.device)\nc = x.new_zeros(3)\n")
    f = f.rename(PKG / "_probe_tmp.py")
    try:
        assert [b.split(" ", 1)[0] for b in factory_calls_without_device(f)] == ["upcycle_ds/_probe_tmp.py:2"]
    finally:
        f.unlink()


@pytest.mark.slow
def test_collectives_on_device_and_host_sync_budget(tmp_path):
    from upcycle_ds.launch.distributed import free_port

    moe = make_moe("mixtral", tmp_path / "moe", num_experts=4, top_k=2, num_hidden_layers=4)
    make_tokenizer(moe)
    data = make_jsonl(tmp_path / "train.jsonl", 120)
    steps = 2
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(moe), "data": str(data), "out": str(tmp_path / "run"), "ep_size": 2,
                                   "zero_stage": 2, "dtype": "fp32", "micro_batch_size": 2, "grad_accum": 2,
                                   "max_length": 64, "max_steps": 10, "wandb_mode": "disabled", "log_every": steps,
                                   "eval_fraction": 0.0, "aux_loss_scope": "global"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "dist_scripts" / "trainer_step_probe.py"), str(cfg), str(tmp_path), str(steps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in range(2):
        rec = json.loads((tmp_path / f"probe_rank{rank}.json").read_text())
        device, layers, forwards = rec["device"], rec["moe_layers"], rec["forwards"]
        assert layers == 4 and forwards == steps * 2
        colls = [c for c in rec["collectives"] if c["phase"] in ("step", "log")]
        assert colls, "no collective recorded: the probe is broken"
        off = [c for c in colls if any(d != device for d in c["devices"])]
        assert off == [], off
        ours_step = [c for c in colls if c["ours"] and c["phase"] == "step"]
        assert {c["name"] for c in ours_step} == {"all_to_all_single", "all_reduce"}, ours_step
        aux_reduces = [c for c in ours_step if c["name"] == "all_reduce"]
        assert len(aux_reduces) == forwards and {c["where"].split(":")[0] for c in aux_reduces} == {"balance.py"}
        ours_log = [c["name"] for c in colls if c["ours"] and c["phase"] == "log"]
        assert ours_log == ["all_reduce"], ours_log
        # the data pipeline builds micro-batches on the host before they are moved to the device: not device syncs
        host_side = ("data/",)
        step_syncs = [s for s in rec["syncs"] if s["phase"] == "step" and not s["where"].startswith(host_side)]
        log_syncs = [s for s in rec["syncs"] if s["phase"] == "log"]
        assert len(step_syncs) <= layers * forwards, step_syncs
        assert len(log_syncs) <= 1, log_syncs
