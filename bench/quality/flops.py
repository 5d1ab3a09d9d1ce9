"""Parameter and FLOP counts of a Llama-shaped dense model and its upcycled MoE (matmul FLOPs, 2 per multiply-add).

Per token, forward: n * [2h(2a + 2g) + 4 S a + 2 * 3 h i] + 2 h V, with a = heads * head_dim, g = kv_heads *
head_dim, S = sequence length (attention scores and values over the full row, as bench/step_time.py counts them);
an MoE layer adds (k - 1) * 2 * 3 h i (k experts per token) + 2 h E (router). Training = 3 x forward.
"""

from __future__ import annotations


def counts(*, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, seq: int,
           experts: int = 1, top_k: int = 1) -> dict:
    h, i, n, V = hidden, intermediate, layers, vocab
    hd = h // heads
    a, g = heads * hd, kv_heads * hd
    attn = h * (2 * a + 2 * g)
    mlp = 3 * h * i
    moe = experts > 1
    total = n * (attn + mlp * experts + (h * experts if moe else 0) + 2 * h) + 2 * V * h + h
    active = n * (attn + mlp * (top_k if moe else 1) + (h * experts if moe else 0) + 2 * h) + 2 * V * h + h
    fwd = n * (2 * attn + 4 * seq * a + 2 * mlp) + 2 * h * V
    if moe:
        fwd += n * ((top_k - 1) * 2 * mlp + 2 * h * experts)
    return {"params": total, "active_params": active, "active_nonembedding": active - 2 * V * h - h,
            "train_flops_per_token": 3 * fwd}
