"""`upcycle-ds upit-assemble`: dense SFT checkpoints -> HF MoE whose expert i is checkpoint i's MLP, expanded to E.

Checked on the files (torch.equal per tensor) and through transformers' own MoE classes (fused experts on load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tiny import input_ids, make_dense, make_moe

from upcycle_ds.cli import main
from upcycle_ds.families import family_for
from upcycle_ds.io.hf import HFCheckpoint
from upcycle_ds.upcycle import make_router
from upcycle_ds.upit.expand import PROJS, expand_pool

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("upit_ckpts")
    out = {}
    for fam in ("llama", "qwen3"):
        out[fam] = [make_dense(fam, root / f"{fam}_{i}", seed=10 + i) for i in range(4)]
        out[fam + "_base"] = make_dense(fam, root / f"{fam}_base", seed=99)
    return out


def assemble(*argv: str) -> int:
    return main(["upit-assemble", *argv])


def dense_sd(path: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def check_expert_files(out: HFCheckpoint, fam, layers, experts_from: list[Path]):
    for l in layers:
        for e, src in enumerate(experts_from):
            ck = HFCheckpoint(src)
            for p in PROJS:
                assert torch.equal(out.get(fam.expert_key(l, e, p)), ck.get(fam.dense_mlp_key(l, p))), (l, e, p)


def check_loaded_experts(out_dir: Path, fam, layers, experts_from: list[Path]):
    """transformers' MoE model (fused experts in memory) holds checkpoint e's MLP as expert e."""
    moe = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    sd = moe.state_dict()
    for l in layers:
        gate_up = sd[fam.moe_fused["gate_up"].format(layer=l)]
        down = sd[fam.moe_fused["down"].format(layer=l)]
        for e, src in enumerate(experts_from):
            ref = dense_sd(src)
            inter = ref[fam.dense_mlp_key(l, "gate")].shape[0]
            assert torch.equal(gate_up[e, :inter], ref[fam.dense_mlp_key(l, "gate")])
            assert torch.equal(gate_up[e, inter:], ref[fam.dense_mlp_key(l, "up")])
            assert torch.equal(down[e], ref[fam.dense_mlp_key(l, "down")])
    return moe


@pytest.mark.parametrize("family,layers,moe_layers", [("llama", "all", [0, 1, 2, 3]), ("qwen3", "every:2", [1, 3])])
def test_experts_are_checkpoint_mlps_and_rest_is_last(ckpts, tmp_path, family, layers, moe_layers):
    cks = ckpts[family][:3]
    out_dir = tmp_path / "moe"
    assert assemble("--checkpoints", *map(str, cks), "--num-experts", "3", "--top-k", "2", "--layers", layers,
                    "--out", str(out_dir), "--seed", "5") == 0
    out = HFCheckpoint(out_dir)
    fam, is_moe = family_for(out.config)
    assert is_moe and fam.num_experts(out.config) == 3 and out.config["num_experts_per_tok"] == 2
    assert fam.moe_layers(out.config) == moe_layers
    check_expert_files(out, fam, moe_layers, cks)
    # non-expert weights (dense layers' MLPs included) are the last checkpoint's, exactly
    last = HFCheckpoint(cks[-1])
    moe_mlp = {fam.dense_mlp_key(l, p) for l in moe_layers for p in PROJS}
    for k in last.keys():
        if k not in moe_mlp:
            assert torch.equal(out.get(k), last.get(k)), k
    for l in moe_layers:  # the router is upcycle's random init
        r = out.get(fam.router_key(l))
        assert torch.equal(r, make_router(hidden=r.shape[1], num_experts=3, layer=l, std=0.02, seed=5, dtype=r.dtype))
    moe = check_loaded_experts(out_dir, fam, moe_layers, cks)
    with torch.no_grad():
        assert torch.isfinite(moe(input_ids=input_ids()).logits).all()
    rep = json.loads((out_dir / "upit_report.json").read_text())
    assert [e["checkpoint"] for e in rep["experts"]] == [str(c) for c in cks]
    assert sorted(map(int, rep["layers"])) == moe_layers
    cos = torch.tensor(rep["layers"][str(moe_layers[0])]["cosine"])
    assert cos.shape == (3, 3) and torch.equal(cos.diagonal(), torch.ones(3))
    assert (tmp_path / "moe" / "tokenizer.json").exists() == (cks[-1] / "tokenizer.json").exists()


def test_average_shared_weights(ckpts, tmp_path):
    cks = ckpts["llama"][:3]
    out_dir = tmp_path / "avg"
    assert assemble("--checkpoints", *map(str, cks), "--num-experts", "3", "--shared-weights", "average",
                    "--out", str(out_dir)) == 0
    out = HFCheckpoint(out_dir)
    fam, _ = family_for(out.config)
    refs = [dense_sd(c) for c in cks]
    moe_mlp = {fam.dense_mlp_key(l, p) for l in range(4) for p in PROJS}
    n_checked = 0
    for k in refs[-1]:
        if k in moe_mlp:
            continue
        want = torch.stack([r[k].double() for r in refs]).mean(0).float()
        got = out.get(k)
        assert torch.equal(got, want), k
        if "norm" not in k:  # norms are all ones in every checkpoint
            assert not torch.equal(got, refs[-1][k])
        n_checked += 1
    assert n_checked >= 10
    check_expert_files(out, fam, range(4), cks)


def test_more_checkpoints_than_experts_keeps_the_last_e(ckpts, tmp_path):
    cks = ckpts["llama"]  # 4 checkpoints, E = 2 -> checkpoints 2 and 3
    out_dir = tmp_path / "last2"
    assert assemble("--checkpoints", *map(str, cks), "--num-experts", "2", "--top-k", "1", "--out",
                    str(out_dir)) == 0
    out = HFCheckpoint(out_dir)
    fam, _ = family_for(out.config)
    check_expert_files(out, fam, range(4), cks[2:])
    check_loaded_experts(out_dir, fam, [0, 3], cks[2:])
    rep = json.loads((out_dir / "upit_report.json").read_text())
    assert rep["checkpoints_used"] == [str(c) for c in cks[2:]]
    assert rep["checkpoints_dropped"] == [str(c) for c in cks[:2]]
    assert out.config["upcycle_ds"]["upit"]["checkpoints"] == [str(c) for c in cks[2:]]


def test_expansion_writes_the_genetic_experts(ckpts, tmp_path):
    cks, base = ckpts["qwen3"][:3], ckpts["qwen3_base"]
    args = ["--checkpoints", *map(str, cks), "--num-experts", "6", "--base", str(base), "--layers", "1,2",
            "--dare-p", "0.3"]
    assert assemble(*args, "--seed", "11", "--out", str(tmp_path / "a")) == 0
    assert assemble(*args, "--seed", "11", "--out", str(tmp_path / "b")) == 0
    assert assemble(*args, "--seed", "12", "--out", str(tmp_path / "c")) == 0
    a, b, c = (HFCheckpoint(tmp_path / x) for x in "abc")
    fam, _ = family_for(a.config)
    assert fam.num_experts(a.config) == 6
    check_expert_files(a, fam, [1, 2], cks)
    rep = json.loads((tmp_path / "a" / "upit_report.json").read_text())
    assert rep["delta_base"] == str(base) and not rep["delta_base_is_first_checkpoint"]
    assert [e["source"] for e in rep["experts"]] == ["checkpoint"] * 3 + ["expansion"] * 3
    for l in (1, 2):
        mlp = lambda ck: {p: HFCheckpoint(ck).get(fam.dense_mlp_key(l, p)) for p in PROJS}  # noqa: E731
        exp = expand_pool(mlp(base), [mlp(ck) for ck in cks], 6, seed=11, layer=l, p=0.3)
        for i, new in enumerate(exp.new_experts):
            for p in PROJS:
                k = fam.expert_key(l, 3 + i, p)
                assert torch.equal(a.get(k), new[p]) and torch.equal(b.get(k), a.get(k))
            dropped = (new["gate"] == mlp(base)["gate"]).float().mean().item()
            assert 0.2 < dropped < 0.4  # DARE p = 0.3 on 64·96 elements
            got = rep["experts"][3 + i]["layers"][str(l)]
            assert got["parents"] == exp.provenance[i]["parents"] and got["alpha"] == exp.provenance[i]["alpha"]
        assert torch.equal(torch.tensor(rep["layers"][str(l)]["cosine"], dtype=torch.float64), exp.cosine)
        assert not torch.equal(c.get(fam.expert_key(l, 3, "gate")), a.get(fam.expert_key(l, 3, "gate")))
    # identical files for the same seed, byte for byte
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    check_loaded_experts(tmp_path / "a", fam, [1, 2], cks)


def test_expansion_without_base_uses_first_checkpoint(ckpts, tmp_path, capsys):
    cks = ckpts["llama"][:2]
    assert assemble("--checkpoints", *map(str, cks), "--num-experts", "3", "--out", str(tmp_path / "o")) == 0
    assert "no --base" in capsys.readouterr().err
    out = HFCheckpoint(tmp_path / "o")
    fam, _ = family_for(out.config)
    rep = json.loads((tmp_path / "o" / "upit_report.json").read_text())
    assert rep["delta_base"] == str(cks[0]) and rep["delta_base_is_first_checkpoint"]
    # base = checkpoint 0, so its delta is zero: the new expert interpolates checkpoint 0 and 1 (then DARE)
    prov = rep["experts"][2]["layers"]["0"]
    assert prov["parents"] == [0, 1] and prov["parent_cosine"] == 0.0
    g0, g1, g2 = (out.get(fam.expert_key(0, e, "gate")) for e in range(3))
    kept = g2 != g0
    torch.testing.assert_close(g2[kept] - g0[kept], (1 - prov["alpha"]) * (g1 - g0)[kept] / 0.7, rtol=1e-4,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def assert_clean_error(capsys, out: Path, rc: int, *needles: str):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("Loading", "Writing"))]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("upcycle-ds upit-assemble: error: "), err
    for n in needles:
        assert n in lines[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_input(ckpts, tmp_path, capsys):
    ll = list(map(str, ckpts["llama"][:2]))
    out = tmp_path / "out"
    other_shape = make_dense("llama", tmp_path / "wide", intermediate_size=128)
    moe = make_moe("mixtral", tmp_path / "mixtral")
    cases = [
        ([*ll, str(other_shape)], ["--num-experts", "3"], "differ in shape"),
        ([*ll, str(ckpts["qwen3"][0])], ["--num-experts", "3"], "mix model families"),
        ([*ll, str(moe)], ["--num-experts", "3"], "is an MoE checkpoint"),
        (ll, ["--num-experts", "1", "--top-k", "1"], "--num-experts must be >= 2"),
        (ll, ["--num-experts", "2", "--top-k", "3"], "--top-k must be between 1 and"),
        (ll[:1], ["--num-experts", "2"], "at least 2 checkpoints"),
        ([ll[0], ll[0]], ["--num-experts", "2"], "given twice"),
        (ll, ["--num-experts", "4", "--dare-p", "1"], "--dare-p"),
        (ll, ["--num-experts", "3", "--base", str(ckpts["qwen3_base"])], "--base"),
        (ll, ["--num-experts", "2", "--layers", "1,3"], "needs every layer to be MoE"),
        ([*ll, str(tmp_path / "nope")], ["--num-experts", "3"], "no such directory"),
    ]
    for cks, extra, needle in cases:
        rc = assemble("--checkpoints", *cks, *extra, "--out", str(out))
        assert_clean_error(capsys, out, rc, needle)
    out.mkdir()
    rc = assemble("--checkpoints", *ll, "--num-experts", "2", "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "exists; pass --overwrite" in err and list(out.iterdir()) == []
    assert assemble("--checkpoints", *ll, "--num-experts", "2", "--out", str(out), "--overwrite") == 0
    assert (out / "upit_report.json").is_file()
    shutil.rmtree(out)
