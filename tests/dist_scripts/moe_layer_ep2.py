"""Run on 2 ranks (torchrun): one `UpcycledMoE` layer at ep_size=2, grouped-GEMM experts against the per-expert loop
in every case below (output and every gradient at 1e-6 in fp32), the host reads of each forward and backward
(exactly one `.tolist()` per forward, none in backward), and, where routing is dropless, both against the same
layer at ep_size=1 in this process on both ranks' tokens; last, under a real DeepSpeed engine (ZeRO-1, bf16), that
the grouped path views the experts' weights in DeepSpeed's flat buffer instead of copying them. Exits non-zero on
the first mismatch; rank 0 writes OUT_DIR/done.txt (one line per case) when every case passed on both ranks.

usage: moe_layer_ep2.py OUT_DIR
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_syncs import count_host_syncs  # noqa: E402
from moe_cases import (H, assert_close_at_scale, assert_same, make_input, make_layer, run,  # noqa: E402
                       shard_layer)

from upcycle_ds.launch.distributed import init_distributed, shutdown  # noqa: E402
from upcycle_ds.moe.experts import stacking_is_zero_copy  # noqa: E402

# name: (k, capacity_factor, starved experts, tokens on rank 0, tokens on rank 1)
CASES = {
    "k1": (1, None, (), 48, 40),
    "k2": (2, None, (), 48, 40),
    "k2-expert1-no-tokens": (2, None, (1,), 48, 40),
    "k2-rank1-receives-nothing": (2, None, (2, 3), 48, 40),
    "k2-rank1-sends-nothing": (2, None, (), 48, 0),
    "k1-drops": (1, 0.5, (), 48, 40),
    "k2-drops-expert3-no-tokens": (2, 0.5, (3,), 48, 40),
}

out_dir = Path(sys.argv[1])
init_distributed()
rank = dist.get_rank()
done = []
for name, (k, cf, starve, *tokens) in CASES.items():
    full = make_layer(k, capacity_factor=cf, starve=starve)
    moe = shard_layer(full, 2, rank)
    x = make_input(tokens[rank], seed=rank)

    results = {}
    for impl in ("grouped", "loop"):
        run(moe, x, impl)  # warm-up: the grouped-GEMM capability probe runs once, outside the count
        moe.expert_impl = impl
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with count_host_syncs() as fwd:
            out = moe(xi)
            loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum()
        with count_host_syncs() as bwd:
            loss.backward()
        assert dict(fwd) == {"Tensor.tolist": 1} and dict(bwd) == {}, (name, impl, dict(fwd), dict(bwd))
        results[impl] = run(moe, x, impl)
    assert_same(results["grouped"], results["loop"], tol=1e-6)

    stats = moe.router.stats
    counts = stats.tokens_per_expert.clone()
    dist.all_reduce(counts)
    assert all(counts[e].item() == 0 for e in starve), (name, counts)
    assert (stats.dropped.item() > 0) == (cf is not None and tokens[rank] > 0), (name, stats.dropped)

    if cf is None:  # dropless: the ep=2 layer computes what the ep=1 layer computes on both ranks' tokens
        ours_out, ours_grads = run(moe, x, "grouped", aux_coef=0.0)
        # the ep=1 layer on all tokens, each rank's rows projected by that rank's matrix (as `run` does per rank)
        xs = [make_input(t, seed=r) for r, t in enumerate(tokens)]
        full.expert_impl = "loop"
        full.zero_grad(set_to_none=True)
        xcat = torch.cat(xs).requires_grad_()
        out = full(xcat)
        proj = torch.cat([torch.randn(t, H, generator=torch.Generator().manual_seed(7)) for t in tokens])
        (out * proj).sum().backward()
        start = sum(tokens[:rank])
        rows = slice(start, start + tokens[rank])
        assert_close_at_scale(ours_out, out.detach()[rows], 1e-6, "output")
        assert_close_at_scale(ours_grads["input"], xcat.grad[rows], 1e-6, "input")
        router_grad = ours_grads["deepspeed_moe.gate.weight"].clone()
        dist.all_reduce(router_grad)  # DeepSpeed all-reduces the router over data parallel
        assert_close_at_scale(router_grad, full.router.weight.grad, 1e-6, "router")
        for local, gid in enumerate(moe.global_expert_ids()):
            for p in ("gate_proj", "up_proj", "down_proj"):
                ours = ours_grads[f"deepspeed_moe.experts.deepspeed_experts.{local}.{p}.weight"]
                ref = getattr(full.local_experts[gid], p).weight.grad
                assert_close_at_scale(ours, ref, 1e-6, f"expert {gid} {p}")
    done.append(name)

# Under a real DeepSpeed engine (ZeRO-1, bf16: DeepSpeed flattens each parameter group into one buffer and makes
# every parameter a view of it) the grouped path stacks the experts' weights without copying them, and still
# computes what the loop computes.
full = make_layer(2)
moe = shard_layer(full, 2, rank)
assert not stacking_is_zero_copy(moe.local_experts)  # separately allocated parameters: one copy per forward
groups = split_params_into_different_moe_groups_for_optimizer({"params": list(moe.parameters()), "name": "all"})
engine, *_ = deepspeed.initialize(
    model=moe, optimizer=torch.optim.AdamW(groups, lr=1e-3),
    config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
assert stacking_is_zero_copy(moe.local_experts)
x = make_input(48, seed=rank, dtype=torch.bfloat16)
before = [p.detach().clone() for p in moe.local_experts.parameters()]
with torch.no_grad():
    moe.expert_impl = "loop"
    ref = engine(x)
    moe.expert_impl = "grouped"
    assert_close_at_scale(engine(x), ref, 2 ** -7, "bf16 output under ZeRO-1")
engine.backward(engine(x).float().square().mean())
engine.step()
assert all(not torch.equal(b, p) for b, p in zip(before, moe.local_experts.parameters()))  # every expert trained
assert stacking_is_zero_copy(moe.local_experts)
done.append("zero1-bf16-zero-copy")

dist.barrier()
if rank == 0:
    (out_dir / "done.txt").write_text("\n".join(done) + "\n")
shutdown()
