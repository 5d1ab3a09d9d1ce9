"""Bad input to `upcycle-ds upcycle`: one line on stderr naming the problem, exit code 2, no traceback, nothing left
at OUT_DIR and no temp dir left beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_dense

from upcycle_ds.cli import main
from upcycle_ds.errors import UserError
from upcycle_ds.io.hf import atomic_output_dir


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {"llama": make_dense("llama", root / "llama"), "qwen2": make_dense("qwen2", root / "qwen2")}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["upcycle", *argv])
    return rc, capsys.readouterr().err


def assert_clean_error(rc: int, err: str, out_parent: Path, *must_contain: str, before: set[str] | None = None):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("upcycle-ds upcycle: error: "), err
    assert "Traceback" not in err
    for s in must_contain:
        assert s in lines[0], (s, lines[0])
    # nothing new in OUT's parent: no OUT, no .OUT.tmp-* left behind
    assert {p.name for p in out_parent.iterdir()} == (before or set())


def test_missing_dir(capsys, tmp_path):
    rc, err = run_cli(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_clean_error(rc, err, tmp_path, "nope", "no such directory")


def test_no_config_json(capsys, dense, tmp_path):
    m = copy_model(dense["llama"], tmp_path / "m")
    (m / "config.json").unlink()
    out_parent = tmp_path / "o"
    out_parent.mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(out_parent / "out"))
    assert_clean_error(rc, err, out_parent, "no config.json")


def test_invalid_config_json(capsys, dense, tmp_path):
    m = copy_model(dense["llama"], tmp_path / "m")
    (m / "config.json").write_text("{not json")
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "config.json", "not valid JSON")


def test_unknown_model_type(capsys, dense, tmp_path):
    m = copy_model(dense["llama"], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "unsupported model_type 'gpt2'", "llama", "qwen3")


def test_needs_remote_code(capsys, dense, tmp_path):
    m = copy_model(dense["llama"], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type="my_llama", architectures=["MyLlamaForCausalLM"],
               auto_map={"AutoModelForCausalLM": "modeling_my_llama.MyLlamaForCausalLM"})
    (m / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "'my_llama'", "remote code", "auto_map")


def test_already_moe(capsys, dense, tmp_path):
    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", str(dense["qwen2"]), "--out", str(moe), "--num-experts", "2"]) == 0
    capsys.readouterr()
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(moe), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "already an MoE checkpoint", "qwen2_moe")


def test_no_weights(capsys, dense, tmp_path):
    m = copy_model(dense["llama"], tmp_path / "m")
    (m / "model.safetensors").unlink()
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "no model.safetensors")


@pytest.mark.parametrize("cut", [100, 4], ids=["data", "header"])
def test_truncated_safetensors(capsys, dense, tmp_path, cut):
    m = copy_model(dense["llama"], tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-cut] if cut > 8 else data[:cut])
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "model.safetensors")
    assert ("truncated" if cut > 8 else "not a valid safetensors") in err


@pytest.fixture(scope="module")
def sharded(dense, tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("sharded") / "llama"
    transformers.AutoModelForCausalLM.from_pretrained(dense["llama"]).save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_missing_shard(capsys, sharded, tmp_path):
    m = copy_model(sharded, tmp_path / "m")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (m / victim).unlink()
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", victim, "missing")


def test_truncated_shard(capsys, sharded, tmp_path):
    m = copy_model(sharded, tmp_path / "m")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    victim = m / sorted(set(index["weight_map"].values()))[-1]
    victim.write_bytes(victim.read_bytes()[:-1])
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", victim.name, "truncated")


def test_index_names_tensor_not_in_shard(capsys, sharded, tmp_path):
    m = copy_model(sharded, tmp_path / "m")
    p = m / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    p.write_text(json.dumps(index))
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "model.layers.9.mlp.gate_proj.weight", "not in its shard")


def test_missing_mlp_tensor(capsys, dense, tmp_path):
    from safetensors.torch import load_file, save_file

    m = copy_model(dense["qwen2"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "model.layers.2.mlp.up_proj.weight", "missing")


@pytest.mark.parametrize("flags,words", [
    (["--num-experts", "4", "--top-k", "5"], ["--top-k", "between 1 and --num-experts=4", "got 5"]),
    (["--num-experts", "4", "--top-k", "0"], ["--top-k", "got 0"]),
    (["--num-experts", "1", "--top-k", "1"], ["--num-experts must be >= 2", "got 1"]),
    (["--layers", "garbage"], ["--layers 'garbage'", "all, every:N or a comma list"]),
    (["--layers", "1,7"], ["--layers '1,7'", "layer 7 out of range", "4 layers"]),
    (["--layers", "-1"], ["--layers '-1'", "out of range"]),
    (["--layers", "every:0"], ["--layers 'every:0'", "positive integer"]),
    (["--layers", "every:x"], ["--layers 'every:x'", "positive integer"]),
    (["--layers", "every:9"], ["--layers 'every:9'", "selects no layer"]),
    (["--reinit-ratio", "1.5"], ["--reinit-ratio", "[0, 1]"]),
    (["--noise-std", "-0.1"], ["--noise-std", ">= 0"]),
], ids=["k>E", "k=0", "E<2", "layers-garbage", "layers-range", "layers-negative", "every:0", "every:x", "every:9",
        "reinit>1", "noise<0"])
def test_bad_flags(capsys, dense, tmp_path, flags, words):
    rc, err = run_cli(capsys, "--model", str(dense["qwen2"]), "--out", str(tmp_path / "out"), *flags)
    assert_clean_error(rc, err, tmp_path, *words)


def test_mixtral_needs_all_layers(capsys, dense, tmp_path):
    rc, err = run_cli(capsys, "--model", str(dense["llama"]), "--out", str(tmp_path / "out"), "--layers", "every:2")
    assert_clean_error(rc, err, tmp_path, "mixtral needs every layer to be MoE", "--layers all", "Qwen2/Qwen3")


def test_out_exists_then_overwrite(capsys, dense, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_cli(capsys, "--model", str(dense["qwen2"]), "--out", str(out), "--num-experts", "2")
    assert_clean_error(rc, err, tmp_path, str(out), "exists", "--overwrite", before={"out"})
    assert (out / "keep.txt").read_text() == "mine"  # untouched

    # a failing run with --overwrite leaves the old OUT as it was
    rc, err = run_cli(capsys, "--model", str(dense["qwen2"]), "--out", str(out), "--overwrite", "--top-k", "9")
    assert_clean_error(rc, err, tmp_path, "--top-k", before={"out"})
    assert (out / "keep.txt").read_text() == "mine"

    rc = main(["upcycle", "--model", str(dense["qwen2"]), "--out", str(out), "--overwrite", "--num-experts", "2"])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # no .tmp / .old dirs left
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"


def test_out_parent_missing(capsys, dense, tmp_path):
    rc, err = run_cli(capsys, "--model", str(dense["qwen2"]), "--out", str(tmp_path / "a" / "b"))
    assert_clean_error(rc, err, tmp_path, "parent directory does not exist")


def test_failure_while_writing_leaves_nothing(tmp_path):
    """An error after the temp dir was filled (here: raised inside the context) removes it; OUT never appears."""
    out = tmp_path / "out"
    with pytest.raises(UserError):
        with atomic_output_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise UserError("boom")
    assert list(tmp_path.iterdir()) == []


def test_subprocess_real_stderr_and_exit_code(dense, tmp_path):
    exe = Path(sys.executable).parent / "upcycle-ds"
    out = tmp_path / "out"
    r = subprocess.run([str(exe), "upcycle", "--model", str(dense["llama"]), "--out", str(out), "--num-experts", "4",
                        "--top-k", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "upcycle-ds upcycle: error: --top-k must be between 1 and --num-experts=4 (got 6)"
    assert r.stdout == "" and list(tmp_path.iterdir()) == []

    m = copy_model(dense["llama"], tmp_path / "m")
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    r = subprocess.run([str(exe), "upcycle", "--model", str(m), "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "truncated safetensors file" in r.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"m"}

    # argparse's own errors (unknown flag, bad int) are also exit 2 with a usage line, no traceback
    r = subprocess.run([str(exe), "upcycle", "--model", str(m), "--out", str(out), "--num-experts", "four"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--num-experts" in r.stderr


def test_header_shape_disagrees_with_bytes(capsys, dense, tmp_path):
    """A header whose shape does not match its byte range (corrupt or hand-edited) is refused up front."""
    import struct

    m = copy_model(dense["llama"], tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["shape"] = [65]  # 64 floats on disk
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    (tmp_path / "o").mkdir()
    rc, err = run_cli(capsys, "--model", str(m), "--out", str(tmp_path / "o" / "out"))
    assert_clean_error(rc, err, tmp_path / "o", "model.norm.weight", "corrupt header")
