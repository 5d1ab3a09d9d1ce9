"""Run on N ranks (torchrun): load an HF MoE checkpoint into our DeepSpeed-MoE model at ep_size=N, forward rank r's
own batch, backward a fixed random projection of the logits, and save logits + grads of this rank's parameters
(OUT_DIR/{impl}_rank{r}.pt), once with each expert implementation (grouped GEMM, per-expert loop).

usage: moe_forward_backward.py CKPT OUT_DIR EP_SIZE
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import input_ids  # noqa: E402

from upcycle_ds.launch.distributed import init_distributed, shutdown  # noqa: E402
from upcycle_ds.io.hf import HFCheckpoint  # noqa: E402
from upcycle_ds.moe.layer import moe_layers  # noqa: E402
from upcycle_ds.surgery import build_moe_model  # noqa: E402

ckpt, out, ep = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
init_distributed()
rank = torch.distributed.get_rank()
model = build_moe_model(HFCheckpoint(ckpt), ep_size=ep).eval()
x = input_ids(seed=rank)
for impl in ("grouped", "loop"):
    model.zero_grad(set_to_none=True)
    for _, moe in moe_layers(model):
        moe.expert_impl = impl
    logits = model(input_ids=x).logits
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(100 + rank))
    (logits * proj).sum().backward()
    grads = {}
    for layer, moe in moe_layers(model):
        grads[f"{layer}.router"] = moe.router.weight.grad
        for local, gid in enumerate(moe.global_expert_ids()):
            e = moe.local_experts[local]
            for p in ("gate", "up", "down"):
                grads[f"{layer}.{gid}.{p}"] = getattr(e, f"{p}_proj").weight.grad
    torch.save({"logits": logits.detach(), "grads": grads}, out / f"{impl}_rank{rank}.pt")
shutdown()
