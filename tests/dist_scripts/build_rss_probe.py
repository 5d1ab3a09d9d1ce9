"""Build our DeepSpeed-MoE model of an HF MoE checkpoint at ep_size EP (one rank per torchrun process, or a single
process) in bf16 on the CPU, and report how much the process's peak RSS grew while building, and the dtypes of
the built parameters. Writes OUT_DIR/rss_rank{r}.json. WARMUP_CKPT (a tiny checkpoint of the same family and expert
count) is built first, so that the fixed costs of a first build (modeling code imported lazily, expert-parallel
groups, allocator arenas; 30-100 MB depending on the torch build) are not counted as the model's.

usage: build_rss_probe.py CKPT OUT_DIR EP WARMUP_CKPT
"""

import json
import resource
import sys
from pathlib import Path

import psutil
import torch

from upcycle_ds.io.hf import HFCheckpoint
from upcycle_ds.launch.distributed import init_distributed, shutdown
from upcycle_ds.surgery import build_moe_model

ckpt, out, ep, warmup = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = init_distributed()
rank = torch.distributed.get_rank()
del_me = build_moe_model(HFCheckpoint(warmup), ep_size=ep, dtype=torch.bfloat16, device=device)
del del_me
before = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
model = build_moe_model(HFCheckpoint(ckpt), ep_size=ep, dtype=torch.bfloat16, device=device)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
params = sum(p.numel() * p.element_size() for p in model.parameters())
(out / f"rss_rank{rank}.json").write_text(json.dumps({
    "growth": peak - before, "param_bytes": params,
    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    "devices": sorted({str(p.device) for p in model.parameters()})}))
shutdown()
