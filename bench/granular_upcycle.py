"""Benchmark granular upcycling on a ~1.1B dense model: 64 fine-grained experts (G=8 slices x C=8 copies) with one
shared expert, against plain 8-expert copy upcycling of the same input, in the same run.

The dense input is a random bf16 Qwen2 of TinyLlama's shape (hidden 2048, intermediate 5632, 22 layers, vocab 32000,
32 heads, 4 KV heads; Qwen2 adds q/k/v biases): a Llama / Mistral would export as Mixtral, which has no shared expert,
so the shared-expert case needs the Qwen2 -> Qwen2-MoE target. Written tensor by tensor (names and shapes from
transformers' own model on the meta device), then each upcycle runs as the real CLI in a subprocess under the
RSS sampler of bench/upcycle_speed.py; outputs are checked (an expert slice and the shared expert against the dense
MLP, bit for bit) and removed before the next run.

    .venv/bin/python bench/granular_upcycle.py --workdir /tmp/granular_bench      # ~2.3 GB in, 3 x ~13 GB out
    .venv/bin/python bench/granular_upcycle.py --num-layers 4                     # quick

Runs (all E x I_e equal to 8 dense MLPs, so all write the same bytes):
    coarse      --num-experts 8 --top-k 2                                      (the baseline)
    granular    --num-experts 64 --top-k 8 --granularity 8 --shared-fraction 0.125
    cluster     the same with --split cluster (balanced k-means per layer)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from upcycle_speed import RssSampler, _time_maxrss, dir_bytes  # noqa: E402

from bench.cli_cmd import cli, cli_env  # noqa: E402

from upcycle_ds.io.hf import HFCheckpoint, write_sharded  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000,
             num_attention_heads=32, num_key_value_heads=4)
RUNS = {
    "coarse": ["--num-experts", "8", "--top-k", "2"],
    "granular": ["--num-experts", "64", "--top-k", "8", "--granularity", "8", "--shared-fraction", "0.125"],
    "cluster": ["--num-experts", "64", "--top-k", "8", "--granularity", "8", "--shared-fraction", "0.125",
                "--split", "cluster"],
}


def write_dense(path: Path, shard_gb: float, seed: int = 0) -> int:
    """A random bf16 Qwen2 checkpoint of SHAPE, streamed (one tensor in memory at a time)."""
    import transformers

    path.mkdir(parents=True)
    cfg = transformers.Qwen2Config(**SHAPE, max_position_embeddings=2048, tie_word_embeddings=False,
                                   dtype="bfloat16")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(path)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    plan = [(k, torch.bfloat16, tuple(t.shape)) for k, t in meta.state_dict().items()]
    shapes = {k: s for k, _, s in plan}
    g = torch.Generator().manual_seed(seed)

    def fetch(key: str) -> torch.Tensor:
        shape = shapes[key]
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    return write_sharded(path, plan, fetch, int(shard_gb * 1024**3))


def spot_check(dense: Path, moe: Path, layers: int) -> None:
    """The last expert of the first and last layer is its dense slice (down x G), and the shared expert's `down` is
    its dense columns x 2; both bit for bit (bf16, powers of two)."""
    d, m = HFCheckpoint(dense), HFCheckpoint(moe)
    cfg = m.config
    probe = torch.randn(SHAPE["hidden_size"], dtype=torch.float64)

    def rows_of(gate: torch.Tensor, rows: torch.Tensor) -> list[int]:
        """Indices of `rows` in `gate`, matched by a random projection and then checked exactly."""
        where = {float(v): i for i, v in enumerate(gate.double() @ probe)}
        idx = [where.get(float(v), -1) for v in rows.double() @ probe]
        if -1 in idx or not torch.equal(gate[idx], rows):
            raise SystemExit("spot check failed: expert rows are not dense rows")
        return idx

    E, G = cfg["num_experts"], (cfg.get("upcycle_ds") or {}).get("granularity", 1)
    i_e = cfg["moe_intermediate_size"]
    for l in (0, layers - 1):
        gate = d.get(f"model.layers.{l}.mlp.gate_proj.weight")
        down = d.get(f"model.layers.{l}.mlp.down_proj.weight")
        eg = m.get(f"model.layers.{l}.mlp.experts.{E - 1}.gate_proj.weight")
        ed = m.get(f"model.layers.{l}.mlp.experts.{E - 1}.down_proj.weight")
        idx = rows_of(gate, eg)
        if len(idx) != i_e or not torch.equal(ed, (down[:, idx].float() * G).to(down.dtype)):
            raise SystemExit(f"spot check failed: layer {l} expert {E - 1} is not a dense slice x {G}")
        if cfg.get("shared_expert_intermediate_size"):
            sg = m.get(f"model.layers.{l}.mlp.shared_expert.gate_proj.weight")
            sd = m.get(f"model.layers.{l}.mlp.shared_expert.down_proj.weight")
            sidx = rows_of(gate, sg)
            if not torch.equal(sd, (down[:, sidx].float() * 2).to(down.dtype)):
                raise SystemExit(f"spot check failed: layer {l} shared expert down != dense columns x 2")


def run_upcycle(dense: Path, out: Path, flags: list[str], max_shard_gb: float) -> dict:
    cmd = cli("upcycle", "--model", dense, "--out", out, "--max-shard-gb", max_shard_gb, *flags)
    gnu_time = Path("/usr/bin/time").exists()
    if gnu_time:
        cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=cli_env(TQDM_DISABLE="1"), stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid, child=gnu_time)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        print(err, file=sys.stderr)
        raise SystemExit(f"upcycle-ds failed: {' '.join(cmd)}")
    t0 = time.perf_counter()
    os.sync()
    return {"seconds": seconds, "sync_seconds": time.perf_counter() - t0, "output_gb": dir_bytes(out) / 1e9,
            "peak_rss_gb": sampler.peak["VmHWM"] / 1e9, "time_maxrss_gb": _time_maxrss(err),
            "peak_rss_anon_gb": sampler.peak["RssAnon"] / 1e9, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "wrote": [l for l in err.splitlines() if l.startswith("wrote")][-1], "cmd": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where to write (needs ~16 GB free; default: a temp dir); what "
                    "this script creates there is removed")
    ap.add_argument("--num-layers", type=int, default=SHAPE["num_hidden_layers"], help="fewer for a quick run")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--max-shard-gb", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    SHAPE["num_hidden_layers"] = args.num_layers

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="granular_bench_")) if own_tmp else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=work))
    dense = run_dir / "dense"
    print(f"workdir {run_dir}; free {shutil.disk_usage(work).free / 1e9:.1f} GB", file=sys.stderr)
    figs = {}
    try:
        t0 = time.perf_counter()
        in_bytes = write_dense(dense, 1.0)
        print(f"dense input: {in_bytes / 1e9:.2f} GB bf16 Qwen2 in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for name in args.runs:
            out = run_dir / name
            fig = run_upcycle(dense, out, RUNS[name], args.max_shard_gb)
            spot_check(dense, out, SHAPE["num_hidden_layers"])
            shutil.rmtree(out)
            figs[name] = fig
            print(f"{name:9s} {fig['seconds']:6.1f} s  {fig['output_gb'] / fig['seconds']:.2f} GB/s  peak RSS "
                  f"{fig['peak_rss_gb']:.2f} GB (anon {fig['peak_rss_anon_gb']:.2f})  user {fig['user_s']:.1f} s "
                  f"sys {fig['sys_s']:.1f} s  | {fig['wrote']}", file=sys.stderr)
        base = figs.get("coarse")
        print(f"\ninput {in_bytes / 1e9:.2f} GB ({SHAPE['num_hidden_layers']} layers)")
        print(f"{'run':9s} {'wall s':>7s} {'vs coarse':>9s} {'out GB':>7s} {'peak RSS GB':>11s} {'user+sys s':>10s}")
        for name, f in figs.items():
            rel = f"{f['seconds'] / base['seconds']:.2f}x" if base else "-"
            print(f"{name:9s} {f['seconds']:7.1f} {rel:>9s} {f['output_gb']:7.2f} {f['peak_rss_gb']:11.2f} "
                  f"{f['user_s'] + f['sys_s']:10.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"input_gb": in_bytes / 1e9, "shape": SHAPE, "runs": figs},
                                                  indent=2) + "\n")
    finally:
        shutil.rmtree(work if own_tmp else run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
