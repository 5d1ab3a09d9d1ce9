"""A fine-grained MoE downstream, on real ranks: a tiny Qwen2 upcycled into 16 experts (G=4 slices x C=4 copies, top-4)
with a shared expert trains under `upcycle-ds train` (2 CPU ranks, ep_size 2, ZeRO-2); its DeepSpeed checkpoint
converts exactly to HF and back at another ep size; and it merges back to a dense Qwen2 (router-weighted, routing
frequencies measured on the calibration data) that transformers loads, with the calibration losses of the MoE, the
merged dense model and the original dense model reported side by side.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from cli_proc import cli, cli_env
from tiny import make_dense, make_jsonl, make_tokenizer

from upcycle_ds.cli import main
from upcycle_ds.io.hf import HFCheckpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
G, C, K, N_LAYERS = 4, 4, 4, 4
E = G * C


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("granular_train")
    dense = make_dense("qwen2", root / "dense")
    make_tokenizer(dense)
    data = make_jsonl(root / "train.jsonl", 200)
    moe = root / "moe"
    assert main(["upcycle", "--model", str(dense), "--out", str(moe), "--num-experts", str(E), "--top-k", str(K),
                 "--granularity", str(G), "--shared-fraction", "0.25", "--router-noise", "0.01"]) == 0
    out = root / "run"
    env = cli_env(drop=("WANDB_MODE",))
    cmd = [*cli("train"), "--nproc", "2", "--model", str(moe), "--data", str(data), "--out",
           str(out), "--ep-size", "2", "--zero-stage", "2", "--dtype", "fp32", "--max-steps", "6",
           "--micro-batch-size", "2", "--lr", "1e-3", "--max-length", "128", "--seed", "0", "--wandb-mode",
           "disabled"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root, "dense": dense, "data": data, "moe": moe, "out": out}


def test_trains_with_16_fine_grained_experts_on_2_ranks(run):
    losses = [json.loads(line)["train/loss"] for line in (run["out"] / "metrics.jsonl").read_text().splitlines()
              if '"train/loss"' in line]
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5, losses
    tag = run["out"] / "checkpoints" / (run["out"] / "checkpoints" / "latest").read_text().strip()
    files = {p.name for p in tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt")}
    assert files == {f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt" for L in range(N_LAYERS) for e in range(E)}
    cfg = json.loads((run["out"] / "hf" / "config.json").read_text())
    assert cfg["num_experts"] == E and cfg["moe_intermediate_size"] * G + cfg["shared_expert_intermediate_size"] == 96
    model = transformers.AutoModelForCausalLM.from_pretrained(run["out"] / "hf", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"


def test_trained_checkpoint_round_trips_at_another_ep_size(run, tmp_path):
    ckpt = run["out"] / "checkpoints"
    assert main(["convert", "--input", str(ckpt), "--output", str(tmp_path / "ep4"), "--to", "ds",
                 "--ep-size", "4"]) == 0
    assert main(["convert", "--input", str(tmp_path / "ep4"), "--output", str(tmp_path / "hf"), "--to",
                 "hf-moe"]) == 0
    a, b = HFCheckpoint(run["out"] / "hf"), HFCheckpoint(tmp_path / "hf")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_router_weighted_merge_loads_and_reports_losses(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["convert", "--input", str(run["out"] / "checkpoints"), "--output", str(out), "--to", "hf-dense",
                 "--merge", "router-weighted", "--calib-data", str(run["data"]), "--calib-max-rows", "32",
                 "--calib-baseline", str(run["dense"])]) == 0
    line = [l for l in capsys.readouterr().err.splitlines() if l.startswith("calibration loss")]
    print("\n" + line[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.intermediate_size == 96

    report = json.loads((out / "merge_report.json").read_text())
    calib = report["calibration"]
    loss = calib["loss"]
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["moe"] < loss["baseline"] and loss["merged"] < loss["baseline"]  # the merge keeps part of the gain
    for layer in map(str, range(N_LAYERS)):
        rec = report["layers"][layer]
        assert sum(rec["tokens_per_expert"]) == calib["tokens"] * K  # every token's k slots counted once
        w = torch.tensor(rec["weights"], dtype=torch.float64)  # (C, G): per slice group, weights over the copies
        torch.testing.assert_close(w.sum(0), torch.ones(G, dtype=torch.float64), rtol=0, atol=1e-12)
        counts = torch.tensor(rec["tokens_per_expert"], dtype=torch.float64).view(C, G)
        torch.testing.assert_close(w, counts / counts.sum(0), rtol=0, atol=1e-12)
        assert 0 < rec["shared_gate"] < 1 and rec["shared_gate"] == rec["measured_shared_gate"]
