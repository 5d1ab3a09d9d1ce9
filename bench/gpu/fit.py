"""How many training runs of a quality bench may share this machine's accelerator at once: sized from
`upcycle-ds plan`'s per-rank peak for the bench's largest run (its upcycled MoE), plus a CUDA context per process,
with >= 30 % headroom (the plan's activation figure is an estimate; the allocator fragments):

    parallel = floor(memory / (HEADROOM x (plan peak + PER_PROCESS)))   at least 1; on CPU (the rehearsal) at most
                                                                        the cores (one thread per run)

bench/gpu/run.sh passes the answer to bench/upcycle_quality.py / bench/upit_quality.py as `--set parallel=N`.

    python bench/gpu/fit.py quality --size gpu [--set steps=100 ...]    # prints N last; the reasoning on stderr
    python bench/gpu/fit.py upit --size gpu
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HEADROOM = 1.3
PER_PROCESS_GIB = 1.0
"""A CUDA context and the caching allocator's slack per training process (about 0.5-0.7 GiB of context on H100)."""
GIB = 2**30


def parallel_runs(peak_bytes: float, memory_bytes: float, *, cores: int | None = None,
                  per_process_bytes: float = PER_PROCESS_GIB * GIB, headroom: float = HEADROOM) -> int:
    """The most runs of `peak_bytes` each that fit `memory_bytes` with `headroom` (at least 1; at most `cores` where
    given)."""
    fit = math.floor(memory_bytes / (headroom * (peak_bytes + per_process_bytes)))
    return max(1, min(fit, cores) if cores else fit)


def llama_config(size) -> dict:
    """The bench's dense Llama (bench/upcycle_quality.py `init_model`) as a config.json dict."""
    return {"model_type": "llama", "hidden_size": size.hidden, "intermediate_size": size.intermediate,
            "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads, "vocab_size": size.vocab, "tie_word_embeddings": False}


def moe_peak_bytes(config: dict, *, experts: int, top_k: int, mbs: int, seq: int, dtype: str, zero: int) -> float:
    """`upcycle-ds plan`'s peak for one rank training `config` upcycled to `experts` top-`top_k` on one device."""
    from upcycle_ds.plan import Setup, make_plan, upcycled_shape

    shape = upcycled_shape(config, num_experts=experts, top_k=top_k)
    setup = Setup(nodes=1, gpus_per_node=1, ep_size=1, zero_stage=zero, dtype=dtype, micro_batch_size=mbs,
                  seq_len=seq, activation_checkpointing=False)
    return make_plan(shape, setup).peak


def device_memory() -> tuple[float, str, int | None]:
    """(bytes, what, cores cap): the GPU's memory where torch sees CUDA, else the host's RAM and its cores."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), props.name, None
    import psutil

    return float(psutil.virtual_memory().total), "host RAM (no CUDA device)", os.cpu_count() or 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", choices=("quality", "upit"))
    p.add_argument("--size", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="the bench's own size overrides")
    p.add_argument("--memory-gib", type=float, help="a GPU of this much memory instead of this machine's")
    a = p.parse_args()
    from bench.quality.presets import SIZES as QUALITY
    from bench.upcycle_quality import apply_overrides

    if a.bench == "quality":
        size = apply_overrides(QUALITY[a.size], a.set)
        peak = moe_peak_bytes(llama_config(size), experts=size.experts, top_k=size.top_k, mbs=size.mbs,
                              seq=size.seq, dtype=size.dtype, zero=size.zero_stage)
    else:
        from bench.upit_quality import SIZES as UPIT

        base, size = QUALITY[a.size], UPIT[a.size]
        peak = moe_peak_bytes(llama_config(base), experts=size.experts, top_k=2, mbs=size.mbs, seq=size.seq,
                              dtype=size.dtype, zero=size.zero_stage)
    memory, what, cores = (a.memory_gib * GIB, "given", None) if a.memory_gib else device_memory()
    n = parallel_runs(peak, memory, cores=cores)
    print(f"bench/gpu/fit.py {a.bench} --size {a.size}: plan {peak / GIB:.1f} GiB per MoE run + {PER_PROCESS_GIB:g} "
          f"GiB per process, x {HEADROOM} headroom = {HEADROOM * (peak / GIB + PER_PROCESS_GIB):.1f} GiB; "
          f"{memory / GIB:.1f} GiB {what} -> {n} at a time", file=sys.stderr)
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
