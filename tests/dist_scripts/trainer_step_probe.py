"""Run on 2 ranks (torchrun): build a Trainer from a YAML of TrainArgs, take one warm-up step, then record, during
STEPS more optimizer steps and their logging, every tensor handed to a torch.distributed collective and every host
sync made by upcycle_ds code (`.item()`, `.tolist()`, `float/int/bool(tensor)`, `repeat_interleave` without
`output_size`). Instrumentation lives here, never in the product. Writes OUT_DIR/probe_rank{r}.json.

usage: trainer_step_probe.py ARGS.yaml OUT_DIR STEPS
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from upcycle_ds.launch.distributed import shutdown
from upcycle_ds.train.config import TrainArgs
from upcycle_ds.train.trainer import build_trainer

PKG = str(Path(__import__("upcycle_ds").__file__).parent)
args = TrainArgs(**yaml.safe_load(Path(sys.argv[1]).read_text()))
out, steps = Path(sys.argv[2]), int(sys.argv[3])
trainer = build_trainer(args)
stream = trainer.micro_batches()
trainer.engine.train()
trainer.step(stream)  # warm-up (DeepSpeed sets up buckets etc. on its first step)
trainer.log_window(1, 1.0, 0.0)

record = {"collectives": [], "syncs": [], "phase": "step"}


def caller_in_package() -> str | None:
    """file:line of the nearest upcycle_ds frame when the immediate caller is upcycle_ds code, else None."""
    frame = sys._getframe(2)
    name = frame.f_code.co_filename
    return f"{Path(name).relative_to(PKG)}:{frame.f_lineno}" if name.startswith(PKG) else None


def wrap_collective(name):
    fn = getattr(dist, name)

    def wrapped(*a, **kw):
        tensors = [t for t in list(a) + list(kw.values()) if isinstance(t, torch.Tensor)]
        tensors += [t for x in list(a) + list(kw.values()) if isinstance(x, (list, tuple)) for t in x
                    if isinstance(t, torch.Tensor)]
        caller = traceback.extract_stack()[-2]  # who called the collective: our code, or DeepSpeed's
        ours = caller.filename.startswith(PKG)
        record["collectives"].append({"name": name, "phase": record["phase"], "ours": ours,
                                      "where": f"{Path(caller.filename).name}:{caller.lineno}",
                                      "devices": sorted({str(t.device) for t in tensors})})
        return fn(*a, **kw)

    setattr(dist, name, wrapped)


for n in ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
          "all_gather", "reduce_scatter", "all_to_all", "reduce", "all_gather_object", "barrier"):
    wrap_collective(n)


def wrap_sync(owner, name, when=lambda a, kw: True):
    fn = getattr(owner, name)

    def wrapped(*a, **kw):
        where = caller_in_package()
        if where is not None and when(a, kw):
            record["syncs"].append({"what": name, "phase": record["phase"], "where": where})
        return fn(*a, **kw)

    setattr(owner, name, wrapped)


for n in ("item", "tolist", "__float__", "__int__", "__bool__"):
    wrap_sync(torch.Tensor, n)
no_size = lambda a, kw: "output_size" not in kw  # noqa: E731
wrap_sync(torch.Tensor, "repeat_interleave", no_size)
wrap_sync(torch, "repeat_interleave", no_size)

for _ in range(steps):
    trainer.step(stream)
record["phase"] = "log"
trainer.log_window(steps, 1.0, 0.0)
record["phase"] = "done"
record["device"] = str(trainer.engine.device)
record["moe_layers"] = len(trainer.layers)
record["forwards"] = steps * args.grad_accum
(out / f"probe_rank{dist.get_rank()}.json").write_text(json.dumps(record, indent=1))
shutdown()
