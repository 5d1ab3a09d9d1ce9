"""Benchmark `upcycle-ds upcycle` on a realistic ~1.1B dense Llama (TinyLlama shape) -> 8-expert Mixtral.

Generates a random bf16 checkpoint (hidden 2048, intermediate 5632, 22 layers, vocab 32000, 32 heads, 4 kv heads)
tensor by tensor into sharded safetensors (never more than one tensor in memory), runs the real CLI in a subprocess,
and reports wall seconds, output GB/s and the subprocess's peak RSS next to the output size. RSS is also sampled from
/proc every 50 ms and split into anonymous memory (heap: tensors we hold) and file-backed pages (memory-mapped input
shards, which count in RSS while mapped but are page cache the kernel can drop, not memory we allocated).

    .venv/bin/python bench/upcycle_speed.py --workdir /tmp/upcycle_bench   # writes ~2.2 GB in + ~13 GB out

The dense input is written just before the run, so it is read from the page cache (warm); pass --drop-caches (root)
to read it cold. The CLI does not fsync; `sync` time after it exits is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cli_cmd import cli, cli_env  # noqa: E402
from upcycle_ds.io.hf import write_sharded  # noqa: E402  (streaming safetensors writer, one tensor at a time)

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000,
             num_attention_heads=32, num_key_value_heads=4)


def dense_plan(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int):
    """(key, dtype, shape) of an HF LlamaForCausalLM checkpoint, in the order save_pretrained uses."""
    hd = hidden // heads
    bf = torch.bfloat16
    plan = [("model.embed_tokens.weight", bf, (vocab, hidden))]
    for l in range(layers):
        p = f"model.layers.{l}."
        plan += [(p + "input_layernorm.weight", bf, (hidden,)),
                 (p + "self_attn.q_proj.weight", bf, (heads * hd, hidden)),
                 (p + "self_attn.k_proj.weight", bf, (kv_heads * hd, hidden)),
                 (p + "self_attn.v_proj.weight", bf, (kv_heads * hd, hidden)),
                 (p + "self_attn.o_proj.weight", bf, (hidden, heads * hd)),
                 (p + "post_attention_layernorm.weight", bf, (hidden,)),
                 (p + "mlp.gate_proj.weight", bf, (inter, hidden)),
                 (p + "mlp.up_proj.weight", bf, (inter, hidden)),
                 (p + "mlp.down_proj.weight", bf, (hidden, inter))]
    plan += [("model.norm.weight", bf, (hidden,)), ("lm_head.weight", bf, (vocab, hidden))]
    return plan


def write_dense(path: Path, shard_gb: float, seed: int = 0) -> int:
    import transformers

    path.mkdir(parents=True)
    cfg = transformers.LlamaConfig(**SHAPE, max_position_embeddings=2048, tie_word_embeddings=False,
                                   dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)

    def fetch(key: str) -> torch.Tensor:
        shape = shapes[key]
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    plan = dense_plan(SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"],
                      SHAPE["vocab_size"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"])
    shapes = {k: s for k, _, s in plan}
    return write_sharded(path, plan, fetch, int(shard_gb * 1024**3))


class RssSampler(threading.Thread):
    """Peak VmHWM / VmRSS / RssAnon / RssFile of one pid, sampled from /proc/PID/status.

    VmHWM is the kernel's own high-water mark of this process image's RSS (reset by exec), so its last reading is
    the true peak up to the last 50 ms. getrusage's ru_maxrss is not: Linux carries the pre-exec RSS over exec, and
    a child forked from this (large) benchmark process starts out with the parent's RSS.
    """

    def __init__(self, pid: int, every_s: float = 0.05, child: bool = False):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.child = pid, every_s, child
        self.peak = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while self.child and not self.stop.is_set():  # watch the child of `pid` (/usr/bin/time's command)
            try:
                kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            except FileNotFoundError:
                return
            if kids:
                self.pid = int(kids[0])
                break
            time.sleep(0.005)
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    k, _, v = line.partition(":")
                    if k in self.peak:
                        self.peak[k] = max(self.peak[k], int(v.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            self.stop.wait(self.every_s)


def _time_maxrss(stderr: str) -> float | None:
    for line in stderr.splitlines():
        if line.startswith("maxrss_kib="):
            return int(line.split("=")[1]) * 1024 / 1e9
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def spot_check(dense: Path, moe: Path, experts: int, layers: int) -> None:
    """The last expert of the first and last layer equals the dense MLP bit for bit (the output is real)."""
    from safetensors import safe_open

    def index(path: Path) -> dict[str, str]:
        f = path / "model.safetensors.index.json"
        if not f.is_file():
            with safe_open(str(path / "model.safetensors"), "pt") as h:
                return {k: "model.safetensors" for k in h.keys()}
        return json.loads(f.read_text())["weight_map"]

    di, mi = index(dense), index(moe)
    w = {"gate": "w1", "up": "w3", "down": "w2"}
    for l in (0, layers - 1):
        for p, wn in w.items():
            dk = f"model.layers.{l}.mlp.{p}_proj.weight"
            mk = f"model.layers.{l}.block_sparse_moe.experts.{experts - 1}.{wn}.weight"
            with safe_open(str(dense / di[dk]), "pt") as a, safe_open(str(moe / mi[mk]), "pt") as b:
                if not torch.equal(a.get_tensor(dk), b.get_tensor(mk)):
                    raise SystemExit(f"spot check failed: {mk} != {dk}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where to write the dense input and the MoE output "
                    "(needs ~16 GB free; default: a new temp dir); what this script creates there is removed")
    ap.add_argument("--num-layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer for a quick run")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--in-shard-gb", type=float, default=1.0, help="dense input shard size")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="passed to upcycle-ds (its default)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more upcycle-ds flags, e.g. --noise-std")
    ap.add_argument("--drop-caches", action="store_true", help="sync + drop the page cache before the run (root)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    SHAPE["num_hidden_layers"] = args.num_layers

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="upcycle_bench_")) if own_tmp else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=work))
    dense, moe = run_dir / "dense", run_dir / "moe"
    print(f"workdir {run_dir}; free {shutil.disk_usage(work).free / 1e9:.1f} GB", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        in_bytes = write_dense(dense, args.in_shard_gb)
        t_gen = time.perf_counter() - t0
        print(f"dense input: {in_bytes / 1e9:.2f} GB ({in_bytes // 2 / 1e9:.2f} B params bf16) in {t_gen:.1f} s",
              file=sys.stderr)
        if args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

        cmd = cli("upcycle", "--model", dense, "--out", moe, "--num-experts", args.experts, "--top-k", args.top_k,
                  "--max-shard-gb", args.max_shard_gb, *args.extra)
        # /usr/bin/time (when there) forks the command from a small process: its %M is an exact peak RSS
        gnu_time = Path("/usr/bin/time").exists()
        if gnu_time:
            cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M", *cmd]
        env = cli_env(TQDM_DISABLE="1")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        sampler = RssSampler(proc.pid, child=gnu_time)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of exactly this child
        t_run = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        if proc.returncode != 0:
            print(err, file=sys.stderr)
            raise SystemExit(f"upcycle-ds failed with exit code {proc.returncode}")
        t0 = time.perf_counter()
        os.sync()
        t_sync = time.perf_counter() - t0
        out_bytes = dir_bytes(moe)
        spot_check(dense, moe, args.experts, SHAPE["num_hidden_layers"])

        fig = {
            "input_gb": in_bytes / 1e9, "output_gb": out_bytes / 1e9, "seconds": t_run, "sync_seconds": t_sync,
            "output_gb_per_s": out_bytes / 1e9 / t_run,
            "peak_rss_gb": sampler.peak["VmHWM"] / 1e9,
            "ru_maxrss_gb": usage.ru_maxrss * 1024 / 1e9,  # KiB on Linux; includes the forking parent's RSS
            "time_maxrss_gb": _time_maxrss(err),
            "bench_parent_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "peak_rss_anon_gb": sampler.peak["RssAnon"] / 1e9, "peak_rss_file_gb": sampler.peak["RssFile"] / 1e9,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "cmd": " ".join(cmd),
        }
        fig["peak_rss_over_output"] = fig["peak_rss_gb"] / fig["output_gb"]
        print([l for l in err.splitlines() if l.startswith("wrote")][-1], file=sys.stderr)
        print(f"upcycle {fig['input_gb']:.2f} GB dense -> {fig['output_gb']:.2f} GB MoE ({args.experts} experts): "
              f"{t_run:.1f} s ({fig['output_gb_per_s']:.2f} GB/s written; user {usage.ru_utime:.1f} s, sys "
              f"{usage.ru_stime:.1f} s), sync after exit {t_sync:.1f} s\n"
              f"peak RSS {fig['peak_rss_gb']:.2f} GB = {100 * fig['peak_rss_over_output']:.1f}% of the output "
              f"(VmHWM; /usr/bin/time %M {fig['time_maxrss_gb'] or float('nan'):.2f} GB; sampled peaks: anon {fig['peak_rss_anon_gb']:.2f} GB, file-backed {fig['peak_rss_file_gb']:.2f} GB; "
              f"ru_maxrss {fig['ru_maxrss_gb']:.2f} GB includes the forking bench process's "
              f"{fig['bench_parent_maxrss_gb']:.2f} GB)")
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
        if fig["peak_rss_anon_gb"] > 0.25 * fig["output_gb"]:
            raise SystemExit("peak anonymous RSS is not far below the output size: the writer is not streaming")
    finally:
        if not args.keep:
            shutil.rmtree(work if own_tmp else run_dir, ignore_errors=True)
        else:
            print(f"kept {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
