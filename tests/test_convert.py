"""`upcycle-ds convert` in one process: exact round trips between HF dense, HF MoE and the DeepSpeed checkpoint layout
we write (torch.equal on every tensor), collapse-to-dense as the exact inverse of copy-upcycling, --dry-run, and bad
input (one-line error, exit 2, nothing at the output). Checkpoints written by a real DeepSpeed engine, and ours loaded
by one, are in test_convert_ds.py."""

import json
import shutil

import pytest
import torch

from tiny import input_ids, logits, make_dense, make_moe

from upcycle_ds.cli import main
from upcycle_ds.io.ds import MODEL_STATES, DSCheckpoint
from upcycle_ds.io.hf import HFCheckpoint


def cli(*argv) -> int:
    return main(["convert", *map(str, argv)])


def assert_same_tensors(a, b):
    a, b = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.dtype(k) == b.dtype(k), k
        assert torch.equal(a.get(k), b.get(k)), k
    return len(a.keys())


@pytest.mark.parametrize("family,extra", [("llama", []), ("qwen3", ["--layers", "1,3"]),
                                          ("mistral", ["--num-experts", "8"])])
def test_dense_to_ds_to_dense_is_exact(tmp_path, family, extra):
    dense = make_dense(family, tmp_path / "d", dtype=torch.bfloat16 if family == "mistral" else torch.float32)
    assert cli("--input", dense, "--output", tmp_path / "ds", "--to", "ds", "--ep-size", "2", *extra) == 0
    assert (tmp_path / "ds" / "latest").read_text() == "global_step0"
    assert (tmp_path / "ds" / "global_step0" / MODEL_STATES).is_file()
    assert cli("--input", tmp_path / "ds", "--output", tmp_path / "back", "--to", "hf-dense") == 0
    assert assert_same_tensors(dense, tmp_path / "back") > 10
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == family and "upcycle_ds" not in cfg and "num_experts_per_tok" not in cfg
    x = input_ids()
    assert torch.equal(logits(tmp_path / "back", x), logits(dense, x))


@pytest.mark.parametrize("model_type,extra", [("mixtral", {}), ("qwen2_moe", {"mlp_only_layers": [1]})])
def test_moe_to_ds_ep2_to_moe_is_exact(tmp_path, model_type, extra):
    moe = make_moe(model_type, tmp_path / "m", **extra)  # qwen2_moe: a real (non-empty) shared expert
    assert cli("--input", moe, "--output", tmp_path / "ds", "--to", "ds", "--ep-size", "2") == 0
    assert cli("--input", tmp_path / "ds", "--output", tmp_path / "back", "--to", "hf-moe") == 0
    assert assert_same_tensors(moe, tmp_path / "back") > 20
    x = input_ids()
    assert torch.equal(logits(tmp_path / "back", x), logits(moe, x))


def test_copy_upcycled_to_dense_gives_back_the_dense_tensors(tmp_path):
    """fp32, 8 experts: a plain fp32 mean of 8 copies would round (x*3 needs 25 bits); we accumulate in float64."""
    dense = make_dense("llama", tmp_path / "d")
    assert main(["upcycle", "--model", str(dense), "--out", str(tmp_path / "moe"), "--num-experts", "8"]) == 0
    assert cli("--input", tmp_path / "moe", "--output", tmp_path / "mean", "--to", "hf-dense") == 0
    assert cli("--input", tmp_path / "moe", "--output", tmp_path / "e5", "--to", "hf-dense", "--expert", "5") == 0
    assert assert_same_tensors(dense, tmp_path / "mean") > 10
    assert_same_tensors(dense, tmp_path / "e5")
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["model_type"] == "llama"


def test_collapse_of_different_experts_is_their_mean(tmp_path):
    moe = make_moe("qwen3_moe", tmp_path / "m", decoder_sparse_step=2)
    assert cli("--input", moe, "--output", tmp_path / "d", "--to", "hf-dense") == 0
    src, out = HFCheckpoint(moe), HFCheckpoint(tmp_path / "d")
    got = out.get("model.layers.1.mlp.down_proj.weight")
    ref = torch.stack([src.get(f"model.layers.1.mlp.experts.{e}.down_proj.weight") for e in range(4)]).mean(0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    assert not torch.equal(got, src.get("model.layers.1.mlp.experts.0.down_proj.weight"))
    assert torch.equal(out.get("model.layers.0.mlp.down_proj.weight"), src.get("model.layers.0.mlp.down_proj.weight"))


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    moe = make_moe("mixtral", tmp_path / "m")
    assert cli("--input", moe, "--output", tmp_path / "ds", "--to", "ds", "--ep-size", "4", "--dry-run") == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "ds").exists()
    assert "model.layers.3.mlp.deepspeed_moe.experts.deepspeed_experts.3.down_proj.weight" in out
    ckpt = HFCheckpoint(moe)
    total = sum(ckpt.get(k).numel() * 4 for k in ckpt.keys())
    assert f"total: {len(ckpt.keys())} tensors, {total:,} bytes" in out


def test_ds_reader_is_lazy_and_names_are_hub_names(tmp_path):
    moe = make_moe("mixtral", tmp_path / "m")
    assert cli("--input", moe, "--output", tmp_path / "ds", "--to", "ds", "--ep-size", "2") == 0
    ck = DSCheckpoint(tmp_path / "ds" / "global_step0")  # a tag dir works too (config.json found one level up)
    assert sorted(ck.keys()) == sorted(HFCheckpoint(moe).keys())
    assert ck.shape("model.layers.2.block_sparse_moe.experts.1.w2.weight") == (64, 96)
    assert ck._cached == (0, 0)  # only the first expert file was opened (for its dtype)


# ------------------------------------------------------------------------------------------------------ bad input
def _bad(tmp_path, capsys, *argv, match: str):
    out = tmp_path / "out"
    capsys.readouterr()  # drop what the fixture printed
    rc = cli(*argv[:2], "--output", out, *argv[2:])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    if "exists" not in match:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.fixture
def ds_dir(tmp_path):
    moe = make_moe("mixtral", tmp_path / "m")
    assert cli("--input", moe, "--output", tmp_path / "ds", "--to", "ds", "--ep-size", "2") == 0
    return tmp_path / "ds"


def test_missing_expert_file(tmp_path, capsys, ds_dir):
    (ds_dir / "global_step0" / "layer_2_expert_3_mp_rank_00_model_states.pt").unlink()
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe",
         match="layer_2_expert_3_mp_rank_00_model_states.pt: missing (expert 3 of MoE layer 2)")


def test_expert_files_from_two_expert_counts(tmp_path, capsys, ds_dir):
    tag = ds_dir / "global_step0"
    for e in range(4, 8):  # files of an 8-expert run copied into a 4-expert checkpoint
        shutil.copy(tag / "layer_1_expert_0_mp_rank_00_model_states.pt", tag / f"layer_1_expert_{e}_mp_rank_00_model_states.pt")
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe", match="two different expert counts")


def test_unknown_family(tmp_path, capsys, ds_dir):
    cfg = json.loads((ds_dir / "config.json").read_text())
    (ds_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe", match="unsupported model_type 'deepseek_v3'")


def test_tag_that_does_not_exist(tmp_path, capsys, ds_dir):
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe", "--tag", "global_step9",
         match="tag 'global_step9' does not exist (tags here: global_step0)")


@pytest.mark.parametrize("which", [MODEL_STATES, "layer_3_expert_1_mp_rank_00_model_states.pt"])
def test_truncated_file(tmp_path, capsys, ds_dir, which):
    f = ds_dir / "global_step0" / which
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe", match=f"{which}: ")


def test_output_exists(tmp_path, capsys, ds_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "hf-moe", match="exists; pass --overwrite")
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_ep_size_must_divide_experts(tmp_path, capsys, ds_dir):
    _bad(tmp_path, capsys, "--input", ds_dir, "--to", "ds", "--ep-size", "3",
         match="--ep-size 3 does not divide the number of experts 4")
