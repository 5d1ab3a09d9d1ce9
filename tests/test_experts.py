"""Grouped-GEMM experts against the per-expert loop (the reference: one nn.Linear call per expert), on one
`UpcycledMoE` layer: outputs and every gradient (input, router, each expert weight) in fp32 at 1e-6, k=1 and k=2,
with experts that receive no tokens, an empty batch, and capacity drops; bf16 within a stated bound. Plus the
device discipline of moe/: host reads per forward (counted at runtime) and tensor factories without a device
(read from the source). The same comparisons on 2 ranks (ep=2) run in dist_scripts/moe_layer_ep2.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from host_syncs import count_host_syncs
from moe_cases import E, H, I, assert_same, make_input, make_layer, run

from upcycle_ds.launch.distributed import free_port
from upcycle_ds.moe import experts as experts_mod
from upcycle_ds.moe.experts import grouped_mm_available, resolve_expert_impl, stacking_is_zero_copy
from upcycle_ds.moe.layer import UpcycledMoE

MOE_DIR = Path(experts_mod.__file__).parent


def test_grouped_gemm_runs_here():
    """CI's torch must run the grouped path on CPU, or every comparison below would compare the loop with itself."""
    assert grouped_mm_available("cpu", torch.float32) and grouped_mm_available("cpu", torch.bfloat16)
    assert resolve_expert_impl("grouped", torch.device("cpu"), torch.float32, H, I) == "grouped"
    assert not grouped_mm_available("cpu", torch.float64)


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "drops"])
@pytest.mark.parametrize("starve", [(), (1,)], ids=["all-experts", "expert1-no-tokens"])
@pytest.mark.parametrize("k", [1, 2])
def test_grouped_equals_loop_fp32(k, starve, capacity_factor):
    moe = make_layer(k, capacity_factor=capacity_factor, starve=starve)
    x = make_input(96)
    grouped = run(moe, x, "grouped")
    stats = moe.router.stats
    loop = run(moe, x, "loop")
    assert_same(grouped, loop, tol=1e-6)
    # the cases are what they say
    assert (stats.dropped > 0).item() == (capacity_factor is not None)
    for e in starve:
        assert stats.tokens_per_expert[e].item() == 0
        assert torch.all(grouped[1][f"deepspeed_moe.experts.deepspeed_experts.{e}.gate_proj.weight"] == 0)


def _flatten_like_deepspeed(modules) -> None:
    """What DeepSpeed's ZeRO-1/2 and bf16 optimizers do to a parameter group: one flat buffer, each parameter a view
    of it (deepspeed.runtime.bf16_optimizer._update_storage_to_flattened_tensor)."""
    params = [p for m in modules for p in m.parameters()]
    flat = _flatten_dense_tensors([p.data for p in params])
    for p, view in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
        p.data = view


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "drops"])
def test_zero_copy_stacking_when_parameters_share_one_buffer(capacity_factor):
    moe = make_layer(2, capacity_factor=capacity_factor, starve=(3,))
    x = make_input(96)
    copied = run(moe, x, "grouped")
    assert not stacking_is_zero_copy(moe.local_experts)
    _flatten_like_deepspeed(moe.local_experts)
    assert stacking_is_zero_copy(moe.local_experts)
    viewed = run(moe, x, "grouped")
    assert_same(viewed, copied, tol=0)
    assert_same(viewed, run(moe, x, "loop"), tol=1e-6)
    # experts in another order in the buffer: not evenly spaced as gate_0, up_0, down_0, gate_1, ...: copied again
    _flatten_like_deepspeed(list(moe.local_experts)[::-1])
    assert not stacking_is_zero_copy(moe.local_experts)
    assert_same(run(moe, x, "grouped"), copied, tol=0)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_empty_batch_gives_every_expert_a_zero_gradient(impl):
    moe = make_layer(2)
    run(moe, make_input(0), impl)
    with count_host_syncs() as syncs:
        out, grads = run(moe, make_input(0), impl)
    assert dict(syncs) == {} and out.shape == (0, H)
    for name, g in grads.items():
        assert g is not None and torch.all(g == 0), name


def test_grouped_equals_loop_bf16():
    """bf16 bound: one bf16 ulp at each tensor's scale (2**-7 of its largest magnitude). Measured on CPU: outputs and
    router / expert gradients are bitwise equal; the input gradient differs by ~0.4 of that bound, because the
    grouped path adds the gate and up contributions inside one fp32-accumulated GEMM where the loop rounds each to
    bf16 first."""
    moe = make_layer(2, capacity_factor=0.75).to(torch.bfloat16)
    x = make_input(128, dtype=torch.bfloat16)
    assert_same(run(moe, x, "grouped"), run(moe, x, "loop"), tol=2 ** -7)


def test_grouped_equals_loop_under_autocast():
    """fp32 weights under CPU autocast(bf16): the grouped path casts like nn.Linear does."""
    moe = make_layer(2)
    x = make_input(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = run(moe, x, "grouped")
        loop = run(moe, x, "loop")
    assert grouped[0].dtype == torch.float32
    assert_same(grouped, loop, tol=2 ** -7)


def test_unaligned_shapes_fall_back_to_the_loop():
    moe = make_layer(2, hidden=18, inter=30)  # rows of 72 / 120 bytes: not 16-byte aligned
    x = make_input(40, hidden=18)
    with pytest.warns(UserWarning, match="multiples of 4"):
        grouped = run(moe, x, "grouped")
    torch.testing.assert_close(grouped[0], run(moe, x, "loop")[0], rtol=0, atol=0)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="expert_impl must be one of"):
        UpcycledMoE(hidden_size=H, intermediate_size=I, num_experts=E, top_k=2, expert_impl="fused")


@pytest.mark.parametrize("impl,expected", [("grouped", {}), ("loop", {"Tensor.tolist": 1})])
@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "drops"])
def test_host_reads_per_forward_ep1(impl, expected, capacity_factor):
    """ep=1: the grouped path reads nothing back to the host, the loop only its chunk sizes; backward reads
    nothing. Router statistics stay device tensors."""
    moe = make_layer(2, capacity_factor=capacity_factor)
    moe.expert_impl = impl
    x = make_input(64).requires_grad_()
    moe(x)  # first call: the capability probe runs once, outside the count
    with count_host_syncs() as fwd:
        out = moe(x)
        loss = out.square().sum() + 0.01 * moe.router.aux_loss + 0.001 * moe.router.z_loss
    with count_host_syncs() as bwd:
        loss.backward()
    assert dict(fwd) == expected and dict(bwd) == {}
    s = moe.router.stats
    for t, dtype in ((s.tokens_per_expert, torch.int64), (s.dropped, torch.int64), (s.aux_loss, torch.float32),
                     (s.z_loss, torch.float32), (s.entropy, torch.float32)):
        assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == x.device and not t.requires_grad
    assert s.tokens_per_expert.shape == (E,) and s.slots == 64 * 2


FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "eye", "linspace",
             "empty_strided", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like"}


def test_moe_tensor_factories_name_a_device():
    """Every torch.<factory>(...) in upcycle_ds/moe/ passes device= (or is a *_like of a tensor it follows)."""
    offenders = []
    for path in sorted(MOE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES):
                continue
            if node.func.attr.endswith("_like") or any(kw.arg == "device" for kw in node.keywords):
                continue
            offenders.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert offenders == []


@pytest.mark.slow
def test_grouped_equals_loop_ep2_on_two_ranks(tmp_path):
    """ep=2 on 2 real CPU ranks (gloo): every case of dist_scripts/moe_layer_ep2.py (k=1/2, an expert and a whole
    rank receiving no tokens, a rank sending none, capacity drops; zero-copy stacking under DeepSpeed ZeRO-1)
    passes on both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "dist_scripts" / "moe_layer_ep2.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "done.txt").read_text().split() == [
        "k1", "k2", "k2-expert1-no-tokens", "k2-rank1-receives-nothing", "k2-rank1-sends-nothing", "k1-drops",
        "k2-drops-expert3-no-tokens", "zero1-bf16-zero-copy"]


@pytest.mark.slow
def test_grouped_experts_stay_zero_copy_where_deepspeed_would_split_a_layer(tmp_path):
    """The model as training builds it, under DeepSpeed engines with the training ds_config and optimizer groups, at
    ZeRO 0/1/2 in bf16 and ZeRO-0 in fp32, with the MoE group cap lowered below two layers' experts (73,728 elements
    each, cap 100,000): DeepSpeed's own split would put layer 1's experts in two flat buffers (so the grouped path
    would copy them at every forward); `optimizer_groups` keeps each layer in one group and the grouped operands
    are views at every stage, before and after a step, computing what the loop computes (dist_scripts/
    expert_groups_zero_copy.py, one process)."""
    from tiny import make_moe

    moe = make_moe("mixtral", tmp_path / "moe", num_experts=4, top_k=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "dist_scripts" / "expert_groups_zero_copy.py"),
                        str(moe), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["layer_numel"] == 73_728 and res["deepspeed_split"]["1"] == 2, res  # the premise: a layer straddles
    for case in ("zero0-bf16", "zero1-bf16", "zero2-bf16", "zero0-fp32"):
        c = res[case]
        assert set(c["groups"].values()) == {1}, (case, c)  # every layer in one optimizer group
        assert all(c["zero_copy_at_init"]) and all(c["zero_copy_after_step"]), (case, c)
        assert c["grouped_vs_loop"] <= (5e-2 if "bf16" in case else 1e-5), (case, c)
