"""Training metrics that stay on the device until a logging step: one all_reduce and one device->host copy per log.

`StepMeter` accumulates, per micro-step and on the engine's device, the LM loss, the real (non-padding) tokens of
the micro-batch, the stage's extra metrics and the router statistics of every MoE layer (token-slots per expert,
dropped slots, aux / z loss, entropy — device tensors left on each router by its forward). `reduce()` packs
everything into one flat float64 tensor, all_reduces it over the job once, and copies it to the host once. Nothing
in between reads a value back, so the GPU never waits for the host inside the training step.

`window_scalars` turns a reduced window into what is logged: throughput and MFU from the real tokens (padding is
not work: a row 88% full would overstate both by 12%), tokens seen so far, the fractional epoch. `eval_scalars`
adds perplexity to the held-out loss; `checkpoint_line` is the log line of a saved checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..progress import format_duration
from .tracking import LayerStats


@dataclass
class Reduced:
    """Means over the micro-steps of the window and over ranks (loss, extras); router counts summed."""

    loss: float
    extras: dict[str, float]
    layers: list[LayerStats]
    grad_norm: float | None
    micro_steps: int
    tokens: float = 0.0
    """Real (non-padding) tokens of the window's micro-batches, summed over ranks."""


class StepMeter:
    """Accumulates a logging window (one or more optimizer steps) on `device`. See the module docstring."""

    _ROUTER = 4  # dropped, aux, z, entropy

    def __init__(self, layers: list[tuple[int, object]], num_experts: int, device: torch.device):
        self.layers, self.E, self.device = layers, num_experts, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(len(self.layers), self.E, dtype=torch.float64, device=self.device)
        self.router = torch.zeros(len(self.layers), self._ROUTER, dtype=torch.float64, device=self.device)
        self.extras: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.has_grad_norm = False
        self.slots = 0  # host int: T * K summed (known from shapes)
        self.micro_steps = 0

    def add_micro_step(self, lm_loss: torch.Tensor, extras: dict[str, torch.Tensor] | None = None, *,
                       tokens: torch.Tensor | None = None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Record one forward: its LM loss (a device scalar), the stage's extra metrics, the routers' statistics, and
        `tokens`, the micro-batch's real tokens per row (its "num_tokens", on the device). Returns (sum of aux losses,
        sum of z losses) over MoE layers, with gradients, for the loss."""
        self.loss += lm_loss.detach()
        if tokens is not None:
            self.tokens += tokens.sum().to(torch.float64)
        for k, v in (extras or {}).items():
            v = v.detach().to(torch.float64)
            self.extras[k] = self.extras[k] + v if k in self.extras else v
        aux = z = 0.0
        if self.layers:
            stats = [moe.router.stats for _, moe in self.layers]
            self.counts += torch.stack([s.tokens_per_expert for s in stats]).to(torch.float64)
            self.router += torch.stack([torch.stack([s.dropped.to(torch.float64), s.aux_loss.to(torch.float64),
                                                     s.z_loss.to(torch.float64), s.entropy.to(torch.float64)])
                                        for s in stats])
            self.slots += sum(s.slots for s in stats)
            for _, moe in self.layers:
                aux, z = aux + moe.router.aux_loss, z + moe.router.z_loss
        self.micro_steps += 1
        return aux, z

    def add_grad_norm(self, norm) -> None:
        """The global gradient norm DeepSpeed computed for the last optimizer step (a tensor or a float)."""
        if norm is None:
            return
        self.grad_norm += torch.as_tensor(norm, dtype=torch.float64).to(self.device)
        self.has_grad_norm = True

    def pending_tokens(self) -> int:
        """Collective: the real tokens of the window so far, all ranks: one number all-reduced (for a checkpoint
        taken between logging steps; 0 without a collective when the window is empty, as on every rank)."""
        if not self.micro_steps:
            return 0
        total = self.tokens.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return int(round(total.item()))

    def reduce(self, steps: int) -> Reduced:
        """Collective: sum over ranks with ONE all_reduce, copy to the host ONCE. `steps` = optimizer steps in the
        window (for the mean grad norm)."""
        names = sorted(self.extras)
        parts = [self.loss.reshape(1), self.grad_norm.reshape(1), self.tokens.reshape(1), self.counts.reshape(-1),
                 self.router.reshape(-1)]
        parts += [self.extras[k].reshape(1) for k in names]
        flat = torch.cat(parts)
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(flat)
        host = flat.tolist()  # the one device -> host transfer of the window
        n = self.micro_steps * world
        loss, gnorm, tokens = host[0] / n, host[1] / world / max(1, steps), host[2]
        host = host[3:]
        nL, E = len(self.layers), self.E
        counts = host[: nL * E]
        router = host[nL * E: nL * E + nL * self._ROUTER]
        extras = dict(zip(names, (v / n for v in host[nL * E + nL * self._ROUTER:])))
        slots = self.slots * world / max(1, nL)  # per layer
        layers = []
        for i, (layer, _) in enumerate(self.layers):
            dropped, aux, z, ent = router[i * self._ROUTER: (i + 1) * self._ROUTER]
            layers.append(LayerStats(layer=layer, tokens_per_expert=[int(round(c)) for c in counts[i * E:(i + 1) * E]],
                                     aux_loss=aux / n, z_loss=z / n, entropy=ent / n,
                                     dropped_fraction=dropped / slots if slots else 0.0))
        return Reduced(loss=loss, extras=extras, layers=layers,
                       grad_norm=gnorm if self.has_grad_norm else None, micro_steps=self.micro_steps, tokens=tokens)


def window_scalars(red: Reduced, *, steps: int, seconds: float, lr: float, tokens_seen: float, epoch: float,
                   flops_per_token: float, devices: int, peak_tflops: float | None,
                   max_mem_gib: float | None = None) -> dict[str, float]:
    """What a logging window of `steps` optimizer steps taking `seconds` logs (names without the `train/` the
    tracker adds): loss, lr, tokens_per_s and mfu from the window's real tokens, tokens (real tokens trained on so
    far, `tokens_seen`), epoch (fractional: epochs done + this epoch's share consumed), step_time_s, grad_norm,
    max_mem_gib, and the stage's extras. MFU = model FLOPs per token x real tokens per second / (devices x peak)."""
    tps = red.tokens / seconds if seconds > 0 else 0.0
    out = {"loss": red.loss, "lr": lr, "tokens_per_s": tps, "tokens": tokens_seen, "epoch": epoch,
           "step_time_s": seconds / max(1, steps), **red.extras}
    if red.grad_norm is not None:
        out["grad_norm"] = red.grad_norm
    if peak_tflops:
        out["mfu"] = flops_per_token * tps / (devices * peak_tflops * 1e12)
    if max_mem_gib is not None:
        out["max_mem_gib"] = max_mem_gib
    return out


def eval_scalars(loss: float) -> dict[str, float]:
    """The held-out loss (mean over labelled tokens) and its perplexity exp(loss)."""
    return {"eval/loss": loss, "eval/ppl": math.exp(loss) if loss < 700 else math.inf}


def checkpoint_line(tag_dir: Path, seconds: float) -> str:
    """`checkpoint global_step200 saved in 41.3 s (94.62 GB)`: the committed tag dir's files, all ranks'."""
    size = sum(p.stat().st_size for p in Path(tag_dir).rglob("*") if p.is_file())
    return f"checkpoint {Path(tag_dir).name} saved in {seconds:.1f} s ({size / 1e9:.2f} GB)"


def step_line(*, prog: str, step: int, total: int, loss: float, lr: float, tokens_per_s: float, step_time_s: float,
              mfu: float | None, max_mem_gib: float | None, grad_norm: float | None, eta_s: float,
              extras: dict[str, float] | None = None) -> str:
    """One line per logging step for a batch log (no TTY needed), e.g.
    `[upcycle-ds train] step 120/2000 | loss 2.3145 | lr 1.00e-04 | 51.2k tok/s | MFU 41.3% | mem 61.2 GiB |
    gnorm 0.81 | 1.02 s/step | ETA 31m58s`."""
    parts = [f"[{prog}] step {step}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}"]
    parts += [f"{k} {v:.4f}" for k, v in sorted((extras or {}).items())]
    tps = f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"
    parts.append(f"{tps} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if max_mem_gib is not None:
        parts.append(f"mem {max_mem_gib:.1f} GiB")
    if grad_norm is not None:
        parts.append(f"gnorm {grad_norm:.3g}")
    parts += [f"{step_time_s:.2f} s/step", f"ETA {format_duration(eta_s)}"]
    return " | ".join(parts)
