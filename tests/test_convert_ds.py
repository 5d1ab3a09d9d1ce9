"""Converter against DeepSpeed itself, on 2 real CPU ranks (torchrun, gloo): checkpoints written by
`engine.save_checkpoint` after 3 training steps (ep_size=2, ZeRO-2 / ZeRO-1 bf16) convert to HF MoE checkpoints whose
transformers logits equal the engine's at that step, and master weights equal the optimizer's; checkpoints we write
load into a real engine with `load_checkpoint(load_module_only=True)` at ep_size 2 and 1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import input_ids, logits, make_dense, make_moe

from upcycle_ds.cli import main
from upcycle_ds.convert import ds_to_hf_moe
from upcycle_ds.launch.distributed import free_port
from upcycle_ds.families import family_for
from upcycle_ds.io.ds import DSCheckpoint
from upcycle_ds.io.hf import HFCheckpoint, read_config
from upcycle_ds.upcycle import UpcycledView, UpcycleOptions

SCRIPT = Path(__file__).parent / "dist_scripts" / "ds_train_save.py"


def torchrun(nproc: int, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(SCRIPT), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def ref_params(run: Path, what: str) -> dict:
    out = {}
    for r in range(2):
        out.update(torch.load(run / "ref" / f"rank{r}_{what}.pt", weights_only=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_type,extra", [("mixtral", {}), ("qwen3_moe", {"decoder_sparse_step": 2})])
def test_trained_zero2_ep2_to_hf_moe_logits_equal_engine(tmp_path, model_type, extra):
    moe = make_moe(model_type, tmp_path / "m", **extra)
    run = tmp_path / "run"
    torchrun(2, moe, run, 2, 2, 3, "fp32")
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step3"
    ds_to_hf_moe(ckpt, tmp_path / "hf")
    ref = torch.load(run / "ref" / "logits.pt", weights_only=True)
    got = logits(tmp_path / "hf", input_ids(seed=7))
    assert (got - ref).abs().max().item() <= 1e-5
    assert not torch.equal(HFCheckpoint(tmp_path / "hf").get("model.norm.weight"),
                           HFCheckpoint(moe).get("model.norm.weight"))  # it did train
    # every tensor equals what the engine held, module and (fp32 ZeRO-2) master weights alike
    fam, _ = family_for(read_config(moe))
    for weights in ("module", "master"):
        view = DSCheckpoint(ckpt, weights=weights)
        params = ref_params(run, "params" if weights == "module" else "master")
        assert len(params) == len(view.keys())
        for name, t in params.items():
            assert torch.equal(view.get(fam.hf_key_for_ds_param(name, 0)), t), (weights, name)
    # re-partition to ep_size 1 and back out: the same HF checkpoint
    assert main(["convert", "--input", str(ckpt), "--output", str(tmp_path / "ep1"), "--to", "ds",
                 "--ep-size", "1"]) == 0
    assert main(["convert", "--input", str(tmp_path / "ep1"), "--output", str(tmp_path / "hf1"),
                 "--to", "hf-moe"]) == 0
    a, b = HFCheckpoint(tmp_path / "hf"), HFCheckpoint(tmp_path / "hf1")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


@pytest.mark.slow
def test_bf16_zero1_master_weights_are_the_optimizers(tmp_path):
    moe = make_moe("qwen2_moe", tmp_path / "m", mlp_only_layers=[1])
    run = tmp_path / "run"
    torchrun(2, moe, run, 2, 1, 3, "bf16")
    fam, _ = family_for(read_config(moe))
    module, master = DSCheckpoint(run / "checkpoints"), DSCheckpoint(run / "checkpoints", weights="master")
    ref_m, ref_p = ref_params(run, "master"), ref_params(run, "params")
    n_diff = 0
    for name in ref_m:
        key = fam.hf_key_for_ds_param(name, 0)
        assert module.dtype(key) == torch.bfloat16 and master.dtype(key) == torch.float32
        assert torch.equal(module.get(key), ref_p[name])
        assert torch.equal(master.get(key), ref_m[name]), name
        n_diff += not torch.equal(master.get(key), module.get(key).float())
    assert n_diff > len(ref_m) // 2  # master weights really are more precise than the bf16 module
    assert main(["convert", "--input", str(run / "checkpoints"), "--output", str(tmp_path / "hf"), "--to", "hf-moe",
                 "--weights", "master"]) == 0
    assert HFCheckpoint(tmp_path / "hf").dtype("model.embed_tokens.weight") == torch.float32


@pytest.mark.slow
def test_dense_to_ds_loads_into_a_real_engine_at_ep2_and_ep1(tmp_path):
    dense = make_dense("llama", tmp_path / "d")
    assert main(["convert", "--input", str(dense), "--output", str(tmp_path / "ds"), "--to", "ds", "--ep-size", "2",
                 "--num-experts", "4"]) == 0
    view = UpcycledView(HFCheckpoint(dense), UpcycleOptions(num_experts=4, top_k=2))
    fam = view.family
    ref = logits(dense, input_ids(seed=7))
    for nproc in (2, 1):
        out = tmp_path / f"load{nproc}"
        torchrun(nproc, dense, out, nproc, 2, 0, "fp32", "load", tmp_path / "ds")
        loaded = {}
        for r in range(nproc):
            loaded.update(torch.load(out / "ref" / f"loaded_rank{r}.pt", weights_only=True))
        assert len(loaded) == len(view.keys())
        for name, t in loaded.items():
            assert torch.equal(t, view.get(fam.hf_key_for_ds_param(name, 0))), name
        got = torch.load(out / "ref" / "loaded_logits.pt", weights_only=True)
        assert (got - ref).abs().max().item() <= 1e-5  # copy-upcycled, k=2: the dense model's logits
