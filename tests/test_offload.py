"""`--offload-optimizer` (DeepSpeed ZeRO-Offload, stepped by our torch AdamW on the host) and what `upcycle-ds plan`
says about it: GPU and host bytes against DeepSpeed's own estimator and against the optimizer's tensors of real runs,
losses against the same runs without offload, exact and elastic resumes, the HF export (docs/training.md,
docs/planning.md).

Every multi-rank figure comes from one 2-rank launch (`dist_scripts/offload_probe.py`): per-rank optimizer-state
bytes for ep 1/2 x ZeRO 1/2 x offload off/on (bf16), four 6-step fp32 runs (ZeRO-1/2, offload off/on; the offloaded
ZeRO-2 one exported) and four resumes of their step-3 checkpoints. Bad input (ZeRO-0, too little host memory) is in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from tiny import make_jsonl, make_moe, make_tokenizer

from upcycle_ds.cli import main
from upcycle_ds.plan import (Setup, count_params, largest_param, load_config, make_plan, model_states,
                             shape_from_config, smallest_fit, suggestions, upcycled_shape)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"llama3-8b-shape": "mixtral", "qwen3-8b-shape": "qwen3_moe", "mistral-7b-shape": "mixtral"}
NODE = dict(nodes=1, gpus_per_node=8, micro_batch_size=1, seq_len=4096, dtype="bf16", activation_checkpointing=True)
TOL = 1e-5
"""fp32 loss tolerance: offloaded and GPU-resident runs take the same fused AdamW steps (torch's kernel on either
device) from gradients summed in another order; measured <= 1e-7 relative (test_elastic.py allows the same)."""


# ---------------------------------------------------------------------------------------------- plan, in-process
def test_offloaded_gpu_states_match_deepspeed_estimator():
    """No experts, ZeRO-2 offloaded, bf16: DeepSpeed's estimate_zero2_model_states_mem_needs(cpu_offload=True) keeps
    2P on the GPU (the bf16 parameters); so do our parameter + gradient + optimizer + fp32 step-gradient rows."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = 1_234_567_890
    for nodes, gpus in ((1, 1), (1, 8), (4, 8)):
        setup = Setup(nodes=nodes, gpus_per_node=gpus, zero_stage=2, dtype="bf16", offload_optimizer=True)
        rows = model_states(P, 0, setup)
        ours = sum(rows[k][0] for k in ("params", "grads", "optim", "step_grads"))
        _, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=True)
        assert ours == gpu, (nodes, gpus, ours, gpu)


@pytest.mark.parametrize("name", list(SHAPES))
def test_8b_times_8_experts_fits_one_node_only_offloaded(name):
    """The headline job (docs/planning.md): an 8B dense model upcycled to 8 experts top-2, one node of 8 x 80 GB,
    micro batch 1 x 4096, bf16, checkpointing: no layout fits on the GPUs alone; the search offloads the optimizer,
    and the node's ranks then need 0.75-0.8 TiB of host memory (fits the default 2 TiB node, not a 0.5 TiB one)."""
    shape = upcycled_shape(load_config(ROOT / "examples" / name), num_experts=8, top_k=2)
    assert shape.model_type == SHAPES[name]
    grid = suggestions(shape, Setup(**NODE), 80, 0.1)
    assert not any(p.fits(80, 0.1) for (ep, st, ac, off), p in grid.items() if not off)
    best = smallest_fit(grid, 80, 0.1, True, False, host_memory_gb=2048)
    assert best is not None and best[3], best
    plan = grid[best]
    assert plan.fits_gpu(80, 0.1) and 750 * 2**30 < plan.host_per_node < 820 * 2**30, plan.host_per_node / 2**30
    # every element of the model's optimizer state is on one node: (12 + 4 + 2) bytes per parameter, + staging
    c = count_params(shape)
    assert plan.host_per_node == pytest.approx(18 * c.total + 8 * 2 * largest_param(shape), rel=1e-9)
    assert smallest_fit(grid, 80, 0.1, True, False, host_memory_gb=512) is None
    assert 1 < plan.offload.total_s < 30  # an estimate: seconds per optimizer step at this size


def test_plan_cli_offload(capsys):
    rc = main(["plan", "--model", str(ROOT / "examples" / "llama3-8b-shape"), "--num-experts", "8", "--top-k", "2",
               "--ep-size", "8", "--zero-stage", "2", "--micro-batch-size", "1", "--max-length", "4096",
               "--activation-checkpointing", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and not res["fits"] and res["host"] is None
    assert res["suggestion"] == {"ep_size": 2, "zero_stage": 2, "activation_checkpointing": True,
                                 "offload_optimizer": True}
    assert res["train_command"].endswith("--activation-checkpointing --offload-optimizer --num-experts 8 --top-k 2 "
                                         "--layers all")
    rc = main(["plan", "--model", str(ROOT / "examples" / "llama3-8b-shape"), "--num-experts", "8", "--top-k", "2",
               "--ep-size", "8", "--zero-stage", "2", "--micro-batch-size", "1", "--max-length", "4096",
               "--activation-checkpointing", "--offload-optimizer", "--grad-accum", "4"])
    text = capsys.readouterr().out
    assert rc == 0 and "-> FITS (24.25 GiB peak)" in text
    for line in ("host memory per rank", "gradient accumulator", "host memory per node: 8 ranks x",
                 "offload step time (estimate for a GPU node)"):
        assert line in text, line
    assert "--grad-accum 4 --activation-checkpointing --offload-optimizer" in text


# ------------------------------------------------------------------------------------- one 2-rank launch
@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from upcycle_ds.launch.distributed import free_port

    root = tmp_path_factory.mktemp("offload")
    moe = make_moe("mixtral", root / "moe", num_experts=4, top_k=2, num_hidden_layers=2)
    make_tokenizer(moe)
    data = make_jsonl(root / "train.jsonl", 200)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "dist_scripts" / "offload_probe.py"), str(moe), str(data), str(root)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"root": root, "config": load_config(moe)}


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _plan(probe, ep: int, stage: int, off: bool):
    return make_plan(shape_from_config(probe["config"]),
                     Setup(nodes=1, gpus_per_node=2, ep_size=ep, zero_stage=stage, dtype="bf16", micro_batch_size=2,
                           seq_len=64, offload_optimizer=off))


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("off", [False, True], ids=["gpu", "offloaded"])
def test_optimizer_bytes_match_the_plan(probe, ep, stage, off):
    """Per rank, read from the optimizer's tensors after a step: fp32 master partition + AdamW moments of the
    non-expert and expert param groups within 2% of the plan's optimizer-state row (on the host when offloaded); the
    other offload buffers against the plan's host rows and its device staging row; and no gradient partition kept
    on the device between backward and the optimizer step when offloaded (the plan's ZeRO-2 gradient row is 0)."""
    plan = _plan(probe, ep, stage, off)
    want = plan.host["host_optim"] if off else plan.rows["optim"]
    for rank in range(2):
        rec = json.loads((probe["root"] / f"memory_rank{rank}.json").read_text())[
            f"ep{ep}_z{stage}_{'off' if off else 'gpu'}"]
        assert rec["offloaded"] is off
        for part in ("non_expert", "expert"):
            assert rec["state"][part] == pytest.approx(getattr(want, part), rel=0.02), (rank, part, rec)
        if off:
            for key in ("host_grads", "host_weights", "host_staging"):
                assert rec[key] == pytest.approx(plan.host[key].total, rel=0.02), (rank, key, rec)
            assert rec["device_staging"] == plan.rows["offload_buf"].total
            assert rec["held_grads"] == 0
            assert stage == 1 or plan.rows["grads"].total == 0
        else:
            assert rec["host_grads"] == rec["host_weights"] == rec["device_staging"] == 0
            g = replace(plan.setup, zero_stage=2)  # stage 1 keeps only its partition once backward has ended
            assert rec["held_grads"] == pytest.approx(make_plan(shape_from_config(probe["config"]), g).rows[
                "grads"].total, rel=0.02)


@pytest.mark.slow
def test_zero2_partitions_expert_state_over_expert_dp_at_ep1(probe):
    """ep 1 on 2 ranks: both ranks hold every expert, so the expert-data-parallel group is both ranks and ZeRO-2
    must split the experts' optimizer state in two (DeepSpeed issue reports say it may not): each rank holds half
    of 12 bytes x all expert parameters, as the plan assumes, in the expert param groups."""
    experts = count_params(shape_from_config(probe["config"])).expert
    for off in ("gpu", "off"):
        for rank in range(2):
            rec = json.loads((probe["root"] / f"memory_rank{rank}.json").read_text())[f"ep1_z2_{off}"]
            assert rec["state"]["expert"] == pytest.approx(12 * experts / 2, rel=0.02), (off, rank, rec)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_offloaded_losses_equal_the_gpu_resident_run(probe, stage):
    got, want = losses(probe["root"] / f"z{stage}_off"), losses(probe["root"] / f"z{stage}")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    diffs = {s: rel(got[s], want[s]) for s in want}
    print(f"ZeRO-{stage} offloaded vs not, relative loss differences: {diffs}")
    assert diffs[1] <= 1e-6 and max(diffs.values()) <= TOL, diffs


@pytest.mark.slow
def test_offloaded_resume_is_exact(probe):
    """Saved and resumed with the optimizer offloaded and the same layout (DeepSpeed's own load): bit-exact."""
    got, want = losses(probe["root"] / "z2_off_same"), losses(probe["root"] / "z2_off")
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("run,src", [("z2_off_to_z2", "z2_off"), ("z2_off_to_z1", "z2_off"), ("z1_to_z2_off", "z1")])
def test_resume_between_offloaded_and_not(probe, run, src):
    """An offloaded ZeRO-2 checkpoint resumed on the GPU as ZeRO-2 (DeepSpeed's own load) and as ZeRO-1, and a ZeRO-1
    one resumed offloaded as ZeRO-2 (those two: `train.elastic`): right after loading, the optimizer holds the
    checkpoint's AdamW moments (their sums over all ranks equal those of the saved files), and the losses continue
    the run the checkpoint came from."""
    from upcycle_ds.io.ds_optim import open_saved_optimizer

    saved = open_saved_optimizer(probe["root"] / src / "checkpoints" / "global_step3")
    want = torch.zeros(2, dtype=torch.float64)
    for name in saved.names():
        st = saved.get(name)
        want += torch.stack([st.exp_avg.double().abs().sum(), st.exp_avg_sq.double().sum()])
    got = json.loads((probe["root"] / "resume.json").read_text())[run]
    assert want.min() > 0 and got == pytest.approx(want.tolist(), rel=1e-6)
    ours, ref = losses(probe["root"] / run), losses(probe["root"] / src)
    assert sorted(ours) == sorted(ref) == list(range(1, 7))
    diffs = {s: rel(ours[s], ref[s]) for s in range(4, 7)}
    print(f"{run} vs {src}, relative loss differences after the resume: {diffs}")
    assert diffs[4] <= 1e-6 and max(diffs.values()) <= TOL, diffs


@pytest.mark.slow
def test_offloaded_run_exports_the_trained_model(probe):
    """OUT/hf of the offloaded ZeRO-2 run, in transformers, computes the logits the trained engine computed
    (--debug-dump-logits), and they are not the initial model's."""
    run = probe["root"] / "z2_off"
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    initial = transformers.AutoModelForCausalLM.from_pretrained(probe["root"] / "moe", dtype=torch.float32).eval()
    for rank in range(2):
        dump = torch.load(run / "debug" / f"final_logits_rank{rank}.pt", weights_only=True)
        with torch.no_grad():
            got = model(input_ids=dump["input_ids"], position_ids=dump["position_ids"], use_cache=False).logits
            before = initial(input_ids=dump["input_ids"], position_ids=dump["position_ids"], use_cache=False).logits
        assert (got - dump["logits"]).abs().max() <= 1e-5
        assert (before - dump["logits"]).abs().max() > 1e-2
