"""Do the experts specialise? Which experts an HF MoE checkpoint routes held-out tokens to, by source-file type.

For every row (a held-out chunk labelled with its file's `corpus.file_type`), transformers runs the exported model
(Mixtral here; `output_router_logits=True`) and each token's top-k experts per MoE layer are counted, as our router
picks them (top-k of the softmax = top-k of the logits). Per layer and type: each expert's share of that type's
token-slots. One number per layer summarises it: the mutual information I(type; expert) in bits between a token's
file type and an expert slot it is routed to (0: every type spread over the experts alike; at most log2(types)).
A collapsed router shows as a few experts holding most of every type (`max_share_x_E` >> 1); a uniform one as
shares near 1/E in every type with I ~ 0.
"""

from __future__ import annotations

import math
from pathlib import Path

SHAPE_NOTE = "shares[type][layer][expert]: fraction of that type's token-slots routed to the expert (sums to 1)"


def routing_counts(model_dir: Path, rows: list[dict], max_length: int) -> dict:
    """{type: [layers][E] token-slot counts}, {type: tokens}, top_k, MoE layer count (fp32, CPU or the GPU)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    cfg = model.config
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    counts: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    with torch.no_grad():
        for r in rows:
            ids = tok(r["text"], return_tensors="pt", truncation=True, max_length=max_length).input_ids.to(device)
            logits = model(input_ids=ids, output_router_logits=True, use_cache=False).router_logits
            per_layer = torch.stack([torch.zeros(E, device=device).index_add_(
                0, lg.reshape(-1, E).topk(k, -1).indices.reshape(-1), torch.ones(ids.shape[1] * k, device=device))
                for lg in logits])
            counts[r["type"]] = counts.get(r["type"], 0) + per_layer
            tokens[r["type"]] = tokens.get(r["type"], 0) + ids.shape[1]
    return {"counts": {t: c.cpu().tolist() for t, c in counts.items()}, "tokens": tokens, "top_k": k,
            "experts": E}


def summarise(raw: dict) -> dict:
    """Shares per type and layer, their mutual information with the type, and collapse indicators per layer."""
    types = sorted(raw["counts"])
    E = raw["experts"]
    layers = len(next(iter(raw["counts"].values())))
    shares = {t: [[round(c / max(1e-12, sum(row)), 5) for c in row] for row in raw["counts"][t]] for t in types}
    mi, max_x_e, min_x_e = [], [], []
    for layer in range(layers):
        joint = [[raw["counts"][t][layer][e] for e in range(E)] for t in types]
        total = sum(map(sum, joint))
        p_t = [sum(r) / total for r in joint]
        p_e = [sum(joint[i][e] for i in range(len(types))) / total for e in range(E)]
        mi.append(sum(joint[i][e] / total * math.log2(joint[i][e] / total / (p_t[i] * p_e[e]))
                      for i in range(len(types)) for e in range(E) if joint[i][e] > 0))
        max_x_e.append(max(p_e) * E)
        min_x_e.append(min(p_e) * E)
    return {"types": types, "tokens": raw["tokens"], "top_k": raw["top_k"], "experts": E, "shares": shares,
            "shares_note": SHAPE_NOTE, "mutual_info_bits": mi, "mutual_info_bits_mean": sum(mi) / len(mi),
            "max_share_x_E": max_x_e, "min_share_x_E": min_x_e}


def specialisation(model_dir: Path, rows: list[dict], max_length: int) -> dict:
    return summarise(routing_counts(model_dir, rows, max_length))
