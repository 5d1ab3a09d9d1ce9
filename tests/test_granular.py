"""Granular (fine-grained) upcycling, `upcycle-ds upcycle --granularity G`, in one process: the upcycled MoE loaded by
transformers' own Mixtral / Qwen2-MoE / Qwen3-MoE classes computes the dense model's logits (fp32, <= 1e-5) for every
family, G in {2, 4}, C in {1, 2, 4}; its experts are the dense MLP's neuron slices (checked against the dense
tensors); shared expert, random / cluster splits, diversity options, bad input; exact HF <-> DeepSpeed round trips
at several ep sizes; merge back to dense (average: exact; --expert); `plan` counts and FLOPs; UpIT assemble with G.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny import input_ids, logits, make_dense

from upcycle_ds.cli import main
from upcycle_ds.granular import balanced_kmeans, split_neurons
from upcycle_ds.io.hf import HFCheckpoint
from upcycle_ds.plan import count_params, forward_flops, shape_from_config, upcycled_shape

FAMILIES_ = ("llama", "mistral", "qwen2", "qwen3")
TOL = 1e-5
INTER, HIDDEN, N_LAYERS = 96, 64, 4  # tests/tiny.py
PROJS = ("gate", "up", "down")
MOE_ARCH = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
            "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: make_dense(f, root / f, seed=i) for i, f in enumerate(FAMILIES_)}


@pytest.fixture(scope="module")
def ids():
    return input_ids(seed=3, batch=2, seq=16)


@pytest.fixture(scope="module")
def dense_logits(dense, ids):
    return {f: logits(p, ids) for f, p in dense.items()}


def upcycle(dense_dir: Path, out: Path, E: int, k: int, *flags) -> Path:
    assert main(["upcycle", "--model", str(dense_dir), "--out", str(out), "--num-experts", str(E), "--top-k", str(k),
                 *map(str, flags)]) == 0
    return out


def load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def dense_mlp(ck: HFCheckpoint, layer: int) -> dict[str, torch.Tensor]:
    return {p: ck.get(f"model.layers.{layer}.mlp.{p}_proj.weight") for p in PROJS}


def loaded_experts(model, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (E, I_e, h), up, down (E, h, I_e)) as transformers fused them on load."""
    ex = model.model.layers[layer].mlp.experts
    i_e = ex.down_proj.shape[-1]
    return ex.gate_up_proj[:, :i_e], ex.gate_up_proj[:, i_e:], ex.down_proj


def router_weight(model, layer: int) -> torch.Tensor:
    return model.model.layers[layer].mlp.gate.weight


# ------------------------------------------------------------------------------------------- function preservation
@pytest.mark.parametrize("C", [1, 2, 4])
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("family", FAMILIES_)
def test_granular_logits_equal_dense(family, G, C, dense, dense_logits, ids, tmp_path):
    E, k = C * G, G * (2 if C >= 4 else 1)  # k' = 2 copies per token when there are 4 copies
    out = upcycle(dense[family], tmp_path / "moe", E, k, "--granularity", G)
    cfg = json.loads((out / "config.json").read_text())
    expert_size = cfg["intermediate_size"] if family in ("llama", "mistral") else cfg["moe_intermediate_size"]
    assert expert_size == INTER // G and cfg["num_experts_per_tok"] == k
    model = load(out)
    assert type(model).__name__ == MOE_ARCH[family]

    ref = dense_logits[family]
    diff = (logits(model, ids) - ref).abs().max().item()
    print(f"{family} G={G} C={C} E={E} k={k}: max abs logit diff {diff:.2e}")
    assert diff <= TOL and ref.abs().max() > 0.1

    src = HFCheckpoint(dense[family])
    for layer in (0, N_LAYERS - 1):
        d = dense_mlp(src, layer)
        gate, up, down = loaded_experts(model, layer)
        assert gate.shape == (E, INTER // G, HIDDEN)
        for c in range(C):  # copy c's G slices, in order, are the dense MLP (down scaled by G)
            sl = slice(c * G, (c + 1) * G)
            assert torch.equal(torch.cat(list(gate[sl]), 0), d["gate"])
            assert torch.equal(torch.cat(list(up[sl]), 0), d["up"])
            assert torch.equal(torch.cat(list(down[sl]), 1), d["down"] * G)
        w = router_weight(model, layer).view(C, G, HIDDEN)
        assert torch.equal(w, w[:, :1].expand_as(w))  # one row per virtual group
        if C > 1:
            assert not torch.equal(w[0, 0], w[1, 0])


@pytest.mark.parametrize("family,split,flags", [
    ("llama", "random", ()), ("qwen3", "cluster", ()),
    ("qwen2", "contiguous", ("--shared-fraction", "0.25")), ("qwen2", "cluster", ("--shared-fraction", "0.1")),
    ("qwen2", "contiguous", ("--shared-fraction", "0.25", "--granularity", "1")),
])
def test_splits_and_shared_expert_are_exact(family, split, flags, dense, dense_logits, ids, tmp_path):
    G = 1 if "--granularity" in flags else 4
    E, k = 2 * G, G
    out = upcycle(dense[family], tmp_path / "moe", E, k, "--granularity", G, "--split", split, *flags)
    model = load(out)
    diff = (logits(model, ids) - dense_logits[family]).abs().max().item()
    print(f"{family} G={G} --split {split} {' '.join(flags)}: max abs logit diff {diff:.2e}")
    assert diff <= TOL

    cfg = json.loads((out / "config.json").read_text())
    d = dense_mlp(HFCheckpoint(dense[family]), 1)
    gate, up, down = loaded_experts(model, 1)
    rows = gate[:G].reshape(-1, HIDDEN)
    if "--shared-fraction" in flags:
        frac = float(flags[1])
        i_s = cfg["shared_expert_intermediate_size"]
        assert i_s >= round(frac * INTER) and (INTER - i_s) % G == 0 and cfg["moe_intermediate_size"] * G + i_s == INTER
        mlp = model.model.layers[1].mlp
        assert torch.equal(mlp.shared_expert_gate.weight, torch.zeros(1, HIDDEN))  # sigmoid(0) = 1/2 ...
        sh_rows = mlp.shared_expert.gate_proj.weight
        sh_idx = [int((d["gate"] == r).all(1).nonzero()) for r in sh_rows]
        assert torch.equal(mlp.shared_expert.down_proj.weight, d["down"][:, sh_idx] * 2)  # ... compensated by x2
        rows = torch.cat([rows, sh_rows])
    # the G slices of copy 0 (+ the shared expert) hold every dense neuron exactly once: in dense order for the
    # contiguous split (shared expert = the last neurons), permuted otherwise
    idx = [int((d["gate"] == r).all(1).nonzero()) for r in rows]
    assert sorted(idx) == list(range(INTER))
    assert (idx == list(range(INTER))) == (split == "contiguous")


def test_balanced_kmeans_finds_planted_groups():
    """Rows drawn around 4 well-separated directions, shuffled: the clusters come back, each exactly n/k rows."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 5
    truth = torch.arange(64).remainder(4)[torch.randperm(64, generator=g)]
    x = centers[truth] + 0.3 * torch.randn(64, 32, generator=g)
    labels = balanced_kmeans(x, 4, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(labels).tolist() == [16] * 4
    for c in range(4):
        assert truth[labels == c].unique().numel() == 1
    split = split_neurons(x, x, granularity=4, shared_fraction=0.0, method="cluster",
                          generator=torch.Generator().manual_seed(1))
    assert sorted(torch.cat(split.groups).tolist()) == list(range(64))
    assert all(truth[grp].unique().numel() == 1 for grp in split.groups)


def test_diversity_per_fine_grained_expert(dense, dense_logits, ids, tmp_path):
    """--noise-std / --reinit-ratio act on each fine-grained expert; --router-noise splits the virtual groups. All
    break exactness by design: the drift is printed."""
    G, C = 2, 2
    exact = HFCheckpoint(upcycle(dense["llama"], tmp_path / "exact", C * G, G, "--granularity", G))
    key = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    for flags in (("--noise-std", "1e-2"), ("--reinit-ratio", "0.5"), ("--router-noise", "0.05")):
        out = upcycle(dense["llama"], tmp_path / flags[0][2:], C * G, G, "--granularity", G, *flags)
        ck = HFCheckpoint(out)
        router = ck.get("model.layers.0.block_sparse_moe.gate.weight").view(C, G, HIDDEN)
        if flags[0] == "--router-noise":
            assert not torch.equal(router[0, 0], router[0, 1])
            assert all(torch.equal(ck.get(key.format(e)), exact.get(key.format(e))) for e in range(C * G))
        else:
            assert torch.equal(router, exact.get("model.layers.0.block_sparse_moe.gate.weight").view(C, G, HIDDEN))
            changed = [not torch.equal(ck.get(key.format(e)), exact.get(key.format(e))) for e in range(C * G)]
            assert all(changed)
            assert not torch.equal(ck.get(key.format(0)), ck.get(key.format(G)))  # copies differ from each other
        again = HFCheckpoint(upcycle(dense["llama"], tmp_path / (flags[0][2:] + "2"), C * G, G, "--granularity", G,
                                     *flags))
        assert all(torch.equal(again.get(k), ck.get(k)) for k in ck.keys())  # seeded
        drift = (logits(out, ids) - dense_logits["llama"]).abs().max().item()
        print(f"G={G} C={C} {' '.join(flags)}: max abs logit drift vs dense {drift:.3e}")
        assert 1e-5 < drift < dense_logits["llama"].abs().max()


@pytest.mark.parametrize("family,flags,words", [
    ("llama", ("--num-experts", 8, "--top-k", 3, "--granularity", 2), ["--top-k 3 is not a multiple",
                                                                      "valid --top-k: 2, 4, 6, 8"]),
    ("llama", ("--num-experts", 6, "--top-k", 4, "--granularity", 4), ["--num-experts 6 is not a multiple"]),
    ("llama", ("--num-experts", 10, "--top-k", 5, "--granularity", 5), ["--granularity 5 does not divide",
                                                                       "96", "valid: 1, 2, 3, 4, 6, 8"]),
    ("llama", ("--num-experts", 4, "--top-k", 2, "--granularity", 2, "--shared-fraction", 0.25),
     ["needs an export target with a shared expert: Qwen2-MoE", "mixtral has none"]),
    ("qwen3", ("--num-experts", 4, "--top-k", 2, "--shared-fraction", 0.25), ["Qwen2-MoE", "qwen3_moe has none"]),
    ("qwen2", ("--num-experts", 4, "--top-k", 2, "--shared-fraction", 1.0), ["--shared-fraction must be in [0, 1)"]),
    ("qwen2", ("--num-experts", 4, "--top-k", 2, "--shared-fraction", "nan"), ["--shared-fraction", "must be a finite number"]),
    ("llama", ("--num-experts", 4, "--top-k", 2, "--router-noise", "inf"), ["--router-noise", "must be a finite number"]),
    ("llama", ("--num-experts", 4, "--top-k", 2, "--router-noise", -1), ["--router-noise must be"]),
    ("llama", ("--num-experts", 4, "--top-k", 2, "--granularity", 0), ["--granularity must be an integer >= 1"]),
    ("llama", ("--num-experts", 4, "--top-k", 2, "--split", "kmeans"), ["--split", "invalid choice"]),
])
def test_bad_granular_input_is_one_line(family, flags, words, dense, tmp_path, capsys):
    try:
        rc = main(["upcycle", "--model", str(dense[family]), "--out", str(tmp_path / "out"), *map(str, flags)])
    except SystemExit as e:  # argparse's own check of a choice
        rc = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("upcycle-ds upcycle: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ conversion + merge
def same_tensors(a: Path, b: Path) -> int:
    a, b = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.dtype(k) == b.dtype(k) and torch.equal(a.get(k), b.get(k)), k
    return len(a.keys())


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def test_hf_ds_round_trip_at_any_ep_size(dense, tmp_path):
    """Qwen2-MoE with 16 fine-grained experts and a shared expert: HF -> DeepSpeed at ep 4 -> ep 8 -> HF, and
    dense -> DeepSpeed directly (upcycled on the fly) -> HF: every tensor equal."""
    moe = upcycle(dense["qwen2"], tmp_path / "moe", 16, 8, "--granularity", 4, "--shared-fraction", 0.25)
    assert convert("--input", moe, "--output", tmp_path / "ds4", "--to", "ds", "--ep-size", 4) == 0
    assert convert("--input", tmp_path / "ds4", "--output", tmp_path / "ds8", "--to", "ds", "--ep-size", 8) == 0
    assert convert("--input", tmp_path / "ds8", "--output", tmp_path / "back", "--to", "hf-moe") == 0
    assert same_tensors(moe, tmp_path / "back") > 16 * 3 * N_LAYERS
    assert convert("--input", dense["qwen2"], "--output", tmp_path / "ds_direct", "--to", "ds", "--ep-size", 2,
                   "--num-experts", 16, "--top-k", 8, "--granularity", 4, "--shared-fraction", 0.25) == 0
    assert convert("--input", tmp_path / "ds_direct", "--output", tmp_path / "back2", "--to", "hf-moe") == 0
    assert same_tensors(moe, tmp_path / "back2")


@pytest.mark.parametrize("family,G,C,flags", [("llama", 4, 1, ()), ("qwen2", 2, 1, ("--shared-fraction", 0.25)),
                                              ("qwen3", 2, 4, ())])
def test_average_merge_gives_back_the_dense_tensors(family, G, C, flags, dense, tmp_path):
    moe = upcycle(dense[family], tmp_path / "moe", C * G, G, "--granularity", G, *flags)
    assert convert("--input", moe, "--output", tmp_path / "back", "--to", "hf-dense") == 0
    assert same_tensors(dense[family], tmp_path / "back") > 10
    assert convert("--input", moe, "--output", tmp_path / "copy", "--to", "hf-dense", "--expert", C - 1) == 0
    assert same_tensors(dense[family], tmp_path / "copy")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["intermediate_size"] == INTER and "upcycle_ds" not in cfg
    report = json.loads((tmp_path / "back" / "merge_report.json").read_text())
    assert report["granularity"] == G and report["copies"] == C


def test_merge_of_a_permuted_split_is_the_same_function(dense, dense_logits, ids, tmp_path):
    moe = upcycle(dense["mistral"], tmp_path / "moe", 4, 4, "--granularity", 4, "--split", "random")
    assert convert("--input", moe, "--output", tmp_path / "back", "--to", "hf-dense") == 0
    a, b = HFCheckpoint(dense["mistral"]), HFCheckpoint(tmp_path / "back")
    key = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(a.get(key), b.get(key))  # neurons in another order ...
    assert torch.equal(a.get(key).sort(0).values, b.get(key).sort(0).values)
    assert (logits(tmp_path / "back", ids) - dense_logits["mistral"]).abs().max() <= TOL  # ... the same function


def test_merge_of_different_copies_weights_each_slice_group(tmp_path):
    """A granular MoE whose copies differ (written by hand): average = per-group mean, concatenated, down / G."""
    from safetensors.torch import save_file

    d = make_dense("llama", tmp_path / "d")
    moe = upcycle(d, tmp_path / "moe", 4, 2, "--granularity", 2)
    ck = HFCheckpoint(moe)
    sd = {k: ck.get(k) for k in ck.keys()}
    g = torch.Generator().manual_seed(0)
    for k in sd:
        if ".experts." in k:
            sd[k] = torch.randn(sd[k].shape, generator=g)
    for f in moe.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(moe / "model.safetensors"), metadata={"format": "pt"})
    assert convert("--input", moe, "--output", tmp_path / "back", "--to", "hf-dense") == 0
    got = HFCheckpoint(tmp_path / "back").get("model.layers.2.mlp.down_proj.weight")
    w2 = [sd[f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)]
    want = torch.cat([(w2[0].double() + w2[2].double()) / 4, (w2[1].double() + w2[3].double()) / 4], 1).float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("argv,words", [
    (("--to", "hf-dense", "--merge", "router-weighted"), ["needs --calib-data"]),
    (("--to", "ds", "--calib-data", "x.jsonl"), ["--calib-data applies to --to hf-dense only"]),
    (("--to", "hf-dense", "--expert", 2), ["--expert 2 out of range", "2 copies of 2 slices"]),
    (("--to", "hf-dense", "--merge-granularity", 3), ["4 experts cannot be 3-way granular"]),
    (("--to", "hf-dense", "--calib-data", "x.jsonl", "--calib-baseline", "nope"), ["nope: no such directory"]),
    (("--to", "hf-dense", "--calib-data", "x.jsonl"), ["--calib-data needs the model's tokenizer"]),
    (("--to", "hf-dense", "--calib-data", "x.jsonl", "--calib-device", "tpu:x"), ["is not a torch device"]),
])
def test_bad_merge_input_is_one_line(argv, words, dense, tmp_path, capsys):
    moe = upcycle(dense["llama"], tmp_path / "moe", 4, 2, "--granularity", 2)
    capsys.readouterr()
    rc = convert("--input", moe, "--output", tmp_path / "out", *argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("family,G,F", [("llama", 4, 0.0), ("qwen2", 2, 0.25), ("qwen3", 8, 0.0)])
def test_plan_counts_fine_grained_models_like_transformers(family, G, F, dense, tmp_path):
    """plan's upcycled shape == the config `upcycle` writes, built by transformers; experts' FLOPs as designed."""
    moe = upcycle(dense[family], tmp_path / "moe", 2 * G, G, "--granularity", G, "--shared-fraction", F)
    cfg = json.loads((moe / "config.json").read_text())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**{
            k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}))
    n_expert = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    dense_cfg = json.loads((dense[family] / "config.json").read_text())
    shape = upcycled_shape(dense_cfg, num_experts=2 * G, top_k=G, granularity=G, shared_fraction=F)
    c = count_params(shape)
    assert (c.non_expert, c.expert) == (sum(p.numel() for p in hf.parameters()) - n_expert, n_expert)
    assert count_params(shape_from_config(cfg)) == c
    fine, dense_f = forward_flops(shape, 128), forward_flops(shape_from_config(dense_cfg), 128)
    # one copy's G slices (+ the shared expert) per token: the dense MLP's FLOPs, plus the router
    assert fine.experts + fine.mlp == dense_f.mlp + (2 * HIDDEN * N_LAYERS if F else 0)
    assert fine.router == 2 * HIDDEN * 2 * G * N_LAYERS
    coarse = forward_flops(upcycled_shape(dense_cfg, num_experts=2, top_k=1), 128)
    assert coarse.experts == fine.experts + fine.mlp - (2 * HIDDEN * N_LAYERS if F else 0)


def test_plan_cli_granular(dense, capsys):
    rc = main(["plan", "--model", str(dense["qwen2"]), "--num-experts", "16", "--top-k", "4", "--granularity", "4",
               "--shared-fraction", "0.25", "--gpus-per-node", "2", "--ep-size", "2", "--seq-len", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["flops"]["ratio_to_dense"] > 1 and out["flops"]["parts"]["mlp"] > 0
    rc = main(["plan", "--model", str(dense["qwen3"]), "--num-experts", "16", "--top-k", "6", "--granularity", "4"])
    assert rc == 2 and "valid --top-k: 4, 8, 12, 16" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- UpIT assemble
def test_upit_assemble_granular_equals_the_coarse_assembly(tmp_path, ids):
    """Two SFT checkpoints, each MLP split into G=4 experts (E=8, k=4): the same function as the coarse UpIT MoE
    (E=2, k=1) with the same router rows; expert c*G+g is slice g of checkpoint c's MLP."""
    cks = [make_dense("qwen3", tmp_path / f"ck{i}", seed=20 + i) for i in range(2)]
    common = ["upit-assemble", "--checkpoints", *map(str, cks), "--layers", "every:2"]
    assert main([*common, "--out", str(tmp_path / "coarse"), "--num-experts", "2", "--top-k", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "fine"), "--num-experts", "8", "--top-k", "4",
                 "--granularity", "4"]) == 0
    fine, coarse = load(tmp_path / "fine"), load(tmp_path / "coarse")
    diff = (logits(fine, ids) - logits(coarse, ids)).abs().max().item()
    print(f"UpIT assemble G=4 vs coarse: max abs logit diff {diff:.2e}")
    assert diff <= TOL
    for c, ck in enumerate(cks):
        d = dense_mlp(HFCheckpoint(ck), 1)
        gate, _, down = loaded_experts(fine, 1)
        assert torch.equal(torch.cat(list(gate[4 * c:4 * c + 4]), 0), d["gate"])
        assert torch.equal(torch.cat(list(down[4 * c:4 * c + 4]), 1), d["down"] * 4)
    report = json.loads((tmp_path / "fine" / "upit_report.json").read_text())
    assert report["granularity"] == 4 and report["copies"] == 2
