"""Diversity inits of `upcycle-ds upcycle`: Drop-Upcycling partial re-initialisation (`--reinit-ratio`) and Gaussian
noise (`--noise-std`). Checked on the written checkpoint against the dense weights; the logit drift each causes vs the
dense model is printed (both break function preservation by design)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import input_ids, logits, make_dense

from upcycle_ds.cli import main

E = 4
N_LAYERS = 4
INTER = 96  # tests/tiny.py intermediate_size
PROJS = ("gate", "up", "down")
# per projection, a distinct (mean, std) given to the dense MLP weights, scaled by (layer + 1), so that a re-draw
# using the wrong statistics (a global init std, zero mean, another projection's or layer's) is caught
STATS = {"gate": (0.05, 0.08), "up": (-0.03, 0.05), "down": (0.02, 0.12)}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def upcycle(dense: Path, out: Path, *flags: str) -> Path:
    assert main(["upcycle", "--model", str(dense), "--out", str(out), "--num-experts", str(E), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny Qwen3 whose MLP weights have a per-projection, per-layer non-zero mean and distinct std."""
    path = make_dense("qwen3", tmp_path_factory.mktemp("dense") / "qwen3")
    sd = tensors(path)
    g = torch.Generator().manual_seed(123)
    for l in range(N_LAYERS):
        for p, (mean, std) in STATS.items():
            k = f"model.layers.{l}.mlp.{p}_proj.weight"
            sd[k] = torch.randn(sd[k].shape, generator=g) * std * (l + 1) + mean * (l + 1)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def ids():
    return input_ids(seed=2, batch=2, seq=16)


def dense_mlp(sd, l):
    return {p: sd[f"model.layers.{l}.mlp.{p}_proj.weight"] for p in PROJS}


def expert(sd, l, e):
    return {p: sd[f"model.layers.{l}.mlp.experts.{e}.{p}_proj.weight"] for p in PROJS}


def logit_drift(dense_dir: Path, out: Path, ids) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return (logits(dense_dir, ids) - logits(model, ids)).abs().max().item()


def test_reinit_ratio(dense_dir, tmp_path):
    out = upcycle(dense_dir, tmp_path / "moe", "--reinit-ratio", "0.5", "--seed", "7")
    dense, moe = tensors(dense_dir), tensors(out)
    n_drop = INTER // 2
    for key, t in dense.items():  # non-MLP weights are untouched
        if ".mlp." not in key:
            assert torch.equal(moe[key], t), key
    for l in range(N_LAYERS):
        d = dense_mlp(dense, l)
        dropped_sets = []
        for e in range(E):
            x = expert(moe, l, e)
            # a neuron is re-drawn iff its gate row, its up row and its down column all changed; kept ones are exact
            changed = {"gate": (x["gate"] != d["gate"]).any(1), "up": (x["up"] != d["up"]).any(1),
                       "down": (x["down"] != d["down"]).any(0)}
            assert torch.equal(changed["gate"], changed["up"]) and torch.equal(changed["gate"], changed["down"])
            idx = changed["gate"].nonzero().flatten()
            assert len(idx) == n_drop, (l, e, len(idx))
            keep = ~changed["gate"]
            assert torch.equal(x["gate"][keep], d["gate"][keep]) and torch.equal(x["up"][keep], d["up"][keep])
            assert torch.equal(x["down"][:, keep], d["down"][:, keep])
            # every value of a re-drawn neuron is new (a continuous draw never repeats the old value)
            assert (x["gate"][idx] != d["gate"][idx]).all() and (x["down"][:, idx] != d["down"][:, idx]).all()
            # re-drawn values follow N(mean, std) of the original slice: 48 x 64 = 3072 draws each, so the sample
            # mean is within ~0.02 std and the sample std within ~2% (bounds at ~5 sigma)
            for p, new, old in (("gate", x["gate"][idx], d["gate"][idx]), ("up", x["up"][idx], d["up"][idx]),
                                ("down", x["down"][:, idx], d["down"][:, idx])):
                assert abs(new.mean() - old.mean()) < 0.1 * old.std(), (l, e, p, new.mean(), old.mean())
                assert abs(new.std() / old.std() - 1) < 0.08, (l, e, p, new.std(), old.std())
                assert not torch.allclose(new, old)
            dropped_sets.append(frozenset(idx.tolist()))
        # each expert re-draws its own random subset (4 random halves of 96 coincide with probability ~0)
        assert len(set(dropped_sets)) == E
        overlaps = [len(a & b) for i, a in enumerate(dropped_sets) for b in dropped_sets[i + 1:]]
        assert all(o < n_drop for o in overlaps)
        # the re-drawn values differ between experts even where their subsets overlap
        a, b = expert(moe, l, 0), expert(moe, l, 1)
        both = sorted(dropped_sets[0] & dropped_sets[1])
        assert both and (a["gate"][both] != b["gate"][both]).all()


@pytest.mark.parametrize("ratio,n_drop", [(0.25, 24), (1.0, 96)])
def test_reinit_ratio_counts(dense_dir, tmp_path, ratio, n_drop):
    out = upcycle(dense_dir, tmp_path / "moe", "--reinit-ratio", str(ratio), "--layers", "0")
    dense, moe = tensors(dense_dir), tensors(out)
    d = dense_mlp(dense, 0)
    for e in range(E):
        changed = (expert(moe, 0, e)["gate"] != d["gate"]).any(1)
        assert int(changed.sum()) == n_drop


@pytest.mark.parametrize("std", [1e-3, 1e-2])
def test_noise_std(dense_dir, tmp_path, std):
    out = upcycle(dense_dir, tmp_path / "moe", "--noise-std", str(std))
    dense, moe = tensors(dense_dir), tensors(out)
    for key, t in dense.items():
        if ".mlp." not in key:
            assert torch.equal(moe[key], t), key
    noises = []
    for l in range(N_LAYERS):
        d = dense_mlp(dense, l)
        for e in range(E):
            x = expert(moe, l, e)
            for p in PROJS:
                n = (x[p] - d[p]).double()
                # every weight perturbed (in fp32 a draw below half an ulp of the weight rounds away: ~1e-5)
                assert (n != 0).double().mean() > 0.999
                # 6144 draws per matrix: sample std within ~1%, mean within ~0.013 std (bounds ~5 sigma)
                assert abs(n.std().item() / std - 1) < 0.06, (l, e, p, n.std().item())
                assert abs(n.mean().item()) < 0.07 * std
                noises.append(n.flatten())
    # independent noise per expert / layer / projection, not one draw reused
    a, b = noises[0][:2048], noises[3][:2048]  # layer 0: expert 0 gate vs expert 1 gate
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.15


def test_reinit_and_noise_together(dense_dir, tmp_path):
    out = upcycle(dense_dir, tmp_path / "moe", "--reinit-ratio", "0.5", "--noise-std", "1e-3", "--layers", "1")
    d, x = dense_mlp(tensors(dense_dir), 1), expert(tensors(out), 1, 0)
    kept_noise = (x["gate"] - d["gate"]).double()
    kept = (kept_noise.abs() < 0.01).all(1)  # noise only (~1e-3) vs re-drawn (~0.16)
    assert int(kept.sum()) == INTER // 2
    assert abs(kept_noise[kept].std().item() / 1e-3 - 1) < 0.1


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.parametrize("flags", [("--reinit-ratio", "0.5"), ("--noise-std", "0.01")], ids=["reinit", "noise"])
def test_seeded_and_deterministic(dense_dir, tmp_path, flags):
    a = upcycle(dense_dir, tmp_path / "a", *flags, "--seed", "3")
    b = upcycle(dense_dir, tmp_path / "b", *flags, "--seed", "3")
    c = upcycle(dense_dir, tmp_path / "c", *flags, "--seed", "4")
    assert same_files(a, b)  # same seed -> byte-identical checkpoint (config.json included)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    ta, tc = tensors(a), tensors(c)
    key = "model.layers.2.mlp.experts.1.gate_proj.weight"
    assert not torch.equal(ta[key], tc[key])


def test_no_diversity_flags_give_exact_copies(dense_dir, tmp_path):
    """The control for the tests above: without the flags, every expert equals the dense MLP bit for bit."""
    out = upcycle(dense_dir, tmp_path / "moe")
    dense, moe = tensors(dense_dir), tensors(out)
    for l in range(N_LAYERS):
        for e in range(E):
            for p in PROJS:
                assert torch.equal(expert(moe, l, e)[p], dense_mlp(dense, l)[p])


@pytest.fixture(scope="module")
def plain_dense(tmp_path_factory):
    """The standard tiny Llama of tests/tiny.py (weights N(0, 0.08)), for drift figures on an unskewed model."""
    return make_dense("llama", tmp_path_factory.mktemp("plain") / "llama")


@pytest.mark.parametrize("flags", [("--reinit-ratio", "0.5"), ("--reinit-ratio", "0.1"), ("--noise-std", "1e-3"),
                                   ("--noise-std", "1e-2")], ids=lambda f: f"{f[0][2:]}={f[1]}")
def test_logit_drift(plain_dense, ids, tmp_path, flags):
    """Both inits break exact equivalence by design: report how far (max abs logit diff vs dense, E=4, k=2)."""
    out = upcycle(plain_dense, tmp_path / "moe", *flags, "--top-k", "2")
    ref = logits(plain_dense, ids)
    drift = logit_drift(plain_dense, out, ids)
    print(f"\n{' '.join(flags)}: max abs logit drift vs dense {drift:.3e} (max abs logit {ref.abs().max():.3f})")
    assert drift > 1e-4  # far above the ~1e-6 of plain copies
    assert drift < ref.abs().max()  # a perturbation, not a different model
