"""upcycle_ds.data with the real datasets library and a real (tiny, char-level) HF fast tokenizer."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers
from tiny import make_dense, make_jsonl, make_tokenizer

from upcycle_ds.data import (FORMATS, IGNORE, DataConfig, PackedDataset, RowFormat, TokenizeSpec, batches,
                             build_datasets, check_columns, encode_dataset, epoch_groups, load_examples, num_batches,
                             pack_rows, parse_source, parse_sources, prepare_cache, rank_groups, read_source)
from upcycle_ds.data import build as build_mod
from upcycle_ds.data import formats
from upcycle_ds.data.cache import publish
from upcycle_ds.data.formats import Pair
from upcycle_ds.errors import UserError

# A Qwen3-like template that is not prefix-stable: only the last assistant turn gets an (empty) think block.
THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """Every cache write of this module goes to a fresh temp dir (also datasets' own copies: cache_dir/hf)."""
    root = tmp_path_factory.mktemp("data_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPCYCLE_DS_DATA_CACHE", str(root))
        yield root


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


def unique_rows(tmp_path: Path, n: int, name: str = "u") -> str:
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"#{i}{name}?", "response": f"r{i}"} for i in range(n)])


def examples(data, tokenizer, **kw) -> list[dict]:
    return load_examples(DataConfig(data=data, eval_fraction=0, **kw), tokenizer)[0]


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
    (ex,) = examples(data, tok)
    assert tok.decode(ex["input_ids"]) == "<s>User: 12+7=\nAssistant: 19</s>"  # exactly one BOS
    assert labelled_segments(ex) == [tok.encode("19</s>", add_special_tokens=False)]
    (ex,) = examples(data, tok, prompt_format="plain")
    assert tok.decode(ex["input_ids"]) == "<s>12+7=19</s>"
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "19</s>"


MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="},
              {"role": "assistant", "content": "2"}, {"role": "user", "content": "copy: abc"},
              {"role": "assistant", "content": "abc"}]


def test_messages_multi_turn_loss_on_every_assistant_turn_only(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    (ex,) = examples(data, tok)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert [tok.decode(s) for s in labelled_segments(ex)] == ["2</s>", "abc</s>"]
    # the scoring option of the same path (seed-data): only the last assistant turn, same tokens
    ds = read_source(data)
    (last,), _ = encode_dataset(ds, [0], tok, TokenizeSpec(max_length=None, turns="last"), "d")
    assert last.input_ids.tolist() == ex["input_ids"]
    assert tok.decode(last.input_ids[last.loss_mask]) == "abc</s>"


def test_messages_with_template_that_is_not_prefix_stable(tmp_path, tok):
    tok = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = THINK_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,) = examples(data, tok)
    assert tok.decode(ex["input_ids"]).endswith("<|assistant|><think></think>ok<|end|>\n")
    assert [tok.decode(s) for s in labelled_segments(ex)] == ["yo<|end|>\n", "ok<|end|>\n"]


def test_text_rows_label_every_token_but_bos(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    (ex,) = examples(data, tok)
    assert tok.decode(ex["input_ids"]) == "<s>hello</s>"
    assert ex["labels"][0] == IGNORE and tok.decode(ex["labels"][1:]) == "hello</s>"


def test_truncation_and_drop(tmp_path, tok):
    rows = [{"prompt": "p" * 40, "response": "r"}, {"prompt": "p", "response": "x" * 40}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    (ex,) = examples(data, tok, max_length=30, prompt_format="plain")  # the first lost its response: dropped
    assert len(ex["input_ids"]) == 30 and tok.decode(ex["input_ids"]) == "<s>p" + "x" * 28
    with pytest.raises(UserError, match="no training samples"):
        examples(data, tok, max_length=20, prompt_format="plain", max_samples=1, seed=_seed_picking_row(0, 2))


def _seed_picking_row(row: int, n: int) -> int:
    return next(s for s in range(100) if np.random.default_rng(s).permutation(n)[0] == row)


# -------------------------------------------------------------------------------------------- the row-format table

def test_alpaca_evals_and_pretokenised_rows_equal_their_canonical_forms(tmp_path, tok):
    """Every row format is read by training too, with the tokens of the equivalent messages / prompt rows."""
    rows = [{"instruction": "Add.", "input": "2+2", "output": "4"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"input": [{"role": "user", "content": "1+1="}], "ideal": ["2", "two"]},
            {"input": "3+3=", "ideal": "6"}]
    same = [{"prompt": "Add.\n\n2+2", "response": "4"}, {"prompt": "Say hi.", "response": "hi"},
            {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
            {"prompt": "3+3=", "response": "6"}]
    for i, (r, s) in enumerate(zip(rows, same)):  # one file per row: a column's type differs between them
        assert examples(write_jsonl(tmp_path / f"a{i}.jsonl", [r]), tok) == \
            examples(write_jsonl(tmp_path / f"b{i}.jsonl", [s]), tok), r
    ids = tok.encode("<s>x=1", add_special_tokens=False)
    labels = [IGNORE] * 3 + ids[3:]
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"input_ids": ids, "labels": labels}, {"input_ids": ids}])
    assert examples(pre, tok) == [{"input_ids": ids, "labels": labels}, {"input_ids": ids, "labels": ids}]
    with pytest.raises(UserError, match="row 0: 'labels' must be -100 or equal to the input id"):
        examples(write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": ids, "labels": [5] * len(ids)}]), tok)
    with pytest.raises(UserError, match="row 0: 'input_ids' has ids outside the tokenizer's"):
        examples(write_jsonl(tmp_path / "big.jsonl", [{"input_ids": [1, 10_000]}]), tok)


def test_a_new_format_is_one_table_entry(tmp_path, tok, monkeypatch):
    """Adding a RowFormat to FORMATS is all it takes: the column check, the error text and training follow."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+2=", "answer": "3"}])
    with pytest.raises(UserError, match=r"fits? no row format .*found columns \['answer', 'question'\]"):
        examples(qa, tok)
    monkeypatch.setattr(formats, "FORMATS", FORMATS + (
        RowFormat("qa", ("question", "answer"), (), "question/answer", lambda r: Pair(r["question"], r["answer"])),))
    check_columns(read_source(qa), "qa")
    assert "'question'+'answer'" in formats.formats_help()
    assert examples(qa, tok) == examples(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "1+2=", "response": "3"}]),
                                         tok)


def test_column_check_is_vectorised_and_names_the_row(tmp_path):
    rows = [{"prompt": f"{i}", "response": "r"} for i in range(50)] + [{"prompt": "x"}]
    ds = read_source(write_jsonl(tmp_path / "c.jsonl", rows))
    check_columns(ds.select(range(50)), "c")
    with pytest.raises(UserError, match=r"c row 50: fits no row format .*found columns \['prompt'\]"):
        check_columns(ds, "c", batch_size=16)  # the bad row is in the 4th record batch
    with pytest.raises(UserError, match=r"rows fit no row format .*found columns \['foo'\]"):
        check_columns(datasets.Dataset.from_list([{"foo": 1}]), "f")


# ------------------------------------------------------------------------------------------------------ sources

def test_source_specs(tmp_path):
    f = Path(unique_rows(tmp_path, 3))
    assert parse_source(str(f)).kind == "files" and parse_source(f"{f}:0.7").weight == 0.7
    hub = parse_source("org/name:test:2")
    assert (hub.kind, hub.path, hub.split, hub.weight) == ("hub", "org/name", "test", 2.0)
    assert (parse_source("org/name").split, parse_source("org/name").kind) == (None, "hub")
    for bad, msg in [(str(tmp_path / "nope.jsonl"), "data file not found"), (f"{f}:0", "weight must be > 0"),
                     (f"{f}:test", "picks a split, which a file or glob does not have")]:
        with pytest.raises(UserError, match=msg):
            parse_source(bad)
    with pytest.raises(UserError, match="give a weight to every source or to none"):
        parse_sources([f"{f}:0.5", str(f)])
    with pytest.raises(UserError, match="weights apply to training data only"):
        DataConfig(data=str(f), eval_data=[f"{f}:1"]).eval_sources()


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "disk", "disk_dict", "gz", "zst", "glob", "dir", "repo"])
def test_every_source_kind_gives_the_same_examples(tmp_path, tok, fmt):
    src = make_jsonl(tmp_path / "d.jsonl", 20, "messages")
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(tmp_path / "hf"))
    text = src.read_bytes()
    lines = text.splitlines(keepends=True)
    (tmp_path / "x").mkdir()
    if fmt == "parquet":
        spec = tmp_path / "x" / "d.parquet"
        ds.to_parquet(str(spec))
    elif fmt in ("arrow", "disk"):
        ds.save_to_disk(str(tmp_path / "x"))
        spec = next((tmp_path / "x").glob("*.arrow")) if fmt == "arrow" else tmp_path / "x"
    elif fmt == "disk_dict":
        datasets.DatasetDict({"train": ds.select(range(3)), "other": ds}).save_to_disk(str(tmp_path / "x"))
        spec = f"{tmp_path / 'x'}:other"
    elif fmt == "gz":
        spec = tmp_path / "x" / "d.jsonl.gz"
        spec.write_bytes(gzip.compress(text))
    elif fmt == "zst":
        import zstandard

        spec = tmp_path / "x" / "d.jsonl.zst"
        spec.write_bytes(zstandard.ZstdCompressor().compress(text))
    elif fmt in ("glob", "dir"):  # rows split over files; sorted file order = row order
        (tmp_path / "x" / "sub").mkdir()
        (tmp_path / "x" / "a.jsonl").write_bytes(b"".join(lines[:7]))
        (tmp_path / "x" / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[7:])))
        (tmp_path / "x" / "notes.txt").write_text("not data")
        spec = f"{tmp_path / 'x'}/**/*.jsonl*" if fmt == "glob" else tmp_path / "x"
    else:  # a dataset repo laid out like the hub's, read by datasets.load_dataset(DIR, split=...): the hub path
        (tmp_path / "x" / "data").mkdir()
        (tmp_path / "x" / "data" / "train.jsonl").write_bytes(b"".join(lines[:2]))
        (tmp_path / "x" / "data" / "test.jsonl").write_bytes(text)
        spec = f"{tmp_path / 'x'}:test"
    cfg = dict(eval_fraction=0.2, seed=3)
    assert load_examples(DataConfig(data=str(spec), **cfg), tok) == load_examples(DataConfig(data=str(src), **cfg), tok)


def test_mixing_weights(tmp_path, tok):
    a, b = unique_rows(tmp_path, 40, "a"), unique_rows(tmp_path, 10, "b")
    source = lambda ex: tok.decode(ex["input_ids"]).split("?")[0][-1]  # noqa: E731  (row "#{i}{name}?")
    plain = examples([a, b], tok)
    assert sorted(source(e) for e in plain).count("b") == 10 and len(plain) == 50  # no weights: every row once
    mixed = examples([f"{a}:1", f"{b}:1.0"], tok)
    names = [source(e) for e in mixed]
    assert len(mixed) == 50 and names.count("a") == names.count("b") == 25
    b_texts = [tok.decode(e["input_ids"]) for e in mixed if source(e) == "b"]
    assert len(set(b_texts)) == 10 and all(b_texts.count(t) in (2, 3) for t in set(b_texts))  # up-sampled
    a_texts = [tok.decode(e["input_ids"]) for e in mixed if source(e) == "a"]
    assert len(set(a_texts)) == 25  # down-sampled: distinct rows
    # held-out rows come from every source and never appear in training
    train, evals = load_examples(DataConfig(data=[f"{a}:3", f"{b}:1"], eval_fraction=0.2, seed=1), tok)
    tr, ev = {tok.decode(e["input_ids"]) for e in train}, [tok.decode(e["input_ids"]) for e in evals]
    assert len(ev) == 8 + 2 and not tr & set(ev)


def test_hub_name_not_found_is_one_line(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here; fail fast as offline users do
    with pytest.raises(UserError, match="'no-such-org/no-such-data'"):
        read_source("no-such-org/no-such-data")


# --------------------------------------------------------------------------------------------------------- cache

def test_cache_is_reused_without_reading_or_tokenising(tmp_path, tok, monkeypatch, data_cache):
    data = make_jsonl(tmp_path / "d.jsonl", 30, "messages")
    cfg = DataConfig(data=str(data), max_length=64, seed=2)
    path = prepare_cache(cfg, tok)
    assert path.parent.parent == data_cache and prepare_cache(cfg, tok) == path
    first = build_datasets(cfg, tok)

    def boom(*a, **k):
        raise AssertionError("re-read or re-tokenised")

    with monkeypatch.context() as mp:
        mp.setattr(build_mod, "read_source", boom)
        mp.setattr(build_mod.Encoder, "__call__", boom)
        again = build_datasets(cfg, tok)
        # the trainer's order: prepare_cache on one rank per node, then build_datasets on all
        assert build_mod.open_cache(prepare_cache(cfg, tok), tok)[0].summary() == first[0].summary()
    for x, y in zip(first, again):
        assert len(x) == len(y) and x.summary() == y.summary()
        assert all(torch.equal(x.batch(range(len(x)))[k], y.batch(range(len(y)))[k]) for k in x.batch([0]))
    assert prepare_cache(DataConfig(data=str(data), max_length=65, seed=2), tok) != path  # key: max length
    data.write_text(data.read_text() + json.dumps({"prompt": "new", "response": "row"}) + "\n")
    assert prepare_cache(cfg, tok) != path  # key: the file's size/mtime
    assert not list(data_cache.glob("*/.*tmp-*"))  # nothing half-written left


def test_publish_that_loses_a_race_keeps_the_winner(tmp_path):
    final = tmp_path / "splits" / ("a" * 32)

    def build(tmp: Path) -> None:
        (tmp / "mine").write_text("loser")
        # another process publishes between our check and our rename
        other = tmp.parent / ".other"
        other.mkdir()
        (other / "theirs").write_text("winner")
        other.rename(final)

    assert publish(final, build) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # our temp dir is gone


RACE = """
import sys, transformers
from upcycle_ds.data import DataConfig, prepare_cache
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print(prepare_cache(DataConfig(data=sys.argv[2], max_length=64, num_proc=int(sys.argv[3])), tok))
"""


@pytest.mark.slow
def test_two_processes_racing_on_one_cache(tmp_path, tok):
    data = make_jsonl(tmp_path / "d.jsonl", 800, "messages")
    env = {**__import__("os").environ, "UPCYCLE_DS_DATA_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, tok.name_or_path, str(data), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert [len(list((tmp_path / "cache" / k).iterdir())) for k in ("tokens", "splits")] == [1, 1]
    train, _ = build_datasets(DataConfig(data=str(data), max_length=64, cache_dir=str(tmp_path / "cache")), tok)
    ref, _ = build_datasets(DataConfig(data=str(data), max_length=64, cache_dir=str(tmp_path / "ref")), tok)
    assert torch.equal(train.batch(range(len(train)))["input_ids"], ref.batch(range(len(ref)))["input_ids"])


def test_rank_memory_does_not_grow_with_the_data(tmp_path, tok):
    """Python-heap peak (tracemalloc; numpy allocations included) of opening the cache and iterating an epoch:
    the same for 8x the tokens (the old in-memory pipeline held ~128 bytes per token). bench/data_pipeline.py
    measures process RSS at 2M vs 20M tokens."""
    peaks = []
    for n in (300, 2400):
        cfg = DataConfig(data=str(make_jsonl(tmp_path / f"d{n}.jsonl", n, "messages")), max_length=128,
                         eval_fraction=0)
        path = prepare_cache(cfg, tok)
        tracemalloc.start()
        train, _ = build_mod.open_cache(path, tok)
        for b in batches(train, micro_batch_size=4, rank=0, world_size=1, seed=0, epoch=0):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert train.num_tokens > n * 10
    assert peaks[1] < peaks[0] * 1.25 + 32 * 1024, peaks


# --------------------------------------------------------------------------------------------------------- packing

def test_pack_rows_uses_every_sample_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    rows = pack_rows(lengths, 50)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 50 for r in rows)
    assert len(rows) <= sum(lengths) / 50 * 1.1  # best-fit decreasing packs tightly
    assert all(lengths[r[0]] >= lengths[i] for r in rows for i in r)  # placement order: longest first
    with pytest.raises(ValueError, match="sample 1 has 51 tokens > max_length 50"):
        pack_rows([3, 51], 50)


@pytest.mark.parametrize("pack", [True, False])
def test_packed_rows_hold_every_sample_with_its_own_labels(tmp_path, tok, pack):
    data = make_jsonl(tmp_path / "d.jsonl", 60, "messages")
    cfg = DataConfig(data=str(data), eval_fraction=0, max_length=96, pack=pack)
    train = load_examples(cfg, tok)[0]
    for ds in (PackedDataset.from_examples(train, 96, tok.pad_token_id, pack=pack), build_datasets(cfg, tok)[0]):
        assert len(ds) < len(train) if pack else len(ds) == len(train)
        seen = []
        for r in range(len(ds)):
            row = ds[r]
            assert all(v.shape == (96,) and v.dtype == torch.long for k, v in row.items() if k != "num_tokens")
            t = 0
            for i in ds.row_samples[r]:
                ids, labels = train[i]["input_ids"], train[i]["labels"]
                n = len(ids)
                assert row["input_ids"][t: t + n].tolist() == ids
                assert row["position_ids"][t: t + n].tolist() == list(range(n))
                assert row["labels"][t: t + n].tolist() == [IGNORE] + labels[1:]  # never across a boundary
                t += n
                seen.append(i)
            assert (row["input_ids"][t:] == tok.pad_token_id).all() and (row["labels"][t:] == IGNORE).all()
            assert row["position_ids"][t:].tolist() == list(range(96 - t))
            assert row["num_tokens"].item() == t  # the row's tokens before its padding
        assert sorted(seen) == list(range(len(train)))
        assert ds.num_label_tokens == sum(sum(lab != IGNORE for lab in e["labels"][1:]) for e in train)


def test_packed_row_attends_within_each_sample_only(tmp_path):
    """Packed row + restarting position_ids, no attention_mask: logits equal each sample run alone."""
    model = transformers.AutoModelForCausalLM.from_pretrained(make_dense("llama", tmp_path / "m"),
                                                              dtype=torch.float32).eval()
    a, b = [1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 2]
    ds = PackedDataset.from_examples([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], 16, 0)
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
    """37 single-sample rows whose first token is the row's id + 3."""
    return PackedDataset.from_examples([{"input_ids": [i + 3] * 4, "labels": [i + 3] * 4} for i in range(37)], 4, 0,
                                       pack=False)


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


def steps(n_rows: int, mbs: int, world: int, accum: int, **kw) -> list[list[tuple[int, ...]]]:
    """Per optimizer step, the micro-batches (row tuples) all ranks consume, rank-major within each micro-step."""
    per_rank = [rank_groups(n_rows, micro_batch_size=mbs, rank=r, world_size=world, grad_accum=accum, seed=5,
                            epoch=1, **kw) for r in range(world)]
    n = num_batches(n_rows, micro_batch_size=mbs, world_size=world, grad_accum=accum, **kw)
    assert all(len(p) == n for p in per_rank) and n % accum == 0
    return [[tuple(per_rank[r][j].tolist()) for j in range(s * accum, (s + 1) * accum) for r in range(world)]
            for s in range(n // accum)]


def test_global_order_does_not_depend_on_the_world_size():
    """World 2 x accum 1 and world 1 x accum 2 (and 4x1, 1x4, 2x2) consume the same micro-batches in the same
    optimizer steps; ranks are disjoint; a run resumed on another world size continues exactly."""
    n, mbs = 103, 3
    two = steps(n, mbs, 2, 1)
    assert [sorted(s) for s in two] == [sorted(s) for s in steps(n, mbs, 1, 2)]
    assert len(two) == n // (mbs * 2)
    four = [sorted(s) for s in steps(n, mbs, 4, 1)]
    assert four == [sorted(s) for s in steps(n, mbs, 1, 4)] == [sorted(s) for s in steps(n, mbs, 2, 2)]
    flat = [r for s in steps(n, mbs, 4, 1) for g in s for r in g]
    assert len(flat) == len(set(flat)) == 96  # disjoint; truncated to whole steps of 12 rows
    groups = epoch_groups(n, micro_batch_size=mbs, world_size=4, seed=5, epoch=1)
    assert [tuple(g) for g in groups.tolist()] == [g for s in steps(n, mbs, 4, 1) for g in s]  # group j*W + r
    # 2 ranks consumed 5 micro-batches each (10 groups); resume on 1 rank with accum 2 at start = 5 * 2
    before = [tuple(g.tolist()) for r in range(2) for g in rank_groups(n, micro_batch_size=mbs, rank=r, world_size=2,
                                                                       seed=5, epoch=1)[:5]]
    after = [tuple(g.tolist()) for g in rank_groups(n, micro_batch_size=mbs, rank=0, world_size=1, grad_accum=2,
                                                    seed=5, epoch=1)[10:]]
    groups2 = [tuple(g) for g in epoch_groups(n, micro_batch_size=mbs, world_size=2, seed=5, epoch=1).tolist()]
    assert sorted(before) == sorted(groups2[:10]) and after == groups2[10:]
    padded = steps(n, mbs, 2, 2, pad_remainder=True)
    rows = [r for s in padded for g in s for r in g]
    assert sorted(r for r in rows if r >= 0) == list(range(n)) and len(rows) % 12 == 0


def test_batches_with_grad_accum_follow_the_groups(rows_ds):
    got = run(rows_ds, rank=1, world_size=2, grad_accum=2, micro_batch_size=3)
    want = rank_groups(37, micro_batch_size=3, rank=1, world_size=2, grad_accum=2, seed=0, epoch=0)
    assert len(got) == 6 == num_batches(37, micro_batch_size=3, world_size=2, grad_accum=2)
    assert ids_of(got) == [i + 3 for i in want.reshape(-1).tolist()]


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
    assert names(train_s) | names(eval_s) <= names(train) | names(evals)


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
    err(r"c.jsonl row 3: fits no row format \(needs 'messages'; .*found columns \['foo', 'prompt'\]",
        data=write_jsonl(tmp_path / "c.jsonl", rows))
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    err("row 0: .*tokenizer has no chat template", tokenizer=plain_tok, data=msgs)
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    err("row 0: .*unknown role robot", data=bad_role)
    err("'messages' must be a non-empty list", data=write_jsonl(tmp_path / "e2.jsonl", [{"messages": []}]))
    (tmp_path / "dir").mkdir()
    err("not one written by datasets' save_to_disk", data=str(tmp_path / "dir"))
    err("too few to hold out", data=write_jsonl(tmp_path / "one.jsonl", rows[:1]), eval_fraction=0.1)
    err("field 'expert' must be an int >= 0", data=write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "expert": -1}]),
        label_field="expert")
    with pytest.raises(UserError, match="eval_fraction must be in"):
        DataConfig(data="x", eval_fraction=1.0)
