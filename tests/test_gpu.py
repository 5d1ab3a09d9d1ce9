"""On a CUDA GPU (`pytest -m gpu`; bench/gpu/run.sh runs them on a lent GPU machine): the training path on the device
it is written for. Skipped, with the reason, where torch sees no CUDA device (CI, the 2-core dev machines) — except
in the CPU rehearsal of bench/gpu/run.sh (`REHEARSE=cpu`), which sets UPCYCLE_DS_GPU_TESTS_DEVICE=cpu and runs the
same tests, code paths and assertions on the CPU, with only what needs CUDA (MFU and GPU memory in the step line)
left out.

- our DeepSpeed-MoE layer computes what transformers' Mixtral computes, on the device, in fp32 (<= 1e-4, TF32 off)
  and in bf16 (<= 5e-2 absolute on logits of magnitude ~1: different but equally valid bf16 rounding orders);
- grouped-GEMM experts == the per-expert loop (bf16 <= 2e-2; the grouped kernel accumulates in a different order),
  the grouped operands viewing the experts' buffer (no copy);
- `upcycle-ds train --nproc 1` (the launcher) in bf16 at ZeRO-1: the start line names the accelerator the hardware
  has, the loss falls over 5 steps, the step line reports MFU and GPU memory, and the HF export loads in
  transformers on the device and gives the trained engine's logits (<= 5e-2; the export's bf16 weights run in fp32);
- ZeRO-2 in bf16, one rank in-process (no launcher): a run stopped after 3 steps and resumed gives the uninterrupted
  run's losses exactly.
Four training processes in all (bench/gpu/run.sh's time budget).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from cli_proc import cli, cli_env
from tiny import input_ids, make_jsonl, make_moe, make_tokenizer

DEVICE = os.environ.get("UPCYCLE_DS_GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (bench/gpu/run.sh; REHEARSE=cpu runs them on the CPU)")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    moe = make_moe("mixtral", root / "moe", num_experts=4, top_k=2)
    make_tokenizer(moe)
    return {"root": root, "moe": moe, "data": make_jsonl(root / "train.jsonl", 200)}


def _ours(ckpt: Path, dtype, expert_impl: str | None = None):
    from upcycle_ds.io.hf import HFCheckpoint
    from upcycle_ds.surgery import build_moe_model

    return build_moe_model(HFCheckpoint(ckpt), dtype=dtype, device=DEVICE, expert_impl=expert_impl).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_moe_layer_equals_transformers_on_the_device(tiny, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["moe"], dtype=dtype).to(DEVICE).eval()
    ours = _ours(tiny["moe"], dtype)
    assert all(p.device.type == DEVICE and p.dtype == dtype for p in ours.parameters())
    x = input_ids().to(DEVICE)
    with torch.no_grad():
        err = (ours(input_ids=x).logits.float() - hf(input_ids=x).logits.float()).abs().max().item()
    assert err <= tol, err


def test_grouped_experts_equal_loop_on_the_device(tiny):
    from upcycle_ds.moe.experts import stacking_is_zero_copy
    from upcycle_ds.moe.layer import moe_layers

    x = input_ids(batch=4, seq=64).to(DEVICE)
    grouped_model = _ours(tiny["moe"], torch.bfloat16, "grouped")
    assert all(stacking_is_zero_copy(moe.local_experts) for _, moe in moe_layers(grouped_model))
    with torch.no_grad():
        loop = _ours(tiny["moe"], torch.bfloat16, "loop")(input_ids=x).logits.float()
        grouped = grouped_model(input_ids=x).logits.float()
    assert (loop - grouped).abs().max().item() <= 2e-2


def _train(tiny, out: Path, zero: int, *flags: str) -> subprocess.CompletedProcess:
    cmd = cli("train", "--model", tiny["moe"], "--data", tiny["data"], "--out", out, "--zero-stage", zero, "--dtype",
              "bf16", "--max-steps", 5, "--micro-batch-size", 2, "--max-length", 128, "--lr", "1e-3", "--seed", 0,
              "--wandb-mode", "disabled", *flags)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_bf16_training_through_the_launcher_and_export(tiny):
    full = tiny["root"] / "full1"
    r = _train(tiny, full, 1, "--nproc", "1", "--debug-dump-logits")
    start = next(line for line in r.stderr.splitlines() if "launching 1 rank" in line)
    assert f"accelerator {DEVICE} " in start, start
    assert f"1 ranks on {DEVICE}" in r.stderr, r.stderr[-2000:]
    losses = _losses(full)
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    if DEVICE == "cuda":
        assert "MFU" in r.stderr and "GiB" in r.stderr, r.stderr[-2000:]

    # the export's bf16 weights in an fp32 forward: transformers' router in bf16 rounds near-ties differently from
    # ours (fp32 softmax) and picks other experts for a token now and then, which moves the later positions' logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(full / "hf", dtype=torch.float32).to(DEVICE).eval()
    dump = torch.load(full / "debug" / "final_logits_rank0.pt", weights_only=True)
    with torch.no_grad():
        # use_cache=False: with a cache transformers does not turn the packed rows' position_ids into a
        # block-diagonal mask (the engine's forward runs without one)
        got = hf(input_ids=dump["input_ids"].to(DEVICE), position_ids=dump["position_ids"].to(DEVICE),
                 use_cache=False).logits.float().cpu()
    assert (got - dump["logits"]).abs().max().item() <= 5e-2


def test_bf16_resume_is_exact(tiny):
    full, split = tiny["root"] / "full2", tiny["root"] / "split2"
    _train(tiny, full, 2, "--save-every", "3", "--no-export-hf")
    losses = _losses(full)
    assert len(losses) == 5, losses
    _train(tiny, split, 2, "--save-every", "3", "--exit-after-steps", "3", "--no-export-hf")
    _train(tiny, split, 2, "--save-every", "3", "--resume", "--no-export-hf")
    assert _losses(split) == losses
