"""One data path for every stage: the UpIT recipe runs from a parquet file (sft -> assemble -> seed-data), and the
token ids seed-data scores for a row are exactly the ids sft trained on for that row (read from sft's data cache).
The recipe assembles a granular MoE (2 slices per checkpoint MLP): seed-data scores the copies assemble used."""

from __future__ import annotations

import json

import datasets
import pytest
import transformers
import yaml

from cli_proc import cli_env, run_cli
import tiny
from upcycle_ds.data.store import TokenStore
from upcycle_ds.upit.seed_data import SeedRows, encode


@pytest.mark.slow
def test_upit_recipe_from_parquet_scores_the_trained_tokens(tmp_path):
    dense = tiny.make_dense("llama", tmp_path / "dense")
    tiny.make_tokenizer(dense)
    src = tiny.make_jsonl(tmp_path / "train.jsonl", 40, "messages")
    mixed = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(tmp_path / "hf"))
    data = tmp_path / "train.parquet"
    mixed.to_parquet(str(data))
    recipe = {
        "model": str(dense), "data": str(data), "out": str(tmp_path / "upit"), "num_experts": 4, "top_k": 2,
        "stages": ["sft", "assemble", "seed_data"],
        "assemble": {"granularity": 2},  # 2 copies (the last 2 of 3 sft checkpoints) x 2 slices: seed-data scores copies
        "common": {"dtype": "fp32", "zero_stage": 0, "micro_batch_size": 4, "max_length": 96, "eval_fraction": 0,
                   "wandb_mode": "disabled"},
        "sft": {"epochs": 1, "lr": 1e-3, "save_every_epochs": 0.3, "save_until_epochs": 1},
        "seed_data": {"fraction": 0.5, "max_length": 96},
    }
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    cache = tmp_path / "cache"
    r = run_cli("upit", "--config", cfg, env=cli_env(WANDB_MODE="disabled", UPCYCLE_DS_DATA_CACHE=str(cache)),
                timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "upit"
    seed = [json.loads(line) for line in (out / "seed_data" / "seed.jsonl").read_text().splitlines()]
    report = json.loads((out / "seed_data" / "seed_report.json").read_text())
    # 20 rows picked; a two-turn chat whose last answer lay beyond max_length would have nothing to score (training
    # would still learn its first answer): skipped and reported, as training drops samples with no label left
    skipped = report["skipped_no_response_tokens"]
    assert len(seed) + len(skipped) == 20 and len(seed) >= 10 and {s["expert"] for s in seed} <= {0, 1}
    assert all(len(mixed[i]["messages"]) == 5 for i in skipped)

    # what sft trained on: its cache entry of the parquet file (the only tokenised source)
    (entry,) = [TokenStore(p) for p in (cache / "tokens").iterdir()]
    assert entry.meta["source"] == str(data) and entry.meta["rows_total"] == 40
    cks = sorted((out / "sft" / "checkpoints_hf").glob("ckpt-*"))
    assert len(cks) == 3 and report["granularity"] == 2 and [e["model"] for e in report["experts"]] == \
        [str(c) for c in cks[1:]]
    expert = cks[0]
    tok = transformers.AutoTokenizer.from_pretrained(expert)
    rows = SeedRows(str(data))
    scored, skipped = encode(rows, [s["index"] for s in seed], tok, max_length=96)
    assert not skipped
    multi_turn = 0
    for s in seed:
        ids, labels = scored[s["index"]]
        (k,) = [k for k, row in enumerate(entry.rows.tolist()) if row == s["index"]]
        trained_ids, trained_mask = entry.read(k)
        assert ids == trained_ids.tolist(), s["index"]
        trained = set(i for i, m in enumerate(trained_mask.tolist()) if m and i > 0)
        scored_pos = {i for i, t in enumerate(labels) if t != -100}
        assert scored_pos and scored_pos <= trained  # the last assistant turn of what was trained
        multi_turn += scored_pos != trained
        assert s["messages"] == mixed[s["index"]]["messages"]
    assert multi_turn > 0  # some rows have two assistant turns: only the last is scored
