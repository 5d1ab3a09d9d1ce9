"""`upcycle-ds seed-data`: each sampled row goes to the expert whose dense model gives it the lowest perplexity.

Two experts are fine-tuned from one base on disjoint slices: A answers with letters
a-f, B with u-z, after the same prompt. Every row must land on its own slice's expert.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from tiny import make_dense, make_moe, make_tokenizer

from upcycle_ds.cli import main
from upcycle_ds.families import family_for
from upcycle_ds.data import IGNORE, DataConfig, load_examples
from upcycle_ds.upit.seed_data import SeedRows, encode, pick_indices

pytestmark = pytest.mark.timeout(300)
SLICES = ("abcdef", "uvwxyz")


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPCYCLE_DS_DATA_CACHE", str(tmp_path_factory.mktemp("data_cache")))
        yield


def slice_rows(chars: str, n: int, seed: int, messages_every: int = 0) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        resp = "".join(r.choice(chars) for _ in range(8))
        if messages_every and i % messages_every == 0:
            rows.append({"messages": [{"role": "user", "content": "say:"}, {"role": "assistant", "content": resp}]})
        else:
            rows.append({"prompt": "say:", "response": resp})
    return rows


def reference_ids(tok, row) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight from the chat template (as transformers renders it): the one-turn chat, labels on the response
    (+ the template's end of turn) only. Prompt/response rows are that chat too (the tokenizer has a template)."""
    msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["response"]}]
    prompt = tok(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    return torch.tensor([full]), torch.tensor([[IGNORE] * len(prompt) + full[len(prompt):]])


def hf_ppl(model, tok, row) -> float:
    ids, labels = reference_ids(tok, row)
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.exp().item()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    tok_dir = make_tokenizer(root / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    base = make_dense("llama", root / "base", seed=0)
    tok.save_pretrained(base)
    out = {"base": base, "tok": tok}
    torch.manual_seed(0)
    for name, chars in zip("AB", SLICES):
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # full fine-tuning: experts differ outside MLPs too
        batch = [reference_ids(tok, r) for r in slice_rows(chars, 64, seed=123, messages_every=2)]
        for step in range(16):
            part = batch[step % 2::2]  # same length within a parity: prompt/response rows, then chat rows
            ids, labels = torch.cat([b[0] for b in part]), torch.cat([b[1] for b in part])
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    data = root / "train.jsonl"
    rows = []
    for s, chars in enumerate(SLICES):
        rows += [{**r, "slice": s} for r in slice_rows(chars, 12, seed=7 + s, messages_every=3)]
    random.Random(0).shuffle(rows)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["data"], out["rows"] = data, rows
    return out


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines()]


def test_every_sample_lands_on_its_expert(experts, tmp_path):
    out = tmp_path / "seed"
    assert main(["seed-data", "--experts", str(experts["A"]), str(experts["B"]), "--data", str(experts["data"]),
                 "--out", str(out), "--fraction", "1.0", "--micro-batch-size", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed.jsonl", "seed_report.json"]
    got = read_jsonl(out / "seed.jsonl")
    rows = experts["rows"]
    assert [g["index"] for g in got] == list(range(len(rows)))
    for g in got:
        assert g["expert"] == g["slice"], g
        assert {k: v for k, v in g.items() if k not in ("index", "expert", "ppl")} == rows[g["index"]]
        assert len(g["ppl"]) == 2 and g["ppl"][g["slice"]] * 2 < g["ppl"][1 - g["slice"]]  # clearly separated
    rep = json.loads((out / "seed_report.json").read_text())
    assert rep["counts"] == [12, 12] and rep["num_scored"] == 24
    # perplexities are transformers' own loss on the response tokens (batched + padded here, one by one there)
    for name, e in (("A", 0), ("B", 1)):
        model = transformers.AutoModelForCausalLM.from_pretrained(experts[name], dtype=torch.float32).eval()
        for g in got[:6]:
            ref = hf_ppl(model, experts["tok"], rows[g["index"]])
            assert g["ppl"][e] == pytest.approx(ref, rel=1e-4)


def test_expanded_experts_are_scored_with_their_swapped_mlp(experts, tmp_path):
    moe = tmp_path / "moe"
    assert main(["upit-assemble", "--checkpoints", str(experts["A"]), str(experts["B"]), "--num-experts", "3",
                 "--base", str(experts["base"]), "--out", str(moe)]) == 0
    out = tmp_path / "s"
    assert main(["seed-data", "--experts", str(experts["A"]), str(experts["B"]), "--moe", str(moe),
                 "--data", str(experts["data"]), "--out", str(out), "--fraction", "0.25", "--seed", "3"]) == 0
    got = read_jsonl(out / "seed.jsonl")
    assert len(got) == 6 and all(len(g["ppl"]) == 3 for g in got)
    assert [g["index"] for g in got] == pick_indices(24, 0.25, 1, 3)
    # reference: dense B with every layer's MLP replaced by expert 2 of the MoE as transformers loads it
    fam, _ = family_for(json.loads((moe / "config.json").read_text()))
    moe_sd = transformers.AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).state_dict()
    dense = transformers.AutoModelForCausalLM.from_pretrained(experts["B"], dtype=torch.float32).eval()
    sd = dense.state_dict()
    for l in range(4):
        gate_up = moe_sd[fam.moe_fused["gate_up"].format(layer=l)][2]
        inter = gate_up.shape[0] // 2
        sd[fam.dense_mlp_key(l, "gate")], sd[fam.dense_mlp_key(l, "up")] = gate_up[:inter], gate_up[inter:]
        sd[fam.dense_mlp_key(l, "down")] = moe_sd[fam.moe_fused["down"].format(layer=l)][2]
    swapped = transformers.AutoModelForCausalLM.from_pretrained(experts["B"], dtype=torch.float32).eval()
    swapped.load_state_dict(sd)
    for g in got:
        row = experts["rows"][g["index"]]
        assert g["ppl"][2] == pytest.approx(hf_ppl(swapped, experts["tok"], row), rel=1e-4)
        assert g["ppl"][1] == pytest.approx(hf_ppl(dense, experts["tok"], row), rel=1e-4)
        assert g["ppl"][2] != pytest.approx(g["ppl"][1], rel=1e-3)  # the swap did change the model
        assert g["expert"] == min(range(3), key=lambda e: g["ppl"][e])
    rep = json.loads((out / "seed_report.json").read_text())
    assert sum(rep["counts"]) == 6 and "expert 2" in rep["experts"][2]["model"]

    # experts given in the wrong order for the MoE -> a clear error, nothing written
    bad = tmp_path / "bad"
    rc = main(["seed-data", "--experts", str(experts["B"]), str(experts["A"]), "--moe", str(moe),
               "--data", str(experts["data"]), "--out", str(bad)])
    assert rc == 2 and not bad.exists()


def test_granular_moe_is_scored_per_copy(experts, tmp_path):
    """upit-assemble --granularity 2 (6 experts = 3 copies x 2 slices): seed-data scores the 3 copies, each with its
    slices put back together, so every perplexity and label equals the coarse (G = 1) assembly's at the same seed."""
    runs = {}
    for G in (1, 2):
        moe, out = tmp_path / f"moe{G}", tmp_path / f"s{G}"
        assert main(["upit-assemble", "--checkpoints", str(experts["A"]), str(experts["B"]), "--num-experts",
                     str(3 * G), "--top-k", str(G), "--granularity", str(G), "--base", str(experts["base"]),
                     "--out", str(moe)]) == 0
        assert main(["seed-data", "--experts", str(experts["A"]), str(experts["B"]), "--moe", str(moe),
                     "--data", str(experts["data"]), "--out", str(out), "--fraction", "0.25", "--seed", "3"]) == 0
        runs[G] = (read_jsonl(out / "seed.jsonl"), json.loads((out / "seed_report.json").read_text()))
    (coarse, rep1), (fine, rep2) = runs[1], runs[2]
    assert [g["index"] for g in fine] == [g["index"] for g in coarse]
    for c, f in zip(coarse, fine):
        assert len(f["ppl"]) == 3 and f["expert"] == c["expert"]
        assert f["ppl"] == pytest.approx(c["ppl"], rel=1e-5)
    assert rep2["granularity"] == 2 and rep2["counts"] == rep1["counts"] and "copy 2 (experts 4..5)" in \
        rep2["experts"][2]["model"]


def test_selection_size_and_determinism():
    assert pick_indices(100, 0.05, 1, 0) == pick_indices(100, 0.05, 1, 0)
    assert pick_indices(100, 0.05, 1, 0) != pick_indices(100, 0.05, 1, 1)
    assert len(pick_indices(100, 0.05, 1, 0)) == 5
    assert len(pick_indices(100, 0.05, 10, 0)) == 10
    assert pick_indices(100, 0.05, 1000, 0) == list(range(100))
    assert len(pick_indices(10, 0.01, 0, 0)) == 1  # never empty
    idx = pick_indices(1000, 0.3, 1, 4)
    assert idx == sorted(set(idx))


def test_seed_tokens_are_training_tokens(experts, tmp_path):
    """One reader, renderer and tokeniser: seed-data scores exactly the tokens training trained on — every row format,
    with and without a chat template — and only the last assistant turn."""
    multi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    rows = [{"prompt": "hi ", "response": "yo"}, {"messages": multi[:2]}, {"messages": multi},
            {"instruction": "hi", "input": "", "output": "yo"},
            {"input": [{"role": "user", "content": "hi"}], "ideal": ["yo", "other"]}, {"text": "abc"}]
    plain = transformers.AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "plain", chat_template=False))
    for tok in (experts["tok"], plain):
        for i, row in enumerate(rows):
            if "messages" in row or "ideal" in row:
                if tok is plain:
                    continue  # chats need a template, in training as in seed-data
            path = tmp_path / f"r{i}.jsonl"
            path.write_text(json.dumps(row) + "\n")
            (train,), _ = load_examples(DataConfig(data=str(path), eval_fraction=0, max_length=512), tok)
            got, skipped = encode(SeedRows(str(path)), [0], tok, max_length=512)
            ids, labels = got[0]
            assert skipped == [] and ids == train["input_ids"], row
            scored = [t for t in labels if t != IGNORE]
            trained = [t for t in train["labels"][1:] if t != IGNORE]
            if row.get("messages") == multi:
                assert tok.decode(scored) == "ok</s>" and tok.decode(trained) == "yo</s>ok</s>"
            else:
                assert scored == trained and scored, row
    ref_ids, ref_labels = reference_ids(experts["tok"], rows[0])
    ids, labels = encode(SeedRows(str(tmp_path / "r0.jsonl")), [0], experts["tok"])[0][0]
    assert ids == ref_ids[0].tolist() and labels[1:] == ref_labels[0, 1:].tolist()


def test_seed_data_reads_any_training_source(experts, tmp_path):
    """A parquet copy of the training set (and a glob over it) gives the same seed data as the jsonl."""
    import datasets

    ds = datasets.load_dataset("json", data_files=str(experts["data"]), split="train",
                               cache_dir=str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    outs = []
    for i, data in enumerate([str(experts["data"]), str(tmp_path / "train.parquet"), str(tmp_path / "*.parquet")]):
        out = tmp_path / f"seed{i}"
        assert main(["seed-data", "--experts", str(experts["A"]), str(experts["B"]), "--data", data,
                     "--out", str(out), "--fraction", "0.25", "--seed", "1"]) == 0
        outs.append(read_jsonl(out / "seed.jsonl"))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 6


def test_bad_input(experts, tmp_path, capsys):
    A, B, data = str(experts["A"]), str(experts["B"]), str(experts["data"])
    out = tmp_path / "o"
    moe = make_moe("mixtral", tmp_path / "mixtral")
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"question": "x"}\n')
    cases = [
        (["--experts", A, str(moe), "--data", data], "is an MoE checkpoint"),
        (["--experts", A, B, "--moe", B, "--data", data], "is a dense checkpoint"),
        (["--experts", A, B, "--data", str(tmp_path / "none.jsonl")], "data file not found"),
        (["--experts", A, B, "--data", str(bad_rows)], "fit no row format"),
        (["--experts", A, B, "--data", data, "--fraction", "0"], "--fraction"),
    ]
    for argv, needle in cases:
        rc = main(["seed-data", *argv, "--out", str(out)])
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("upcycle-ds")]
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".o.*"))
    out.mkdir()
    (out / "keep").write_text("keep\n")
    rc = main(["seed-data", "--experts", A, B, "--data", data, "--out", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err and (out / "keep").read_text() == "keep\n"
    rc = main(["seed-data", "--experts", A, B, "--data", data, "--out", str(tmp_path / "x.jsonl")])
    assert rc == 2 and "writes a directory" in capsys.readouterr().err
