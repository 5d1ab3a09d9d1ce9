"""Run on N ranks (torchrun): build our DeepSpeed-MoE model from an HF MoE (or dense, upcycled on the fly) checkpoint,
train a few steps with a real DeepSpeed engine, save a DeepSpeed checkpoint the way the trainer does (+ config.json
next to `latest`), and record what the engine holds at that step for the tests to compare against:

- `OUT/ref/logits.pt`: the engine's eval logits on fixed `input_ids(seed=7)` (every rank computes them; rank 0 saves)
- `OUT/ref/rank{r}_params.pt`: this rank's module params by *global* name (expert ids made global)
- `OUT/ref/rank{r}_master.pt`: this rank's fp32 master params (ZeRO: the optimizer's partitions gathered back
  through DeepSpeed's own `safe_get_full_fp32_param`), same names

usage: ds_train_save.py SOURCE OUT EP_SIZE ZERO_STAGE STEPS DTYPE(fp32|bf16) [load CKPT_DIR]
With `load CKPT_DIR` it instead loads CKPT_DIR module-only (`engine.load_checkpoint(load_module_only=True)`) into a
fresh engine whose weights were scrambled first, and saves `OUT/ref/loaded_rank{r}.pt` (params by global name) and
the eval logits `OUT/ref/loaded_logits.pt`.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import input_ids  # noqa: E402

import deepspeed  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from upcycle_ds.launch.distributed import init_distributed, shutdown  # noqa: E402
from upcycle_ds.io.hf import HFCheckpoint, read_config  # noqa: E402
from upcycle_ds.moe.layer import moe_layers  # noqa: E402
from upcycle_ds.surgery import build_moe_model  # noqa: E402
from upcycle_ds.upcycle import UpcycledView, UpcycleOptions  # noqa: E402

source_dir, out, ep, stage, steps, dtype_name = sys.argv[1:7]
load_mode = len(sys.argv) > 7 and sys.argv[7] == "load"
out, ep, stage, steps = Path(out), int(ep), int(stage), int(steps)
bf16 = dtype_name == "bf16"

init_distributed()
rank = torch.distributed.get_rank()
torch.manual_seed(0)
cfg = read_config(source_dir)
src = HFCheckpoint(source_dir)
if "num_experts" not in cfg and "num_local_experts" not in cfg:
    src = UpcycledView(src, UpcycleOptions(num_experts=4, top_k=2))
model = build_moe_model(src, ep_size=ep)
if load_mode:  # scramble: the load must restore every weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1)
params = split_params_into_different_moe_groups_for_optimizer(
    {"params": [p for p in model.parameters()], "name": "all"})
optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
             "bf16": {"enabled": bf16}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)


def global_name_params():
    names = {}
    for layer, moe in moe_layers(engine.module):
        for local, gid in enumerate(moe.global_expert_ids()):
            names[f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{local}."] = (
                f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{gid}.")
    out_p, out_m = {}, {}
    for name, p in engine.module.named_parameters():
        g = name
        for a, b in names.items():
            if name.startswith(a):
                g = b + name[len(a):]
        out_p[g] = p.detach().clone()
        if not load_mode:
            m = safe_get_full_fp32_param(p) if stage > 0 else None
            out_m[g] = (m if m is not None else p.detach().float()).clone()
    return out_p, out_m


def eval_logits():
    engine.eval()
    with torch.no_grad():
        lg = engine(input_ids=input_ids(seed=7)).logits.float()
    engine.train()
    return lg


(out / "ref").mkdir(parents=True, exist_ok=True)
if load_mode:
    path, _ = engine.load_checkpoint(sys.argv[8], load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    assert path is not None, f"nothing loaded from {sys.argv[8]}"
    p, _ = global_name_params()
    torch.save(p, out / "ref" / f"loaded_rank{rank}.pt")
    lg = eval_logits()
    if rank == 0:
        torch.save(lg, out / "ref" / "loaded_logits.pt")
else:
    for step in range(steps):
        x = input_ids(seed=1000 + 10 * step + rank)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out / "checkpoints"), tag=f"global_step{steps}")
    lg = eval_logits()
    p, m = global_name_params()
    torch.save(p, out / "ref" / f"rank{rank}_params.pt")
    torch.save(m, out / "ref" / f"rank{rank}_master.pt")
    if rank == 0:
        torch.save(lg, out / "ref" / "logits.pt")
        config = dict(src.config)
        (out / "checkpoints" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
shutdown()
