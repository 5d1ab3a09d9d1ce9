"""UpIT router init: `upcycle-ds router-init` trains only the routers (every other tensor bit-identical) so that
tokens go to their seed sample's expert; `--mode hidden` sets router rows from per-expert prompts. Both measured
independently with transformers' own Mixtral (`output_router_logits`) on the exported HF checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from cli_proc import cli_env, run_cli
import tiny

ALPHABETS = ["0123456789", "abcdefghij", "ABCDEFGHIJ", "!#$%&()*+-"]


def upcycle_ds(*args):
    return run_cli(*args, env=cli_env(OMP_NUM_THREADS="2", WANDB_MODE="disabled"), timeout=900)


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def top1_match(model_dir, rows, tokenizer, granularity: int = 1) -> float:
    """Fraction of (token, MoE layer) pairs whose top-1 router expert is the row's expert (transformers' Mixtral);
    granular: one of the row's copy's G experts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hit = n = 0
    for r in rows:
        ids = tokenizer(r["text"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        for logits in out.router_logits:
            hit += int((logits.argmax(-1) // granularity == r["expert"]).sum())
            n += logits.shape[0]
    return hit / n


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ri")
    dense = tiny.make_dense("llama", d / "dense")
    tiny.make_tokenizer(dense)
    r = upcycle_ds("upcycle", "--model", dense, "--out", d / "moe", "--num-experts", 4, "--top-k", 2)
    assert r.returncode == 0, r.stderr
    return d / "moe"


@pytest.fixture(scope="module")
def granular_moe_dir(tmp_path_factory):
    """E = 8 experts of 48 neurons: the 2 slices of 4 copies of the dense MLP (virtual groups), top-2 = one copy."""
    from upcycle_ds.cli import main

    d = tmp_path_factory.mktemp("rig")
    dense = tiny.make_dense("llama", d / "dense")
    tiny.make_tokenizer(dense)
    assert main(["upcycle", "--model", str(dense), "--out", str(d / "moe"), "--num-experts", "8", "--top-k", "2",
                 "--granularity", "2"]) == 0
    return d / "moe"


def seed_rows(n=64, seed=0):
    """Expert e's samples are strings over alphabet e: a router can tell them apart token by token."""
    rng = random.Random(seed)
    return [{"index": i, "expert": i % 4, "ppl": [1.0] * 4,
             "text": "".join(rng.choice(ALPHABETS[i % 4]) for _ in range(rng.randint(20, 40)))} for i in range(n)]


@pytest.mark.slow
def test_router_init_bce_learns_assignment_and_touches_only_routers(granular_moe_dir, tmp_path):
    """On a granular MoE (G = 2; the G = 1 targets are the same code with G = 1, see test_router_bce_targets): the
    label is a copy, and tokens must go to one of its 2 experts."""
    moe_dir = granular_moe_dir
    rows = seed_rows()
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = upcycle_ds("router-init", "--model", moe_dir, "--seed-data", seed, "--out", tmp_path / "run",
                   "--micro-batch-size", 4, "--dtype", "fp32", "--max-length", 128, "--epochs", 4, "--lr", 2e-2,
                   "--wandb-mode", "disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(moe_dir)
    before, after = top1_match(moe_dir, rows, tok, 2), top1_match(tmp_path / "run" / "hf", rows, tok, 2)
    assert before < 0.4, before  # random routers: about 1/E
    assert after > 0.8, after
    a, b = tensors(moe_dir), tensors(tmp_path / "run" / "hf")
    assert sorted(a) == sorted(b)
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed == [f"model.layers.{l}.block_sparse_moe.gate.weight" for l in range(4)]
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in log if "train/bce" in m]
    assert steps[-1]["train/bce"] < steps[0]["train/bce"] and steps[-1]["train/top1_match"] > 0.8


def test_router_bce_targets(tmp_path):
    """router_bce against a hand-written reference: BCE on the one-hot (G = 1) or multi-hot over the label copy's G
    experts (G = 2), averaged over labelled tokens, experts and layers; top-1 match counts a copy's experts; and a
    seed label beyond the model's experts / copies is one clear error before any step."""
    from types import SimpleNamespace

    from upcycle_ds.data.pack import PackedDataset
    from upcycle_ds.errors import UserError
    from upcycle_ds.upit.router_init import RouterInitConfig, router_bce, stage_for

    g = torch.Generator().manual_seed(0)
    E, B, L = 8, 2, 5
    sample_labels = torch.tensor([[0, 0, 1, 3, -1], [2, 2, 2, 1, -1]])
    labels = torch.zeros(B, L, dtype=torch.long)
    layers = [(l, SimpleNamespace(router=SimpleNamespace(logits_TE=torch.randn(B * L, E, generator=g))))
              for l in range(3)]
    for G in (1, 2):
        bce, top1 = router_bce(layers, sample_labels, labels, E, False, G)
        ok = sample_labels.reshape(-1) >= 0
        want_bce, want_top1 = [], []
        for _, m in layers:
            lg = m.router.logits_TE[ok]
            lab = sample_labels.reshape(-1)[ok]
            target = torch.zeros_like(lg)
            for i, c in enumerate(lab.tolist()):
                target[i, c * G:(c + 1) * G] = 1
            want_bce.append(torch.nn.functional.binary_cross_entropy_with_logits(lg, target))
            want_top1.append((lg.argmax(-1) // G == lab).float().mean())
        torch.testing.assert_close(bce, torch.stack(want_bce).mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(top1, torch.stack(want_top1).mean(), rtol=1e-6, atol=0)

    hooks = stage_for(RouterInitConfig(model="m", out="o", data=["seed.jsonl"]))
    moe = SimpleNamespace(num_experts=E, router=SimpleNamespace(record_logits=False))
    ex = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "sample_label": lab} for lab in (0, 3)]
    hooks.setup(model=None, layers=[(0, moe)], config={"upcycle_ds": {"granularity": 2}},
                data=PackedDataset.from_examples(ex, max_length=8, pad_id=0))
    assert moe.router.record_logits
    ex.append({"input_ids": [1, 2], "labels": [1, 2], "sample_label": 4})
    with pytest.raises(UserError, match=r"'expert' 4 is out of range: m has 4 copies of 2 slices \(labels 0..3\)"):
        hooks.setup(model=None, layers=[(0, moe)], config={"upcycle_ds": {"granularity": 2}},
                    data=PackedDataset.from_examples(ex, max_length=8, pad_id=0))


def test_router_init_hidden_mode_routes_each_experts_prompts_to_it(moe_dir, tmp_path, capsys):
    rows = seed_rows(16, seed=1)
    prompts = {"experts": [{"positive_prompts": [r["text"] for r in rows if r["expert"] == e]}
                           for e in range(4)]}
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    from upcycle_ds.cli import main  # no DeepSpeed ranks in this mode: run it in this process

    assert main(["router-init", "--mode", "hidden", "--model", str(moe_dir), "--prompts",
                 str(tmp_path / "prompts.yaml"), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for e in range(4):  # each expert's prompts, averaged over tokens, score highest on that expert in every layer
        mean = 0
        for r_ in (r_ for r_ in rows if r_["expert"] == e):
            with torch.no_grad():
                o = model(input_ids=tok(r_["text"], return_tensors="pt")["input_ids"], output_router_logits=True)
            mean = mean + torch.stack([lg.mean(0) for lg in o.router_logits])
        assert mean.argmax(-1).tolist() == [e] * 4, (e, mean)
    a, b = tensors(moe_dir), tensors(out)
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed == [f"model.layers.{l}.block_sparse_moe.gate.weight" for l in range(4)]
    norms = b["model.layers.0.block_sparse_moe.gate.weight"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(4))
    # wrong number of expert entries: one-line error
    prompts["experts"].pop()
    (tmp_path / "p3.yaml").write_text(yaml.safe_dump(prompts))
    assert main(["router-init", "--mode", "hidden", "--model", str(moe_dir), "--prompts", str(tmp_path / "p3.yaml"),
                 "--out", str(tmp_path / "run2")]) == 2
    assert "3 expert entries, the model has 4 experts" in capsys.readouterr().err


def test_router_init_hidden_mode_on_a_granular_moe_sets_a_copys_rows_together(granular_moe_dir, tmp_path,
                                                                               capsys):
    """G = 2: one prompt entry per copy; both experts of copy c get its row, and copy c's prompts route to them."""
    from upcycle_ds.cli import main

    rows = seed_rows(16, seed=1)
    prompts = {"experts": [{"positive_prompts": [r["text"] for r in rows if r["expert"] == e]} for e in range(4)]}
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    assert main(["router-init", "--mode", "hidden", "--model", str(granular_moe_dir), "--prompts",
                 str(tmp_path / "prompts.yaml"), "--out", str(tmp_path / "run")]) == 0
    b = tensors(tmp_path / "run" / "hf")
    for l in range(4):
        w = b[f"model.layers.{l}.block_sparse_moe.gate.weight"]
        assert w.shape[0] == 8 and torch.equal(w[0::2], w[1::2])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")
    assert top1_match(tmp_path / "run" / "hf", rows, tok, 2) > 0.5
    prompts["experts"] += prompts["experts"]  # one entry per expert (8) instead of per copy (4)
    (tmp_path / "p8.yaml").write_text(yaml.safe_dump(prompts))
    assert main(["router-init", "--mode", "hidden", "--model", str(granular_moe_dir), "--prompts",
                 str(tmp_path / "p8.yaml"), "--out", str(tmp_path / "run2")]) == 2
    assert "8 expert entries, the model has 4 copies of 2 slices (one entry each)" in capsys.readouterr().err


def test_sample_labels_follow_packed_samples(tmp_path):
    from upcycle_ds.data import DataConfig, batches, build_datasets

    tok_dir = tiny.make_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rows = seed_rows(20, seed=2)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, _ = build_datasets(DataConfig(data=str(tmp_path / "s.jsonl"), max_length=96, eval_fraction=0,
                                      label_field="expert"), tok)
    assert len(ds) < 20  # packed: several samples per row
    b = next(batches(ds, micro_batch_size=len(ds), rank=0, world_size=1, seed=0, epoch=0))
    for ids, pos, lab in zip(b["input_ids"], b["position_ids"], b["sample_labels"]):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for s, e in zip(starts, starts[1:]):
            seg = lab[s:e]
            text = tok.decode(ids[s:e], skip_special_tokens=True)
            if seg[0] == -1:  # the padding tail
                assert (seg == -1).all() and not text.strip()
                continue
            assert (seg == seg[0]).all()
            assert set(text) <= set(ALPHABETS[int(seg[0])])
    # a row without the field: one clear error
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "d", "expert": 1}))
    from upcycle_ds.errors import UserError

    with pytest.raises(UserError, match="field 'expert' must be an int >= 0"):
        build_datasets(DataConfig(data=str(tmp_path / "bad.jsonl"), max_length=32, eval_fraction=0,
                                  label_field="expert"), tok)
