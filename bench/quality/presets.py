"""Model and run sizes of bench/upcycle_quality.py (`--size`). Every field can be overridden from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Size:
    # model (Llama, untied embeddings) and tokenizer
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    # data
    seq: int
    """--max-length: tokens per packed row."""
    mbs: int
    """Rows per optimizer step (one rank): tokens per step = mbs * seq. The equal-steps suite runs them as one
    micro-batch; the equal-flops suite as mbs / micro_mbs micro-batches (--grad-accum)."""
    micro_mbs: int = 1
    """--micro-batch-size of the equal-flops suite: the micro-batch the per-micro-batch aux loss balances (one
    packed row on CPU, as a rank's micro-batch is a small part of a data-parallel job's global batch)."""
    chunk_chars: int
    """Corpus rows: files cut into pieces of at most this many characters. Pieces longer than `seq` tokens are
    truncated to it (`--max-length`), so ~4 x seq characters fill every packed row; shorter pieces leave padding
    (at cpu size, 640 characters ~ 190 tokens: rows 74 % filled), which MoE layers route like any token."""
    heldout_rows: int
    bpe_chars: int
    """Characters of pretraining text the BPE tokenizer is trained on."""
    # schedule
    pretrain_steps: int
    pretrain_lr: float
    steps: int
    """M: continuation steps of every arm."""
    lr: float
    warmup: int
    evals: int
    """Held-out evaluations per continuation run (the curve's points)."""
    dtype: str
    zero_stage: int
    experts: int = 8
    """E of the coarse arms (b), (c), (e); the granular arms have E * granularity experts (one copy's worth)."""
    top_k: int = 2
    """k of (b) and (c); (e) is top-1, the granular arms top-granularity."""
    granularity: int = 4
    reinit_ratio: float = 0.5
    typed_rows: int = 48
    """Held-out rows per source-file type for the specialisation view."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_batch: int = 8
    parallel: int = 1
    """Training runs at a time (the continuation runs of all seeds and arms are independent). On CPU one per core
    (each run is one thread: OMP_NUM_THREADS=1); on one GPU the small runs share the device, and their start-ups
    (imports, tokenization, export) overlap."""


SIZES = {
    # 2 CPU cores (one rank, 1 thread per run, 2 runs at a time): see docs/benchmarks.md for what was tried
    "cpu": Size(vocab=4096, hidden=128, intermediate=352, layers=4, heads=4, kv_heads=4, seq=256, mbs=8,
                chunk_chars=640, heldout_rows=80, bpe_chars=3_000_000, pretrain_steps=600, pretrain_lr=1e-3,
                steps=360, lr=1e-3, warmup=6, evals=6, dtype="fp32", zero_stage=0, parallel=2),
    # one H200, bf16, ~100M-class dense model (estimated, see docs/benchmarks.md)
    "gpu": Size(vocab=16384, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, seq=1024, mbs=16,
                micro_mbs=4, chunk_chars=4096, heldout_rows=256, bpe_chars=8_000_000, pretrain_steps=500,
                pretrain_lr=6e-4, steps=150, lr=6e-4, warmup=10, evals=6, dtype="bf16", zero_stage=1, eval_batch=16,
                parallel=6),
    # the CPU rehearsal of bench/gpu/run.sh (REHEARSE=cpu): the gpu size's precision and ZeRO stage at toy size,
    # one seed (seconds; numbers meaningless)
    "rehearse": Size(vocab=512, hidden=32, intermediate=64, layers=2, heads=2, kv_heads=2, seq=64, mbs=4,
                     chunk_chars=200, heldout_rows=16, bpe_chars=100_000, pretrain_steps=8, pretrain_lr=3e-3,
                     steps=4, lr=3e-3, warmup=1, evals=2, dtype="bf16", zero_stage=1, seeds=[0], eval_batch=8),
    # smoke test of the script (minutes on CPU; numbers meaningless)
    "tiny": Size(vocab=512, hidden=32, intermediate=64, layers=2, heads=2, kv_heads=2, seq=64, mbs=4,
                 chunk_chars=200, heldout_rows=16, bpe_chars=200_000, pretrain_steps=12, pretrain_lr=3e-3,
                 steps=6, lr=3e-3, warmup=2, evals=2, dtype="fp32", zero_stage=0, seeds=[0]),
}
