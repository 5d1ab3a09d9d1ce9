"""--aux-loss-scope global (upcycle_ds/moe/balance.py): the Switch loss over the global batch, against references
computed independently from router logits (transformers' `load_balancing_loss_func`, or the definition in
docs/training.md written out here) — in-process for the accumulation semantics, on 2 real DeepSpeed ranks for the
data-parallel part (values and router gradients)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from tiny import make_jsonl, make_moe, make_tokenizer
from upcycle_ds.moe import balance
from upcycle_ds.moe.router import TopKRouter


def _routers(n=2, E=8, k=2, H=16):
    torch.manual_seed(0)
    rs = [TopKRouter(H, E, k) for _ in range(n)]
    for r in rs:
        nn.init.normal_(r.weight, std=1.0)
    return rs


class _Stack(nn.Module):
    """A model whose forward runs its routers (what the hook sees after an MoE model's forward)."""

    def __init__(self, routers):
        super().__init__()
        self.routers = nn.ModuleList(routers)

    def forward(self, xs):
        return [r(x) for r, x in zip(self.routers, xs)]


def _switch(logits_list, k, E):
    """The definition: f over all the given micro-batches' tokens, P over the last one's."""
    counts = sum(torch.zeros(E).index_add_(0, lg.topk(k, -1).indices.reshape(-1), torch.ones(lg.shape[0] * k))
                 for lg in logits_list)
    f = counts / (counts.sum() / k)
    return E * torch.sum(f * torch.softmax(logits_list[-1], -1).mean(0))


def test_one_process_one_micro_step_is_the_micro_loss_bit_for_bit():
    routers = _routers()
    model = _Stack(routers).train()
    assert balance.install(model, routers, "global", grad_accum=1) is not None
    xs = [torch.randn(40, 16) for _ in routers]
    model(xs)
    for r, x in zip(routers, xs):
        logits = x @ r.weight.t()
        ref = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
        torch.testing.assert_close(r.aux_loss, ref, rtol=1e-6, atol=1e-6)
        micro = 8 * torch.sum(r.stats.tokens_per_expert.float() / 40 * r.mean_probs_E)
        assert torch.equal(r.aux_loss, micro) and torch.equal(r.stats.aux_loss, micro.detach())


def test_accumulation_running_frequencies_reset_each_step_and_eval_untouched():
    routers = _routers(n=2, E=6, k=2)
    model = _Stack(routers).train()
    balance.install(model, routers, "global", grad_accum=3)
    seen = [[] for _ in routers]
    for step in range(2):
        for m in range(3):
            xs = [torch.randn(10 + 7 * m, 16) for _ in routers]  # micro-batches of different sizes
            model(xs)
            for i, (r, x) in enumerate(zip(routers, xs)):
                seen[i] = ([] if m == 0 else seen[i]) + [x @ r.weight.t()]
                torch.testing.assert_close(r.aux_loss, _switch(seen[i], 2, 6), rtol=1e-6, atol=1e-6)
                assert r.aux_loss.requires_grad and not r.stats.aux_loss.requires_grad
    # the running mean differs from the per-micro-batch loss (the check above can tell them apart)
    last = routers[0]
    assert abs(last.aux_loss.item() - _switch(seen[0][-1:], 2, 6).item()) > 1e-4
    model.eval()
    xs = [torch.randn(12, 16) for _ in routers]
    with torch.no_grad():
        model(xs)
    for r, x in zip(routers, xs):
        torch.testing.assert_close(r.aux_loss, _switch([x @ r.weight.t()], 2, 6), rtol=1e-6, atol=1e-6)


def test_micro_scope_installs_nothing():
    routers = _routers()
    model = _Stack(routers)
    assert balance.install(model, routers, "micro", grad_accum=4) is None
    assert not model._forward_hooks
    with pytest.raises(ValueError, match="micro"):
        balance.install(model, routers, "batch", grad_accum=1)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_over_the_same_tokens(tmp_path):
    """2 ranks x 2 micro-steps, the aux losses alone backpropagated through DeepSpeed (ZeRO-0, fp32): each micro-step's
    aux (mean over ranks), the logged aux and the all-reduced router gradients equal one process computing the
    definition on both ranks' tokens."""
    from upcycle_ds.io.hf import HFCheckpoint
    from upcycle_ds.launch.distributed import free_port
    from upcycle_ds.moe.layer import moe_layers
    from upcycle_ds.surgery import build_moe_model

    E, k, ga = 4, 2, 2
    moe = make_moe("mixtral", tmp_path / "moe", num_experts=E, top_k=k, num_hidden_layers=2)
    make_tokenizer(moe)
    data = make_jsonl(tmp_path / "train.jsonl", 60)
    cfg = tmp_path / "args.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(moe), "data": str(data), "out": str(tmp_path / "run"),
                                   "zero_stage": 0, "dtype": "fp32", "micro_batch_size": 2, "grad_accum": ga,
                                   "max_length": 32, "max_steps": 1, "wandb_mode": "disabled", "eval_fraction": 0.0,
                                   "aux_loss_scope": "global"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "dist_scripts" / "global_aux_step.py"), str(cfg), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"global_aux_rank{i}.pt", weights_only=True) for i in range(2)]

    model = build_moe_model(HFCheckpoint(moe)).train()
    layers = moe_layers(model)
    for _, m in layers:
        m.router.record_logits = True
    seen = {layer: [] for layer, _ in layers}
    per_step = []
    for m in range(ga):
        batch = {key: torch.cat([rk["batches"][m][key] for rk in ranks]) for key in ("input_ids", "position_ids")}
        model(**batch, use_cache=False)
        auxes = []
        for layer, mod in layers:
            seen[layer].append(mod.router.logits_TE)
            auxes.append(_switch(seen[layer], k, E))
        if m == 0:  # one micro-step: the Switch loss of both ranks' tokens, as transformers computes it
            for (layer, _), a in zip(layers, auxes):
                torch.testing.assert_close(a, load_balancing_loss_func((seen[layer][0],), num_experts=E, top_k=k),
                                           rtol=1e-6, atol=1e-7)
        (sum(auxes) / ga).backward()  # DeepSpeed divides each micro-step's loss by grad_accum
        per_step.append(torch.stack(auxes).detach())
        got = torch.tensor([sum(rk["aux"][m][i] for rk in ranks) / 2 for i in range(len(layers))])
        torch.testing.assert_close(got, per_step[-1], rtol=1e-6, atol=1e-7)
        # rank 0's own half gives another loss: the comparison above can fail
        own = [_switch([lg[: lg.shape[0] // 2] for lg in seen[layer]], k, E) for layer, _ in layers]
        assert max(abs(a - b).item() for a, b in zip(own, auxes)) > 1e-4
    torch.testing.assert_close(torch.tensor(ranks[0]["logged"]), torch.stack(per_step).mean(0), rtol=1e-6, atol=1e-7)
    for layer, mod in layers:
        ref = mod.router.weight.grad
        assert ref.abs().max() > 1e-4
        for rk in ranks:
            torch.testing.assert_close(rk["grads"][layer], ref, rtol=1e-6, atol=1e-7)  # measured: <= 6e-8 of 0.24


def test_unknown_scope_from_a_config_file_is_one_line_error():
    from upcycle_ds.errors import UserError
    from upcycle_ds.train.config import TrainArgs

    with pytest.raises(UserError, match="--aux-loss-scope must be micro or global"):
        TrainArgs(model="m", data=["d"], out="o", aux_loss_scope="batch").validate_values()
