"""UpIT end to end: `upcycle-ds upit --config recipe.yaml --nproc 2` (sft -> assemble -> seed-data -> router-init ->
train, real DeepSpeed ranks) gives an HF MoE checkpoint transformers loads; finished stages are skipped, a changed
stage config is refused; `upcycle-ds sft` checkpoints are complete HF dense models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

from cli_proc import cli_env, run_cli
import tiny

def upcycle_ds(*args, cwd=None):
    return run_cli(*args, env=cli_env(WANDB_MODE="disabled"), cwd=cwd, timeout=900)


@pytest.mark.slow
def test_upit_recipe_end_to_end_two_ranks(tmp_path):
    dense = tiny.make_dense("llama", tmp_path / "dense")
    tiny.make_tokenizer(dense)
    data = tiny.make_jsonl(tmp_path / "train.jsonl", 200, "messages")
    recipe = {
        "model": str(dense), "data": str(data), "out": str(tmp_path / "upit"), "num_experts": 4, "top_k": 2,
        "common": {"dtype": "fp32", "zero_stage": 2, "micro_batch_size": 2, "max_length": 128,
                   "wandb_mode": "disabled"},
        # 19 steps per epoch on 2 ranks; checkpoints at steps 6 and 13 -> 2 experts, 2 more by expansion (E=4)
        "sft": {"epochs": 1, "lr": 1e-3, "save_every_epochs": 0.34, "save_until_epochs": 1},
        "seed_data": {"fraction": 0.3},
        "router_init": {"epochs": 1, "lr": 1e-2},
        "train": {"max_steps": 3, "lr": 1e-3, "ep_size": 2},
    }
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    r = upcycle_ds("upit", "--config", cfg, "--nproc", 2)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "upit"
    for stage in ("sft", "assemble", "seed_data", "router_init", "train"):
        done = json.loads((out / stage / "DONE").read_text())
        assert done["stage"] == stage
    # sft: complete HF dense checkpoints, oldest first, trained (they differ from the base and from each other)
    cks = sorted((out / "sft" / "checkpoints_hf").glob("ckpt-*"))
    assert [c.name for c in cks] == ["ckpt-0006", "ckpt-0013"]
    base = tiny.logits(dense, tiny.input_ids(vocab=100))
    ck_logits = [tiny.logits(c, tiny.input_ids(vocab=100)) for c in cks]
    assert json.loads((cks[0] / "sft_checkpoint.json").read_text())["step"] == 6
    assert transformers.AutoTokenizer.from_pretrained(cks[0]).chat_template
    assert not torch.allclose(base, ck_logits[0]) and not torch.allclose(ck_logits[0], ck_logits[1])
    report = json.loads((out / "assemble" / "hf" / "upit_report.json").read_text())
    assert report["checkpoints_used"] == [str(c) for c in cks] and report["delta_base"] == str(dense)
    seed = [json.loads(l) for l in (out / "seed_data" / "seed.jsonl").read_text().splitlines()]
    assert len(seed) == 60 and all(0 <= s["expert"] < 4 for s in seed)
    # the final model: an HF Mixtral with 4 experts, loaded by transformers, finite logits
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "train" / "hf", dtype=torch.float32)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    assert torch.isfinite(tiny.logits(model, tiny.input_ids(vocab=100))).all()
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) >= 3
    # a second run skips every finished stage
    r = upcycle_ds("upit", "--config", cfg, "--nproc", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("done, skipped") == 5 and "launching" not in r.stderr
    # a changed stage config is refused, naming the field
    recipe["sft"]["lr"] = 2e-3
    cfg.write_text(yaml.safe_dump(recipe))
    r = upcycle_ds("upit", "--config", cfg)
    assert r.returncode == 2 and "stage sft is DONE with lr=0.001" in r.stderr and "Traceback" not in r.stderr


def test_upit_recipe_rejects_unknown_stage_field(tmp_path):
    dense = tiny.make_dense("llama", tmp_path / "dense")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(dense), "data": "x.jsonl", "out": str(tmp_path / "o"),
                                   "sft": {"save_every_epoch": 0.25}}))
    r = upcycle_ds("upit", "--config", cfg)
    assert r.returncode == 2 and "recipe `sft`: unknown field 'save_every_epoch'" in r.stderr
    cfg.write_text(yaml.safe_dump({"model": str(dense), "data": "x.jsonl", "out": str(tmp_path / "o"),
                                   "train": {"model": "elsewhere"}}))
    r = upcycle_ds("upit", "--config", cfg)
    assert r.returncode == 2 and "'model' is set by the recipe" in r.stderr


def test_sft_save_steps():
    from upcycle_ds.upit.sft import hf_save_steps

    # UpIT: every 0.25 epoch over the first 2 of 4 epochs -> 8 checkpoints
    assert hf_save_steps(100, 400, 0.25, 2.0) == [25, 50, 75, 100, 125, 150, 175, 200]
    assert hf_save_steps(10, 15, 0.5, None) == [5, 10, 15]
    assert hf_save_steps(2, 4, 0.25, 1.0) == [1, 2]  # finer than a step: duplicates collapse


def test_done_stage_survives_fields_added_later_but_not_changed_values():
    from upcycle_ds.errors import UserError
    from upcycle_ds.upit.recipe import _compare

    _compare("sft", {"lr": 1e-4}, {"lr": 1e-4, "fused_adam": True})  # a field added after the stage finished
    with pytest.raises(UserError, match="stage sft is DONE with lr=0.0001"):
        _compare("sft", {"lr": 1e-4}, {"lr": 2e-4})
