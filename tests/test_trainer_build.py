"""How the Trainer builds and ends a run, with real processes:

- a rank builds only its share of the model, directly in the training dtype: at ep=2 the peak RSS growth of
  building is <= 0.6x that of building the whole model (a shape whose experts dominate; a tiny model is built first so
  that the fixed costs of a first build are not counted), every parameter bf16;
- the final HF export survives a process-group timeout shorter than the export: `--dist-timeout-s 10` while rank 0
  takes 20 s to write its shard (tests/inject/sitecustomize.py slows the write; test-only), and the other rank
  waits for it in the host-side I/O barrier; the export is complete and loads in transformers;
- attention implementations agree on packed rows (sdpa and eager, fp32 <= 1e-5): packing hands the per-sample
  boundaries to the kernel through position_ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from cli_proc import cli, cli_env
from tiny import make_jsonl, make_moe, make_tokenizer, moe_config

INJECT = str(Path(__file__).parent / "inject")


def _torchrun(script: str, nproc: int, *args: str) -> None:
    from upcycle_ds.launch.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(Path(__file__).parent / "dist_scripts" / script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_rank_builds_its_share_in_the_training_dtype(tmp_path):
    cfg = moe_config("mixtral", num_experts=16, top_k=2, hidden_size=256, intermediate_size=3072,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "moe")  # 16 experts x 4 layers x 3 x 256 x 3072 bf16 = 302 MB of experts
    del model
    warm = make_moe("mixtral", tmp_path / "warmup", num_experts=16, top_k=2)  # a tiny one built first, untimed
    full, half = tmp_path / "ep1", tmp_path / "ep2"
    full.mkdir(), half.mkdir()
    _torchrun("build_rss_probe.py", 1, str(tmp_path / "moe"), str(full), "1", str(warm))
    _torchrun("build_rss_probe.py", 2, str(tmp_path / "moe"), str(half), "2", str(warm))
    f = json.loads((full / "rss_rank0.json").read_text())
    assert f["param_bytes"] > 290e6 and f["growth"] > 0.5 * f["param_bytes"], f
    for r in range(2):
        h = json.loads((half / f"rss_rank{r}.json").read_text())
        assert h["dtypes"] == ["torch.bfloat16"] and h["devices"] == ["cpu"], h
        print(f"rank {r} at ep=2: build grew RSS by {h['growth'] / 1e6:.0f} MB, the full model's build by "
              f"{f['growth'] / 1e6:.0f} MB ({h['growth'] / f['growth']:.2f}x)")
        assert h["growth"] <= 0.6 * f["growth"], (h, f)


@pytest.mark.slow
def test_export_outlives_a_short_collective_timeout(tmp_path):
    moe = make_moe("mixtral", tmp_path / "moe", num_experts=2, top_k=1, num_hidden_layers=2)
    make_tokenizer(moe)
    data = make_jsonl(tmp_path / "train.jsonl", 60)
    env = cli_env(UPCYCLE_DS_TEST_SLOW_WRITE="20")
    env["PYTHONPATH"] = os.pathsep.join([INJECT, env["PYTHONPATH"]])
    cmd = [*cli("train"), "--nproc", "2", "--model", str(moe), "--data", str(data), "--out",
           str(tmp_path / "run"), "--ep-size", "2", "--max-steps", "1", "--micro-batch-size", "2", "--max-length", "64",
           "--dtype", "fp32", "--wandb-mode", "disabled", "--eval-fraction", "0", "--dist-timeout-s", "10"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HF MoE export" in r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not list((tmp_path / "run").glob(".hf.tmp-*"))


def test_attention_implementations_agree_on_packed_rows(tmp_path):
    from upcycle_ds.io.hf import HFCheckpoint
    from upcycle_ds.surgery import build_moe_model

    moe = make_moe("mixtral", tmp_path / "moe", num_experts=2, top_k=1, num_hidden_layers=2)
    ids = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)  # two samples packed per row
    out = {}
    for impl in ("sdpa", "eager"):
        model = build_moe_model(HFCheckpoint(moe), attn_impl=impl).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            out[impl] = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert (out["sdpa"] - out["eager"]).abs().max().item() <= 1e-5
    # and the second sample does not see the first: its logits equal those of the sample alone
    model = build_moe_model(HFCheckpoint(moe), attn_impl="sdpa").eval()
    with torch.no_grad():
        alone = model(input_ids=ids[:, 20:], use_cache=False).logits
    assert (out["sdpa"][:, 20:] - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("expert_impl", ["grouped", "loop"])
def test_activation_checkpointing_gives_the_same_gradients(tmp_path, expert_impl):
    """--activation-checkpointing recomputes each decoder layer (our MoE layer included) in backward: the loss and
    every gradient equal those without it (fp32 <= 1e-6 of scale). The first forward of a fresh process is the one
    checkpointed (a lazily cached probe inside it must not change what the recomputation saves)."""
    import subprocess

    moe = make_moe("mixtral", tmp_path / "moe", num_experts=4, top_k=2, num_hidden_layers=2)
    script = f"""
import torch
from upcycle_ds.io.hf import HFCheckpoint
from upcycle_ds.surgery import build_moe_model
ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
grads = []
for ac in (True, False):
    model = build_moe_model(HFCheckpoint({str(moe)!r}), expert_impl={expert_impl!r}).train()
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads.append({{n: p.grad for n, p in model.named_parameters()}})
worst = max(((grads[0][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads[1].items())
print(worst)
assert worst <= 1e-6, worst
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_a_finished_trainer_is_freed(tmp_path):
    """A Trainer that ran `fit()` is garbage once its caller drops it: the SIGUSR1 handler it installed is gone (the
    previous one is back) and holds no reference to it (on a GPU, a Trainer kept alive keeps its GPU memory).
    One process, no launcher."""
    moe = make_moe("mixtral", tmp_path / "moe", num_experts=2, top_k=1, num_hidden_layers=2)
    make_tokenizer(moe)
    data = make_jsonl(tmp_path / "train.jsonl", 40)
    script = f"""
import gc, signal, weakref
from upcycle_ds.launch.distributed import shutdown
from upcycle_ds.train.config import TrainArgs
from upcycle_ds.train.trainer import build_trainer

before = signal.getsignal(signal.SIGUSR1)
args = TrainArgs(model={str(moe)!r}, data=[{str(data)!r}], out={str(tmp_path / 'run')!r}, max_steps=2,
                 micro_batch_size=2, max_length=64, dtype="fp32", wandb_mode="disabled", export_hf=False,
                 eval_fraction=0.0)
trainer = build_trainer(args)
assert signal.getsignal(signal.SIGUSR1) is not before
assert trainer.fit() == 0
ref = weakref.ref(trainer)
del trainer
gc.collect()
assert signal.getsignal(signal.SIGUSR1) is before, signal.getsignal(signal.SIGUSR1)
assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
shutdown()
print("freed")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "freed" in r.stdout, r.stderr[-3000:]
