"""Stand-in for `upcycle-ds` under slurm/*.sbatch (UPCYCLE_DS_CMD="python tests/slurm_standin.py").

Takes the same command line (`train --config C --out RUN_DIR [--resume] ...` or `upit --config R ...`), finds its
rank with upcycle_ds.launch.dist_env, joins a gloo process group, all_reduces (rank + 1), and writes
OUT/ranks/rank{R}.json. Stand-in-only flags:
  --hold SECONDS    after the first all_reduce, "compute" (sleep, no communication) this long (fault tests)
  --hold-comm       during --hold, all_reduce every 0.1 s instead of sleeping
  --save            rank 0 writes OUT/checkpoints/latest before --hold, as a DeepSpeed save would (resume test)
  --timeout SECONDS torch.distributed timeout (default 30)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from upcycle_ds.launch.dist_env import setup_dist_env  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["train", "upit"])
    p.add_argument("--config", required=True)
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--hold", type=float, default=0.0)
    p.add_argument("--hold-comm", action="store_true")
    p.add_argument("--save", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    args, extra = p.parse_known_args()
    out = Path(args.out or os.environ["STANDIN_OUT"])

    de = setup_dist_env()
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank{de.rank}.pid").write_text(str(os.getpid()))
    print(f"rank {de.rank}/{de.world_size} local {de.local_rank}/{de.local_world_size} on "
          f"{os.environ.get('SLURMD_NODENAME')} master {de.master_addr}:{de.master_port} ({de.source})", flush=True)

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    assert dist.get_rank() == de.rank and dist.get_world_size() == de.world_size
    x = torch.tensor([float(de.rank + 1)])
    dist.all_reduce(x)
    if args.save and de.rank == 0:
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "latest").write_text("global_step1")
    deadline = time.monotonic() + args.hold
    rounds = 0
    while time.monotonic() < deadline:
        if args.hold_comm:
            dist.all_reduce(torch.ones(1))
            rounds += 1
        time.sleep(0.1)

    record = {**de.as_environ(), "source": de.source, "node": os.environ.get("SLURMD_NODENAME"),
              "hostname": socket.gethostname(), "allreduce": x.item(), "rounds": rounds, "command": args.command,
              "config": args.config, "resume": args.resume, "extra": extra,
              "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"rank{de.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {de.rank} done: allreduce={x.item()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
