"""upcycle_ds.train.data with the real datasets library and a real (tiny, char-level) HF fast tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from tiny import make_dense, make_jsonl, make_tokenizer

from upcycle_ds.errors import UserError
from upcycle_ds.train.data import (IGNORE, DataConfig, PackedDataset, batches, build_datasets, load_examples,
                                   num_batches, pack_rows)

# A Qwen3-like template that is not prefix-stable: only the last assistant turn gets an (empty) think block.
THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat_template=False)
    return transformers.AutoTokenizer.from_pretrained(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def labelled_segments(ex: dict) -> list[list[int]]:
    """Maximal runs of labelled tokens (label == input id) in a sample or row."""
    segs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        lab, t = int(lab), int(t)
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            segs.append(cur)
            cur = []
    return segs + ([cur] if cur else [])


def unique_rows(tmp_path: Path, n: int) -> str:
    return write_jsonl(tmp_path / "u.jsonl", [{"prompt": f"#{i}?", "response": f"r{i}"} for i in range(n)])


# ------------------------------------------------------------------------------------------------ labels/rendering

def test_plain_prompt_response_labels_only_response_and_eos(tmp_path, plain_tok):
    rows = [{"prompt": "12+7=", "response": "19"}, {"prompt": "a", "completion": "b"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train, evals = load_examples(DataConfig(data=data, eval_fraction=0), plain_tok)
    assert evals == []
    texts = sorted(plain_tok.decode(e["input_ids"]) for e in train)
    assert texts == ["<s>12+7=19</s>", "<s>ab</s>"]  # BOS from the tokenizer, EOS appended
    for e in train:
        labelled = plain_tok.decode([t for t in e["labels"] if t != IGNORE])
        assert labelled in ("19</s>", "b</s>")
        assert plain_tok.decode(e["input_ids"]).endswith(labelled)


def test_prompt_response_uses_chat_template_when_tokenizer_has_one(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12+7=", "response": "19"}])
    (ex,), _ = load_examples(DataConfig(data=data, eval_fraction=0), tok)
    assert tok.decode(ex["input_ids"]) == "<s>User: 12+7=\nAssistant: 19</s>"  # exactly one BOS
    assert labelled_segments(ex) == [tok.encode("19</s>", add_special_tokens=False)]
    (ex,), _ = load_examples(DataConfig(data=data, eval_fraction=0, prompt_format="plain"), tok)
    assert tok.decode(ex["input_ids"]) == "<s>12+7=19</s>"
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "19</s>"


def test_messages_multi_turn_loss_on_every_assistant_turn_only(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "copy: abc"},
            {"role": "assistant", "content": "abc"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,), _ = load_examples(DataConfig(data=data, eval_fraction=0), tok)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert [tok.decode(s) for s in labelled_segments(ex)] == ["2</s>", "abc</s>"]


def test_messages_with_template_that_is_not_prefix_stable(tmp_path, tok):
    tok = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = THINK_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,), _ = load_examples(DataConfig(data=data, eval_fraction=0), tok)
    assert tok.decode(ex["input_ids"]).endswith("<|assistant|><think></think>ok<|end|>\n")
    assert [tok.decode(s) for s in labelled_segments(ex)] == ["yo<|end|>\n", "ok<|end|>\n"]


def test_text_rows_label_every_token_but_bos(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    (ex,), _ = load_examples(DataConfig(data=data, eval_fraction=0), tok)
    assert tok.decode(ex["input_ids"]) == "<s>hello</s>"
    assert ex["labels"][0] == IGNORE and tok.decode(ex["labels"][1:]) == "hello</s>"


def test_truncation_and_drop(tmp_path, tok):
    rows = [{"prompt": "p" * 40, "response": "r"}, {"prompt": "p", "response": "x" * 40}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _ = load_examples(DataConfig(data=data, eval_fraction=0, max_length=30, prompt_format="plain"), tok)
    (ex,) = train  # the first lost its response to truncation: dropped
    assert len(ex["input_ids"]) == 30 and tok.decode(ex["input_ids"]) == "<s>p" + "x" * 28
    with pytest.raises(UserError, match="no training samples"):
        load_examples(DataConfig(data=data, eval_fraction=0, max_length=20, prompt_format="plain", max_samples=1,
                                 seed=_seed_picking_row(0, 2)), tok)


def _seed_picking_row(row: int, n: int) -> int:
    import numpy as np

    return next(s for s in range(100) if np.random.default_rng(s).permutation(n)[0] == row)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "disk"])
def test_other_formats_give_same_examples(tmp_path, tok, fmt):
    src = make_jsonl(tmp_path / "d.jsonl", 20, "messages")
    ds = datasets.load_dataset("json", data_files=str(src), split="train")
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif fmt == "disk":
        path = tmp_path / "d_dir"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "d_dir"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    cfg = dict(eval_fraction=0.2, seed=3)
    assert load_examples(DataConfig(data=str(path), **cfg), tok) == load_examples(DataConfig(data=str(src), **cfg), tok)


# --------------------------------------------------------------------------------------------------------- packing

def test_pack_rows_uses_every_sample_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    rows = pack_rows(lengths, 50)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 50 for r in rows)
    assert len(rows) <= sum(lengths) / 50 * 1.1  # best-fit decreasing packs tightly


@pytest.mark.parametrize("pack", [True, False])
def test_packed_rows_hold_every_sample_with_its_own_labels(tmp_path, tok, pack):
    data = make_jsonl(tmp_path / "d.jsonl", 60, "messages")
    train, _ = load_examples(DataConfig(data=str(data), eval_fraction=0, max_length=96), tok)
    ds = PackedDataset(train, 96, tok.pad_token_id, pack=pack)
    assert len(ds) < len(train) if pack else len(ds) == len(train)
    seen = []
    for r in range(len(ds)):
        row = ds[r]
        assert all(v.shape == (96,) and v.dtype == torch.long for v in row.values())
        t = 0
        for i in ds.row_samples[r]:
            ids, labels = train[i]["input_ids"], train[i]["labels"]
            n = len(ids)
            assert row["input_ids"][t: t + n].tolist() == ids
            assert row["position_ids"][t: t + n].tolist() == list(range(n))
            assert row["labels"][t: t + n].tolist() == [IGNORE] + labels[1:]  # never labels across a boundary
            t += n
            seen.append(i)
        assert (row["input_ids"][t:] == tok.pad_token_id).all() and (row["labels"][t:] == IGNORE).all()
    assert sorted(seen) == list(range(len(train)))
    assert ds.num_label_tokens == sum(sum(lab != IGNORE for lab in e["labels"][1:]) for e in train)


def test_packed_row_attends_within_each_sample_only(tmp_path):
    """Packed row + restarting position_ids, no attention_mask: logits equal each sample run alone."""
    model = transformers.AutoModelForCausalLM.from_pretrained(make_dense("llama", tmp_path / "m"),
                                                              dtype=torch.float32).eval()
    a, b = [1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 2]
    ds = PackedDataset([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], 16, 0)
    assert len(ds) == 1
    batch = next(batches(ds, micro_batch_size=1, rank=0, world_size=1, seed=0, epoch=0))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x in (a, b)]
        plain = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                      position_ids=batch["position_ids"], use_cache=False).logits[0]
    labels = batch["labels"][0].tolist()
    assert labels == [IGNORE] + a[1:] + [IGNORE] + b[1:] + [IGNORE] * 5  # no loss predicting b[0] from a's end
    torch.testing.assert_close(packed[:6], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[6:11], alone[1], rtol=0, atol=1e-5)
    assert (plain[6:11] - alone[1]).abs().max() > 1e-3  # plain causal attention would leak across samples


# -------------------------------------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def rows_ds():
    """37 single-sample rows whose first label-free token is the row's id."""
    examples = [{"input_ids": [i + 3] * 4, "labels": [i + 3] * 4} for i in range(37)]
    return PackedDataset(examples, 4, 0, pack=False)


def ids_of(batch_list) -> list[int]:
    return [int(b) for batch in batch_list for b in batch["input_ids"][:, 0]]


def run(ds, **kw):
    kw = {"micro_batch_size": 4, "rank": 0, "world_size": 1, "seed": 0, "epoch": 0, **kw}
    return list(batches(ds, **kw))


def test_rank_sharding_disjoint_equal_and_covering(rows_ds):
    r0, r1 = (run(rows_ds, rank=k, world_size=2, micro_batch_size=3) for k in (0, 1))
    assert len(r0) == len(r1) == num_batches(37, micro_batch_size=3, world_size=2) == 6
    a, b = ids_of(r0), ids_of(r1)
    assert not set(a) & set(b) and len(set(a)) == len(a) == 18
    assert len(set(a) | set(b)) == 36  # only the remainder (37 - 36) is dropped
    assert all(b["input_ids"].shape == (3, 4) for b in r0)


def test_pad_remainder_covers_every_row_with_empty_padding(rows_ds):
    r = [run(rows_ds, rank=k, world_size=2, micro_batch_size=4, pad_remainder=True, shuffle=False) for k in (0, 1)]
    assert len(r[0]) == len(r[1]) == num_batches(37, micro_batch_size=4, world_size=2, pad_remainder=True) == 5
    ids = ids_of(r[0]) + ids_of(r[1])
    assert sorted(i for i in ids if i != 0) == [i + 3 for i in range(37)]
    pads = [(b, j) for batch in r[0] + r[1] for j, b in enumerate([batch] * len(batch["input_ids"]))
            if int(b["input_ids"][j, 0]) == 0]
    assert len(pads) == 3 and all((b["labels"][j] == IGNORE).all() for b, j in pads)


def test_order_deterministic_per_seed_and_epoch(rows_ds):
    e0 = ids_of(run(rows_ds))
    assert e0 == ids_of(run(rows_ds))
    assert e0 != ids_of(run(rows_ds, epoch=1))
    assert e0 != ids_of(run(rows_ds, seed=1))
    assert sorted(e0) != e0  # actually shuffled


def test_resume_from_start_matches_skipping(rows_ds):
    full = run(rows_ds, rank=1, world_size=2, epoch=3)
    for k in (0, 1, len(full) - 1, len(full)):
        resumed = run(rows_ds, rank=1, world_size=2, epoch=3, start=k)
        assert len(resumed) == len(full) - k
        assert all(torch.equal(x[key], y[key]) for x, y in zip(resumed, full[k:]) for key in x)
    with pytest.raises(ValueError, match="start=5 is outside this epoch's 4 micro-batches"):
        batches(rows_ds, micro_batch_size=4, rank=1, world_size=2, seed=0, epoch=3, start=5)  # raised eagerly


# ------------------------------------------------------------------------------------------------------ eval split

def test_eval_split_disjoint_deterministic(tmp_path, tok):
    data = unique_rows(tmp_path, 50)
    cfg = DataConfig(data=data, eval_fraction=0.1, seed=5)
    train, evals = load_examples(cfg, tok)
    names = lambda xs: {tok.decode(x["input_ids"]) for x in xs}  # noqa: E731
    assert len(evals) == 5 and len(train) == 45
    assert not names(train) & names(evals) and len(names(train) | names(evals)) == 50
    assert load_examples(cfg, tok) == (train, evals)
    assert names(load_examples(DataConfig(data=data, eval_fraction=0.1, seed=6), tok)[1]) != names(evals)
    assert load_examples(DataConfig(data=data, eval_fraction=0), tok)[1] == []
    train_s, eval_s = load_examples(DataConfig(data=data, eval_fraction=0.1, max_samples=20), tok)
    assert (len(train_s), len(eval_s)) == (18, 2)


def test_separate_eval_data_and_build_datasets(tmp_path, tok):
    data = unique_rows(tmp_path, 30)
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "q", "response": "a"}] * 3)
    train, evals = load_examples(DataConfig(data=data, eval_data=ev), tok)
    assert len(train) == 30 and [tok.decode(e["input_ids"]) for e in evals] == ["<s>User: q\nAssistant: a</s>"] * 3
    tr, ev_ds = build_datasets(DataConfig(data=data, eval_data=ev, max_length=64), tok)
    assert tr.num_samples == 30 and ev_ds.num_samples == 3 and len(ev_ds) == 2  # 28 tokens each, 2 per 64
    assert build_datasets(DataConfig(data=data, eval_fraction=0), tok)[1] is None


# ---------------------------------------------------------------------------------------------------------- errors

def test_errors(tmp_path, tok, plain_tok):
    def err(match, tokenizer=tok, **kw):
        with pytest.raises(UserError, match=match):
            load_examples(DataConfig(**{"eval_fraction": 0, **kw}), tokenizer)

    err("data file not found: .*nope.jsonl", data=str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    err(r"unsupported data file extension '\.txt'", data=str(tmp_path / "d.txt"))
    (tmp_path / "e.jsonl").write_text("")
    err("data file is empty", data=str(tmp_path / "e.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    err("cannot read .*bad.jsonl as json", data=str(tmp_path / "bad.jsonl"))
    rows = [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": "a", "foo": 1}]
    err(r"row 3: needs 'messages'.*found columns \['foo', 'prompt'\]", data=write_jsonl(tmp_path / "c.jsonl", rows))
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    err("row 0: .*tokenizer has no chat template", tokenizer=plain_tok, data=msgs)
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    err("row 0: .*unknown role robot", data=bad_role)
    (tmp_path / "dir").mkdir()
    err("not one written by datasets' save_to_disk", data=str(tmp_path / "dir"))
    err("too few to hold out", data=write_jsonl(tmp_path / "one.jsonl", rows[:1]), eval_fraction=0.1)
    with pytest.raises(UserError, match="eval_fraction must be in"):
        DataConfig(data="x", eval_fraction=1.0)
