"""UpIT stage 3b (router initialisation, docs/upit.md): initialise the routers of an HF MoE checkpoint; writes OUT/hf (HF MoE).

--mode bce (default, UpIT): train only the routers (`train_only` = deepspeed_moe.gate; every other weight stays
bit-identical) on the seed data of `upcycle-ds seed-data` (rows with an `expert` field) with DeepSpeed, loss
    alpha * L_lm + (1 - alpha) * BCE(sigmoid(logits_TE), one_hot(expert of the token's sample))
where logits_TE = h W_router^T are each MoE layer's own router logits on its own input h. The BCE is averaged over
tokens, experts and MoE layers (a mean, so alpha keeps its meaning whatever E and the layer count). Tokens: every
token of the sample (`--bce-tokens all`, default: the router sees prompt tokens too) or only the response tokens.
Logged per step: `bce` and `top1_match` (fraction of labelled tokens whose top-1 expert is their sample's expert).
Same launchers as `train` (--nproc N, deepspeed, torchrun, srun), same checkpoints and --resume.

--mode hidden (mergekit-style, no training): for each expert, the mean over its positive prompts (and their tokens)
of every MoE layer's router input h, minus the same mean over its negative prompts if any, L2-normalised, becomes
that expert's router row. Prompts file (YAML): `experts: [{positive_prompts: [...], negative_prompts: [...]}, ...]`,
one entry per expert, in expert order (or a plain list of such entries). Runs in this process (no launcher).
"""

from __future__ import annotations

from ..upit.router_init import RouterInitConfig, run_router_init

Args = RouterInitConfig


def run(args: RouterInitConfig) -> int:
    return run_router_init(args)
