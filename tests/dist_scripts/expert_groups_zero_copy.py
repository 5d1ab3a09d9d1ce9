"""One process: a tiny Mixtral built the way training builds it (`surgery.build_moe_model`) under a real DeepSpeed
engine with the training ds_config (`train.config.deepspeed_config`) and optimizer groups (`train.optim.
optimizer_groups`) at ZeRO 0, 1 and 2 in bf16 (and ZeRO-0 in fp32), with the MoE group cap lowered to CAP elements:
one layer's experts hold 73,728, so DeepSpeed's own split at that cap puts layer 1's experts in two groups (checked
first). For each engine: every layer's grouped-GEMM operands view the experts' buffer (`stacking_is_zero_copy`) after
`deepspeed.initialize` and after a step, and the grouped forward equals the loop's. Writes OUT/result.json.

usage: expert_groups_zero_copy.py MOE_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from upcycle_ds.io.hf import HFCheckpoint
from upcycle_ds.launch.distributed import init_distributed, shutdown
from upcycle_ds.moe.experts import stacking_is_zero_copy
from upcycle_ds.moe.layer import moe_layers
from upcycle_ds.surgery import build_moe_model
from upcycle_ds.train.config import TrainArgs, deepspeed_config
from upcycle_ds.train.optim import optimizer_groups

CAP = 100_000
moe_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
init_distributed()
result = {}


def layer_groups(groups, model) -> dict[int, set[int]]:
    """MoE layer index -> indices of the optimizer groups holding its experts."""
    where = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
    return {i: {where[id(p)] for p in moe.local_experts.parameters()} for i, (_, moe) in enumerate(moe_layers(model))}


model = build_moe_model(HFCheckpoint(moe_dir), dtype=torch.float32)
plain = [{"params": [p for p in model.parameters()], "weight_decay": 0.0, "name": "all"}]
result["deepspeed_split"] = {str(k): len(v) for k, v in
                             layer_groups(split_params_into_different_moe_groups_for_optimizer(plain, CAP),
                                          model).items()}
result["layer_numel"] = sum(p.numel() for p in moe_layers(model)[0][1].local_experts.parameters())

x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
for zero, dtype in ((0, "bf16"), (1, "bf16"), (2, "bf16"), (0, "fp32")):
    args = TrainArgs(model=str(moe_dir), data=["unused.jsonl"], out=str(out / "unused"), zero_stage=zero, dtype=dtype,
                     micro_batch_size=2, max_length=32)
    model = build_moe_model(HFCheckpoint(moe_dir), dtype=args.torch_dtype())
    groups = optimizer_groups(model, 0.01, max_group_numel=CAP)
    placed = {str(k): len(v) for k, v in layer_groups(groups, model).items()}  # before DeepSpeed rewrites the groups
    engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3),
                                                 config=deepspeed_config(args, 1, False))
    layers = [moe for _, moe in moe_layers(engine.module)]
    case = {"groups": placed,
            "zero_copy_at_init": [stacking_is_zero_copy(m.local_experts) for m in layers]}
    with torch.no_grad():
        for m in layers:
            m.expert_impl = "loop"
        loop = engine(input_ids=x).logits.float()
        for m in layers:
            m.expert_impl = "grouped"
        grouped = engine(input_ids=x).logits.float()
    case["grouped_vs_loop"] = (grouped - loop).abs().max().item()
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    case["zero_copy_after_step"] = [stacking_is_zero_copy(m.local_experts) for m in layers]
    case["optimizer"] = type(optimizer).__name__
    result[f"zero{zero}-{dtype}"] = case
    del engine, optimizer, model, layers

out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps(result, indent=1))
shutdown()
