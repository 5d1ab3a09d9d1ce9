"""Run on 2 ranks (torchrun): ZeRO-Offload (`--offload-optimizer`) against the same runs without it, in one launch.

usage: offload_probe.py MODEL DATA OUT_DIR

1. memory (bf16, the plan's default): for ep 1/2 x ZeRO 1/2 x offload off/on, a Trainer takes one step; recorded per
   rank from the optimizer's own tensors: the optimizer state (fp32 master partition + AdamW exp_avg, exp_avg_sq) of
   the non-expert and of the expert param groups, ZeRO-Offload's other host buffers (the fp32 gradient partition, the
   weight buffer, the gradient staging buffer) and its device staging buffer, and the gradient bytes the model holds
   between backward and the optimizer step -> OUT_DIR/memory_rank{r}.json.
2. training (fp32, ep 2, 6 steps, a checkpoint at step 3): ZeRO-2 and ZeRO-1, each without and with offload; then
   resumes of the step-3 checkpoints: offloaded ZeRO-2 -> offloaded and -> not offloaded (same layout: DeepSpeed's
   own load), offloaded ZeRO-2 -> ZeRO-1 without offload, ZeRO-1 without offload -> offloaded ZeRO-2 (other
   layouts: train.elastic). Each resume records the sums of |exp_avg|
   and exp_avg_sq over the whole optimizer (all ranks) right after loading -> OUT_DIR/resume.json; losses are in each
   run's OUT_DIR/<run>/metrics.jsonl. The offloaded ZeRO-2 run also exports OUT_DIR/z2_off/hf and dumps the trained
   engine's logits (--debug-dump-logits).
Instrumentation lives here, never in the product.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from upcycle_ds.launch.distributed import shutdown
from upcycle_ds.train.config import TrainArgs
from upcycle_ds.train.trainer import Trainer, build_trainer

model, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
COMMON = dict(model=model, data=[data], micro_batch_size=2, max_length=64, seed=0, lr=1e-3, eval_fraction=0.0,
              wandb_mode="disabled", export_hf=False)


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def optimizer_bytes(opt) -> dict:
    """This rank's ZeRO-1/2 optimizer tensors, by kind and param group (non-expert / expert)."""
    rec = {"offloaded": bool(opt.cpu_offload), "state": {"non_expert": 0, "expert": 0},
           "host_grads": 0, "host_weights": 0}
    for i, group in enumerate(opt.optimizer.param_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        st = opt.optimizer.state[flat]
        kind = "expert" if group.get("moe") else "non_expert"
        rec["state"][kind] += nbytes(flat) + nbytes(st["exp_avg"]) + nbytes(st["exp_avg_sq"])
        if opt.cpu_offload:
            rec["host_grads"] += nbytes(flat.grad)
            rec["host_weights"] += nbytes(opt.param_buffer_of_bit16_for_cpu_offload_groups[i])
    rec["host_staging"] = nbytes(getattr(opt, "temp_grad_buffer_for_cpu_offload", None))
    rec["device_staging"] = nbytes(getattr(opt, "temp_grad_buffer_for_gpu_offload", None))
    rec["devices"] = sorted({str(t.device) for t in opt.single_partition_of_fp32_groups})
    return rec


def held_grad_bytes(engine) -> int:
    """Gradient bytes kept between backward and the optimizer step: the model's .grad tensors and ZeRO's gradient
    partition (stage 1: `averaged_gradients`, stage 2: `grads_in_partition`)."""
    opt = engine.optimizer
    total = sum(nbytes(p.grad) for p in engine.module.parameters())
    avg = getattr(opt, "averaged_gradients", None) or {}
    total += sum(nbytes(t) for v in avg.values() if v is not None for t in (v if isinstance(v, list) else [v]))
    return total + nbytes(getattr(opt, "grads_in_partition", None))


def memory() -> None:
    report = {}
    for ep in (1, 2):
        for stage in (1, 2):
            for off in (False, True):
                name = f"ep{ep}_z{stage}_{'off' if off else 'gpu'}"
                args = TrainArgs(**COMMON, out=str(out / "mem" / name), ep_size=ep, zero_stage=stage, dtype="bf16",
                                 max_steps=1, offload_optimizer=off)
                trainer = build_trainer(args)
                engine, seen = trainer.engine, {}
                step = engine.step

                def step_after_backward(*a, **kw):  # what backward left for the optimizer step
                    seen["grads"] = held_grad_bytes(engine)
                    return step(*a, **kw)

                engine.step = step_after_backward
                engine.train()
                trainer.step(trainer.micro_batches())
                report[name] = {**optimizer_bytes(engine.optimizer), "held_grads": seen["grads"]}
    (out / f"memory_rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))


def fit(name: str, **kw) -> Trainer:
    args = TrainArgs(**{**COMMON, "out": str(out / name), "ep_size": 2, "dtype": "fp32", "max_steps": 6,
                        "save_every": 3, **kw})
    trainer = build_trainer(args)
    trainer.fit()
    return trainer


def moment_sums(trainer) -> list[float]:
    """Sum over all ranks of |exp_avg| and of exp_avg_sq in the optimizer: each element lives in exactly one rank's
    ZeRO partition (padding is zero)."""
    opt = trainer.engine.optimizer
    s = torch.zeros(2, dtype=torch.float64)
    for flat in opt.single_partition_of_fp32_groups:
        st = opt.optimizer.state.get(flat, {})
        if "exp_avg" in st:
            s += torch.stack([st["exp_avg"].double().abs().sum(), st["exp_avg_sq"].double().sum()])
    dist.all_reduce(s)
    return s.tolist()


def resume(src: str, name: str, **kw) -> list[float]:
    """`src`'s step-3 checkpoint as `name`'s latest, resumed there with `kw`; returns the moment sums after loading."""
    if dist.get_rank() == 0:
        ckpts = out / src / "checkpoints"
        shutil.copytree(ckpts, out / name / "checkpoints", ignore=lambda d, names: [
            n for n in names if Path(d) == ckpts and n.startswith("global_step") and n != "global_step3"])
        (out / name / "checkpoints" / "latest").write_text("global_step3")
        shutil.copy(out / src / "metrics.jsonl", out / name / "metrics.jsonl")
    dist.barrier()
    args = TrainArgs(**COMMON, out=str(out / name), ep_size=2, dtype="fp32", max_steps=6, resume=True, **kw)
    trainer = build_trainer(args)
    sums = moment_sums(trainer)
    trainer.fit()
    return sums


memory()
for stage in (2, 1):
    fit(f"z{stage}", zero_stage=stage)
    fit(f"z{stage}_off", zero_stage=stage, offload_optimizer=True, export_hf=stage == 2, debug_dump_logits=stage == 2)
sums = {"z2_off_same": resume("z2_off", "z2_off_same", zero_stage=2, offload_optimizer=True),
        "z2_off_to_z2": resume("z2_off", "z2_off_to_z2", zero_stage=2),
        "z2_off_to_z1": resume("z2_off", "z2_off_to_z1", zero_stage=1),
        "z1_to_z2_off": resume("z1", "z1_to_z2_off", zero_stage=2, offload_optimizer=True)}
if dist.get_rank() == 0:
    (out / "resume.json").write_text(json.dumps(sums))
shutdown()
