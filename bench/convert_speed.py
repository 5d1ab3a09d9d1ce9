"""Benchmark our dense -> 8-expert MoE conversion against `mergekit-moe` on the same 1.1B-shape dense Llama.

Generates a random bf16 TinyLlama-shape checkpoint (hidden 2048, intermediate 5632, 22 layers, vocab 32000) streamed
to safetensors (bench/upcycle_speed.py's generator), then runs, each in a subprocess under /usr/bin/time:
  ours:     upcycle-ds upcycle --model DENSE --out OURS --num-experts 8 --top-k 2
  mergekit: mergekit-moe CONFIG.yml MK --device cpu   (gate_mode random, 8 experts all = DENSE, bf16)
mergekit is installed by this script into its own venv under the workdir: first `pip install torch==2.13.0` (the
local CPU wheel), then `pip install -c constraints mergekit` with torch pinned, so no CUDA torch is pulled.
Prints wall seconds and peak RSS of both and our/mergekit time ratio. Needs ~2.2 GB + 2 x ~13 GB free; cleans up.

    .venv/bin/python bench/convert_speed.py --workdir /tmp/convert_bench [--json figures.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import upcycle_speed as us  # noqa: E402

from bench.cli_cmd import cli, cli_env  # noqa: E402


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (VmHWM of the command itself, via /usr/bin/time when present)."""
    gnu_time = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-f", "maxrss_kib=%M"] if gnu_time else []) + cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler = us.RssSampler(proc.pid, child=gnu_time)
    sampler.start()
    out, err = proc.communicate()
    secs = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        print(out[-3000:], err[-5000:], file=sys.stderr)
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    rss = us._time_maxrss(err) or sampler.peak["VmHWM"] / 1e9
    return {"seconds": secs, "peak_rss_gb": rss, "peak_rss_anon_gb": sampler.peak["RssAnon"] / 1e9,
            "cmd": " ".join(cmd)}


def write_tokenizer(path: Path, vocab: int) -> None:
    """A word-level fast tokenizer with `vocab` ids (mergekit-moe loads the base model's tokenizer)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)


def install_mergekit(venv: Path) -> Path:
    """A venv with mergekit; torch 2.13.0 (local CPU wheel) first, then mergekit constrained to it."""
    exe = venv / "bin" / "mergekit-moe"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    cons = venv / "constraints.txt"
    cons.write_text("torch==2.13.0\n")
    r = subprocess.run(pip + ["-c", str(cons), "mergekit"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mergekit install failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir); removed afterwards, "
                    "except the mergekit venv (reused next time)")
    ap.add_argument("--num-layers", type=int, default=us.SHAPE["num_hidden_layers"], help="fewer for a quick run")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    us.SHAPE["num_hidden_layers"] = args.num_layers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run_", dir=work))
    dense, ours, mk = run / "dense", run / "ours", run / "mergekit"
    fig: dict = {"layers": args.num_layers, "experts": args.experts}
    try:
        fig["input_gb"] = us.write_dense(dense, 1.0) / 1e9
        write_tokenizer(dense, us.SHAPE["vocab_size"])
        print(f"dense input {fig['input_gb']:.2f} GB; free {shutil.disk_usage(work).free / 1e9:.1f} GB",
              file=sys.stderr)
        fig["ours"] = timed(cli("upcycle", "--model", dense, "--out", ours, "--num-experts", args.experts,
                                "--top-k", 2), cli_env())
        fig["ours"]["output_gb"] = us.dir_bytes(ours) / 1e9
        us.spot_check(dense, ours, args.experts, args.num_layers)
        shutil.rmtree(ours)
        print(f"ours: {fig['ours']['seconds']:.1f} s, peak RSS {fig['ours']['peak_rss_gb']:.2f} GB", file=sys.stderr)
        if not args.skip_mergekit:
            mk_exe = install_mergekit(work / "mergekit-venv")
            cfg = run / "moe.yml"
            cfg.write_text(json.dumps({  # YAML is a superset of JSON
                "base_model": str(dense), "gate_mode": "random", "dtype": "bfloat16",
                "experts": [{"source_model": str(dense), "positive_prompts": [""]} for _ in range(args.experts)],
            }))
            fig["mergekit"] = timed([str(mk_exe), str(cfg), str(mk), "--device", "cpu"])
            fig["mergekit"]["output_gb"] = us.dir_bytes(mk) / 1e9
            fig["time_ratio_ours_over_mergekit"] = fig["ours"]["seconds"] / fig["mergekit"]["seconds"]
            print(f"mergekit: {fig['mergekit']['seconds']:.1f} s, peak RSS {fig['mergekit']['peak_rss_gb']:.2f} GB",
                  file=sys.stderr)
        print(json.dumps(fig, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
