"""Run on 2 ranks (torchrun): build a Trainer from a YAML of TrainArgs (--aux-loss-scope global), run one optimizer
step's micro-steps by hand with the aux losses alone as the loss (engine.backward / engine.step: DeepSpeed's own
accumulation and gradient averaging), and save, before the last engine.step, what a single-rank reference must reproduce:
OUT_DIR/global_aux_rank{r}.pt = {batches: this rank's micro-batches, aux: [micro][layer] this rank's aux values,
grads: {layer: router weight grad after DeepSpeed's all-reduce}, logged: [layer] the aux the StepMeter logs}.

usage: global_aux_step.py ARGS.yaml OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from upcycle_ds.launch.distributed import shutdown
from upcycle_ds.train.config import TrainArgs
from upcycle_ds.train.trainer import build_trainer, causal_lm_loss

args = TrainArgs(**yaml.safe_load(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
trainer = build_trainer(args)
engine, layers = trainer.engine, trainer.layers
engine.train()
stream = trainer.micro_batches()
rec = {"batches": [], "aux": []}
for m in range(args.grad_accum):
    b = next(stream)
    logits = trainer.forward(b).logits
    lm_sum, n_tok = causal_lm_loss(logits, b["labels"])
    trainer.meter.add_micro_step(lm_sum / n_tok)
    aux = sum(moe.router.aux_loss for _, moe in layers)
    engine.backward(aux)
    rec["batches"].append({k: b[k].cpu() for k in ("input_ids", "position_ids")})
    rec["aux"].append([moe.router.aux_loss.item() for _, moe in layers])
    if m < args.grad_accum - 1:
        engine.step()  # as the Trainer does; DeepSpeed only counts the micro-step here (no update before the last)
rec["grads"] = {layer: moe.router.weight.grad.detach().clone().cpu() for layer, moe in layers}
rec["logged"] = [st.aux_loss for st in trainer.meter.reduce(1).layers]
torch.save(rec, out / f"global_aux_rank{dist.get_rank()}.pt")
shutdown()
