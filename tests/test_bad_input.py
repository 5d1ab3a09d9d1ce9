"""Bad input to every subcommand, as a hostile or careless user gives it: one line on stderr
(`upcycle-ds CMD: error: ...`), exit code 2, no traceback, and nothing created or changed next to the output
(no OUT, no `.OUT.tmp-*`, no `.OUT.old-*`, a pre-existing run dir untouched).

The table (`CASES`) builds each malformed input in the test (shared tiny models from module fixtures are copied) and
calls `upcycle_ds.cli.main([...])` in this process; `test_console_script_gives_the_same_line` checks for a few cases
that the installed `upcycle-ds` executable prints the same line. Real processes where a process is what is tested:
SIGTERM during `upcycle`, a file size limit (disk full) while writing, and (slow) two `train --nproc 2` jobs with one
--out (the second refused by the run lock) then SIGTERM to the first (launcher and both ranks end).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_proc import CONSOLE_SCRIPT, cli, cli_env
from tiny import dense_config, make_dense, make_jsonl, make_moe, make_tokenizer, moe_config

from upcycle_ds.cli import main
from upcycle_ds.cli_args import field_docs, parse_into
from upcycle_ds.errors import UserError
from upcycle_ds.io.hf import atomic_output_dir
from upcycle_ds.train.config import TrainArgs

ROOT_USER = os.geteuid() == 0


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Shared inputs: dense llama / qwen2, a sharded llama, an HF MoE with tokenizer, its DeepSpeed checkpoint,
    data files, and a fake run dir with a checkpoint for the --resume cases."""
    import transformers

    root = tmp_path_factory.mktemp("bad_input")
    d = {"root": root}
    d["llama"] = make_dense("llama", root / "llama")
    make_tokenizer(d["llama"])
    d["qwen2"] = make_dense("qwen2", root / "qwen2")
    d["sharded"] = root / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(d["llama"]).save_pretrained(d["sharded"], max_shard_size="60KB")
    assert (d["sharded"] / "model.safetensors.index.json").is_file()
    d["moe"] = make_moe("mixtral", root / "moe", num_experts=4, top_k=2)
    make_tokenizer(d["moe"])
    d["ds"] = root / "ds"
    assert main(["convert", "--input", str(d["moe"]), "--output", str(d["ds"]), "--to", "ds"]) == 0
    d["data"] = make_jsonl(root / "train.jsonl", 40)
    d["rows"] = [json.loads(line) for line in d["data"].read_text().splitlines()]
    return d


def then(result, *effects):
    """`result`, after the side effects that built it (for one-expression case builders)."""
    return result


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header, data: bytes, header_bytes: bytes | None = None) -> None:
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def model_with(w, d: Path, fn=None, *, src="llama", config=None) -> Path:
    """A copy of model `src` with its safetensors header edited by fn(header, data) -> (header, data) and/or its
    config.json edited by config(cfg)."""
    m = copy(w[src], d / "m")
    if fn is not None:
        header, data = read_st(m / "model.safetensors")
        res = fn(header, data)
        header, data = res if res is not None else (header, data)
        write_st(m / "model.safetensors", header, data)
    if config is not None:
        edit_json(m / "config.json", config)
    return m


def set_entry(key: str, **kw):
    def fn(header, data):
        header[key].update(kw)
        return header, data
    return fn


def swap_offsets(a: str, b: str):
    def fn(header, data):
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return header, data
    return fn


def first_key_at_zero(header) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def transpose(key: str):
    def fn(header, data):
        header[key]["shape"] = header[key]["shape"][::-1]  # same byte count, wrong layout
        return header, data
    return fn


def sharded_with(w, d: Path, fn) -> Path:
    m = copy(w["sharded"], d / "m")
    p = m / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    res = fn(index, m)
    p.write_text(res if isinstance(res, str) else json.dumps(index))
    return m


def retarget_shard(name_fn):
    def fn(index, m):
        first = sorted(set(index["weight_map"].values()))[0]
        for k, v in index["weight_map"].items():
            if v == first:
                index["weight_map"][k] = name_fn(m, first)
    return fn


def ds_with(w, d: Path, fn) -> Path:
    ds = copy(w["ds"], d / "ds")
    fn(ds)
    return ds


def run_dir_with_checkpoint(w, d: Path, *, config=None, record=None, optim=("zero_pp_rank_0", "zero_pp_rank_1"),
                            latest="global_step3") -> Path:
    """OUT with checkpoints/{latest, config.json, global_step3/<optimizer files>} and train_args.yaml, as a
    previous `train --nproc 2 --model moe --ep-size 1` run leaves them (file names only: the launcher reads names)."""
    out = d / "run"
    tag = out / "checkpoints" / "global_step3"
    tag.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(latest)
    cfg = json.loads((w["moe"] / "config.json").read_text())
    (out / "checkpoints" / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    for o in optim:
        (tag / f"bf16_{o}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    rec = dataclasses.asdict(TrainArgs(model=str(w["moe"]), data=str(w["data"]), out=str(out), max_length=64))
    rec = {k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}
    rec.update(record or {})
    (out / "train_args.yaml").write_text(yaml.safe_dump(rec))
    return out


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def yaml_file(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# -------------------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    id: str
    build: object
    """(w, d) -> argv, with outputs under d (d is a fresh empty dir)."""
    must: tuple[str, ...] = ()


def up(model, out_name="out", *flags):
    return lambda w, d: ["upcycle", "--model", str(model(w, d)), "--out", str(d / out_name), *flags]


def upf(*flags):
    return up(lambda w, d: w["qwen2"], "out", *flags)


def conv(inp, *flags, to="hf-moe"):
    return lambda w, d: ["convert", "--input", str(inp(w, d)), "--output", str(d / "out"), "--to", to, *flags]


def train(*flags, model=None, data=None, out="out", nproc="2", cmd="train"):
    def build(w, d):
        m = model(w, d) if model else w["moe"]
        dd = data(w, d) if data else w["data"]
        o = out(w, d) if callable(out) else d / out
        return [cmd, "--nproc", nproc, "--model", str(m), "--data", str(dd), "--out", str(o), "--max-length", "64",
                *[f(w, d) if callable(f) else f for f in flags]]
    return build


def cfg_yaml(text):
    return lambda w, d: str(yaml_file(d / "run.yaml", text))


LL = "model.layers.0.mlp.up_proj.weight"
CASES = [
    # ---------------------------------------------------------------- upcycle: the model dir
    Case("up-missing-dir", up(lambda w, d: d / "nope"), ("nope", "no such directory")),
    Case("up-model-is-file", up(lambda w, d: jsonl(d / "f.jsonl", [{}])), ("not a directory",)),
    Case("up-no-config", up(lambda w, d: then(d / "m", (model_with(w, d) / "config.json").unlink())),
         ("no config.json",)),
    Case("up-config-not-json", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "config.json").write_text(
        "{not json"))),
         ("config.json", "not valid JSON")),
    Case("up-config-binary", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "config.json").write_bytes(
        b"\xff\xfe\x00"))), ("config.json", "not valid JSON")),
    Case("up-config-is-list", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "config.json").write_text(
        "[1, 2]"))), ("config.json", "expected a JSON object", "list")),
    Case("up-config-nan", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "config.json").write_text(
        (w["llama"] / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')))),
        ("config.json", "NaN is not a JSON number")),
    Case("up-config-no-hidden-size", up(lambda w, d: model_with(w, d, config=lambda c: c.pop("hidden_size") and c)),
         ("config.json", "required key 'hidden_size' is missing")),
    Case("up-config-no-layers", up(lambda w, d: model_with(w, d, config=lambda c: c.pop("num_hidden_layers") and c)),
         ("required key 'num_hidden_layers' is missing",)),
    Case("up-config-hidden-str", up(lambda w, d: model_with(w, d, config=lambda c: c.update(hidden_size="64"))),
         ("hidden_size must be an integer >= 1", "'64'")),
    Case("up-config-heads-do-not-divide", up(lambda w, d: model_with(
        w, d, config=lambda c: {k: v for k, v in c.items() if k != "head_dim"} | {"num_attention_heads": 5,
                                                                                   "num_key_value_heads": 5})),
        ("hidden_size 64 is not divisible by num_attention_heads 5",)),
    Case("up-config-kv-heads", up(lambda w, d: model_with(w, d, config=lambda c: c.update(num_key_value_heads=3))),
         ("num_attention_heads 4 is not divisible by num_key_value_heads 3",)),
    Case("up-config-intermediate-disagrees", up(lambda w, d: model_with(
        w, d, config=lambda c: c.update(intermediate_size=128))),
        ("model.layers.0.mlp.", "has shape [64, 96]", "intermediate_size 128", "implies [64, 128]")),
    Case("up-transposed-up-proj", up(lambda w, d: model_with(w, d, transpose(LL))),
         (LL, "has shape [64, 96]", "implies [96, 64]")),
    Case("up-config-vocab-disagrees", up(lambda w, d: model_with(w, d, config=lambda c: c.update(vocab_size=256))),
         ("has shape [128, 64]", "implies [256, 64]")),
    Case("up-config-fewer-layers", up(lambda w, d: model_with(w, d, config=lambda c: c.update(num_hidden_layers=2))),
         ("is for layer 2", "num_hidden_layers=2")),
    Case("up-unknown-model-type", up(lambda w, d: model_with(w, d, config=lambda c: c.update(
        model_type="gpt2", architectures=["GPT2LMHeadModel"]))), ("unsupported model_type 'gpt2'", "qwen3")),
    Case("up-needs-remote-code", up(lambda w, d: model_with(w, d, config=lambda c: c.update(
        model_type="my_llama", auto_map={"AutoModelForCausalLM": "m.M"}))), ("'my_llama'", "remote code")),
    Case("up-already-moe", up(lambda w, d: w["moe"]), ("already an MoE checkpoint", "mixtral")),
    Case("up-no-weights", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "model.safetensors").unlink())),
         ("no model.safetensors",)),
    Case("up-pickle-only", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "model.safetensors").rename(
        d / "m" / "pytorch_model.bin"))), ("only safetensors checkpoints are read",)),
    # ---------------------------------------------------------------- upcycle: safetensors headers
    Case("st-truncated-data", up(lambda w, d: model_with(w, d, lambda h, b: (h, b[:-100]))),
         ("model.safetensors", "truncated")),
    Case("st-4-bytes", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "model.safetensors").write_bytes(
        b"abcd"))), ("not a valid safetensors file",)),
    Case("st-header-longer-than-file", up(lambda w, d: then(d / "m", (copy(w["llama"], d / "m") / "model.safetensors")
                                                            .write_bytes(struct.pack("<Q", 10**9) + b"{}"))),
         ("header length 1000000000 exceeds the file",)),
    Case("st-header-not-json", up(lambda w, d: (write_st(copy(w["llama"], d / "m") / "model.safetensors", None,
                                                         b"", b"{nope") or d / "m")), ("header is not JSON",)),
    Case("st-header-is-list", up(lambda w, d: (write_st(copy(w["llama"], d / "m") / "model.safetensors", [1], b"")
                                               or d / "m")), ("header is not a JSON object",)),
    Case("st-dtype-wrong-for-bytes", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", dtype="F16"))),
         ("model.norm.weight has 256 bytes", "F16 needs 128", "corrupt header")),
    Case("st-dtype-unknown", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", dtype="F7"))),
         ("unsupported dtype 'F7'",)),
    Case("st-shape-missing", up(lambda w, d: model_with(w, d, lambda h, b: (h["model.norm.weight"].pop("shape"),
                                                                            (h, b))[1])),
         ("model.norm.weight has shape None",)),
    Case("st-shape-negative", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", shape=[-64]))),
         ("model.norm.weight has shape [-64]", "integers >= 0")),
    Case("st-shape-not-list", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", shape=64))),
         ("model.norm.weight has shape 64",)),
    Case("st-shape-bool", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", shape=[True, 64]))),
         ("model.norm.weight has shape [True, 64]",)),
    Case("st-shape-disagrees-with-bytes", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight",
                                                                                     shape=[65]))),
         ("model.norm.weight has 256 bytes", "corrupt header")),
    Case("st-offsets-negative", up(lambda w, d: model_with(w, d, lambda h, b: (h[first_key_at_zero(h)].update(
        data_offsets=[-8, h[first_key_at_zero(h)]["data_offsets"][1] - 8]), (h, b))[1])),
        ("data_offsets [-8,", "0 <= begin <= end")),
    Case("st-offsets-reversed", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight",
                                                                           data_offsets=[256, 0]))),
         ("model.norm.weight has data_offsets [256, 0]",)),
    Case("st-offsets-not-list", up(lambda w, d: model_with(w, d, set_entry("model.norm.weight", data_offsets="0"))),
         ("data_offsets '0'",)),
    Case("st-offsets-overlap", up(lambda w, d: model_with(w, d, lambda h, b: (h["model.norm.weight"].update(
        data_offsets=[0, 256]), (h, b))[1])), ("overlaps the previous tensor", "corrupt header")),
    Case("st-offsets-gap", up(lambda w, d: model_with(w, d, lambda h, b: (
        [v.update(data_offsets=[v["data_offsets"][0] + 8, v["data_offsets"][1] + 8])
         for k, v in h.items() if k != "__metadata__"], (h, bytes(8) + b))[1])), ("leaves a gap of 8 bytes",)),
    Case("st-trailing-bytes", up(lambda w, d: model_with(w, d, lambda h, b: (h, b + bytes(16)))),
         ("16 bytes after the last tensor",)),
    Case("st-metadata-not-dict", up(lambda w, d: model_with(w, d, lambda h, b: (h.update(__metadata__=[1]), (h, b))[1])),
         ("__metadata__ must map strings to strings",)),
    Case("st-entry-not-object", up(lambda w, d: model_with(w, d, lambda h, b: (h.update({"x.weight": 3}),
                                                                               (h, b))[1])),
         ("header entry 'x.weight' is not an object",)),
    Case("st-entry-dropped-from-header", up(lambda w, d: model_with(w, d, lambda h, b: (
        h.pop("model.layers.2.mlp.up_proj.weight"), h.update({k: v for k, v in h.items()}), (h, b))[2])),
        ("leaves a gap",)),
    Case("st-tensor-missing", up(lambda w, d: _drop_tensor(w, d, "model.layers.2.mlp.up_proj.weight")),
         ("model.layers.2.mlp.up_proj.weight is missing",)),
    # ---------------------------------------------------------------- upcycle: sharded checkpoints
    Case("idx-missing-shard", up(lambda w, d: sharded_with(w, d, lambda i, m: (m / sorted(set(
        i["weight_map"].values()))[1]).unlink())), ("named in model.safetensors.index.json is missing",)),
    Case("idx-truncated-shard", up(lambda w, d: sharded_with(w, d, lambda i, m: (m / sorted(set(
        i["weight_map"].values()))[-1]).write_bytes((m / sorted(set(i["weight_map"].values()))[-1]).read_bytes()[:-1]))),
        ("truncated",)),
    Case("idx-tensor-not-in-shard", up(lambda w, d: sharded_with(w, d, lambda i, m: i["weight_map"].update(
        {"model.layers.9.mlp.gate_proj.weight": sorted(set(i["weight_map"].values()))[0]}))),
        ("model.layers.9.mlp.gate_proj.weight", "not in its shard")),
    Case("idx-not-json", up(lambda w, d: sharded_with(w, d, lambda i, m: "{oops")), ("index.json", "not valid JSON")),
    Case("idx-is-list", up(lambda w, d: sharded_with(w, d, lambda i, m: "[]")), ("expected a JSON object", "list")),
    Case("idx-weight-map-list", up(lambda w, d: sharded_with(w, d, lambda i, m: i.update(weight_map=[]))),
         ("`weight_map` must be an object", "list")),
    Case("idx-weight-map-missing", up(lambda w, d: sharded_with(w, d, lambda i, m: i.pop("weight_map") and None)),
         ("`weight_map` must be an object", "NoneType")),
    Case("idx-shard-not-str", up(lambda w, d: sharded_with(w, d, lambda i, m: i["weight_map"].update(
        {"model.norm.weight": 3}))), ("weight_map['model.norm.weight'] must be a shard file name",)),
    Case("idx-shard-absolute", up(lambda w, d: sharded_with(w, d, retarget_shard(
        lambda m, first: str((m / first).resolve()))), ), ("is an absolute path",)),
    Case("idx-shard-dotdot", up(lambda w, d: sharded_with(w, d, retarget_shard(
        lambda m, first: "../../" + first))), ("contains `..`",)),
    Case("idx-shard-symlink-outside", up(lambda w, d: sharded_with(w, d, retarget_shard(
        lambda m, first: (shutil.move(m / first, d / "elsewhere.safetensors"),
                          (m / "link.safetensors").symlink_to(d / "elsewhere.safetensors"),
                          "link.safetensors")[2]))), ("'link.safetensors' resolves outside",)),
    # ---------------------------------------------------------------- upcycle: flags
    Case("flag-top-k-above-e", upf("--num-experts", "4", "--top-k", "5"), ("--top-k", "between 1 and", "got 5")),
    Case("flag-top-k-0", upf("--top-k", "0"), ("--top-k", "got 0")),
    Case("flag-one-expert", upf("--num-experts", "1", "--top-k", "1"), ("--num-experts must be >= 2",)),
    Case("flag-layers-garbage", upf("--layers", "garbage"), ("--layers 'garbage'",)),
    Case("flag-layers-range", upf("--layers", "1,7"), ("layer 7 out of range",)),
    Case("flag-layers-negative", upf("--layers", "-1"), ("--layers '-1'", "out of range")),
    Case("flag-layers-every-0", upf("--layers", "every:0"), ("positive integer",)),
    Case("flag-layers-every-9", upf("--layers", "every:9"), ("selects no layer",)),
    Case("flag-reinit-above-1", upf("--reinit-ratio", "1.5"), ("--reinit-ratio", "[0, 1]")),
    Case("flag-reinit-nan", upf("--reinit-ratio", "nan"), ("--reinit-ratio", "must be a finite number")),
    Case("flag-noise-negative", upf("--noise-std", "-0.1"), ("--noise-std", ">= 0")),
    Case("flag-noise-nan", upf("--noise-std", "nan"), ("argument --noise-std: must be a finite number (got 'nan')",)),
    Case("flag-noise-inf", upf("--noise-std", "inf"), ("--noise-std", "finite")),
    Case("flag-capacity-nan", upf("--capacity-factor", "nan"), ("--capacity-factor", "finite")),
    Case("flag-capacity-0", upf("--capacity-factor", "0"), ("--capacity-factor must be > 0",)),
    Case("flag-capacity-negative", upf("--capacity-factor", "-1"), ("--capacity-factor must be > 0",)),
    Case("flag-max-shard-0", upf("--max-shard-gb", "0"), ("--max-shard-gb must be > 0",)),
    Case("flag-max-shard-negative", upf("--max-shard-gb", "-1"), ("--max-shard-gb must be > 0",)),
    Case("flag-max-shard-inf", upf("--max-shard-gb", "inf"), ("--max-shard-gb", "finite")),
    Case("flag-not-an-int", upf("--num-experts", "four"), ("--num-experts", "invalid int value: 'four'")),
    Case("flag-unknown", upf("--experts", "4"), ("unrecognized arguments",)),
    Case("flag-mixtral-all-layers", up(lambda w, d: w["llama"], "out", "--layers", "every:2"),
         ("mixtral needs every layer to be MoE",)),
    # ---------------------------------------------------------------- upcycle: the output
    Case("out-exists", lambda w, d: ["upcycle", "--model", str(w["qwen2"]), "--out", str(_mkdir(d / "out"))],
         ("exists; pass --overwrite",)),
    Case("out-parent-missing", upf() and (lambda w, d: ["upcycle", "--model", str(w["qwen2"]), "--out",
                                                        str(d / "a" / "b")]), ("parent directory does not exist",)),
    Case("out-is-the-model", lambda w, d: ["upcycle", "--model", str(copy(w["qwen2"], d / "m")), "--out",
                                           str(d / "m"), "--overwrite", "--num-experts", "2"],
         ("is the input", "write the output elsewhere")),
    Case("out-contains-the-model", lambda w, d: ["upcycle", "--model", str(copy(w["qwen2"], d / "x" / "m")),
                                                 "--out", str(d / "x"), "--overwrite", "--num-experts", "2"],
         ("contains the input",)),
    Case("out-read-only", lambda w, d: ["upcycle", "--model", str(w["qwen2"]), "--out", str(_read_only(d) / "out"),
                                        "--num-experts", "2"], ("cannot write",)),
    # ---------------------------------------------------------------- convert
    Case("conv-out-tag-dotdot", conv(lambda w, d: w["moe"], "--out-tag", "../../x", to="ds"), ("--out-tag", "`..`")),
    Case("conv-out-tag-absolute", conv(lambda w, d: w["moe"], "--out-tag", "/tmp/x", to="ds"),
         ("--out-tag", "absolute path")),
    Case("conv-out-tag-empty", conv(lambda w, d: w["moe"], "--out-tag", "", to="ds"), ("--out-tag", "not a valid")),
    Case("conv-tag-dotdot", conv(lambda w, d: w["ds"], "--tag", "../ds"), ("--tag", "`..`")),
    Case("conv-tag-absolute", conv(lambda w, d: w["ds"], "--tag", "/etc"), ("--tag", "absolute path")),
    Case("conv-tag-missing", conv(lambda w, d: w["ds"], "--tag", "global_step9"),
         ("tag 'global_step9' does not exist (tags here: global_step0)",)),
    Case("conv-latest-absolute", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "latest").write_text(
        str((ds / "global_step0").resolve()))), ), ("latest names tag", "absolute path")),
    Case("conv-latest-dotdot", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "latest").write_text(
        "../ds/global_step0"))), ("latest names tag", "`..`")),
    Case("conv-latest-missing-tag", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "latest").write_text(
        "global_step7"))), ("tag 'global_step7' does not exist",)),
    Case("conv-latest-binary", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "latest").write_bytes(
        b"\xff\xfe\x00\x01"))), ("latest: not a text file",)),
    Case("conv-latest-symlink-tag", conv(lambda w, d: ds_with(w, d, lambda ds: (
        shutil.move(ds / "global_step0", d / "outside"), (ds / "global_step0").symlink_to(d / "outside")))),
        ("resolves outside",)),
    Case("conv-ds-no-config", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "config.json").unlink())),
         ("no config.json next to `latest`",)),
    Case("conv-ds-config-list", conv(lambda w, d: ds_with(w, d, lambda ds: (ds / "config.json").write_text("[]"))),
         ("config.json: expected a JSON object",)),
    Case("conv-ds-config-no-hidden", conv(lambda w, d: ds_with(w, d, lambda ds: edit_json(
        ds / "config.json", lambda c: c.pop("hidden_size") and c))), ("required key 'hidden_size' is missing",)),
    Case("conv-ds-config-vocab", conv(lambda w, d: ds_with(w, d, lambda ds: edit_json(
        ds / "config.json", lambda c: c.update(vocab_size=99)))), ("model.embed_tokens.weight has shape [128, 64]",
                                                                    "implies [99, 64]")),
    Case("conv-ds-missing-expert", conv(lambda w, d: ds_with(w, d, lambda ds: (
        ds / "global_step0" / "layer_2_expert_3_mp_rank_00_model_states.pt").unlink())),
        ("layer_2_expert_3_mp_rank_00_model_states.pt: missing",)),
    Case("conv-ds-expert-transposed", conv(lambda w, d: ds_with(w, d, _transpose_expert)),
         ("layer_1_expert_2_mp_rank_00_model_states.pt", "has shape [64, 96]", "implies [96, 64]")),
    Case("conv-ds-expert-symlink-outside", conv(lambda w, d: ds_with(w, d, lambda ds: (
        shutil.move(ds / "global_step0" / "layer_0_expert_1_mp_rank_00_model_states.pt", d / "x.pt"),
        (ds / "global_step0" / "layer_0_expert_1_mp_rank_00_model_states.pt").symlink_to(d / "x.pt")))),
        ("layer_0_expert_1_mp_rank_00_model_states.pt", "resolves outside")),
    Case("conv-ds-model-states-garbage", conv(lambda w, d: ds_with(w, d, lambda ds: (
        ds / "global_step0" / "mp_rank_00_model_states.pt").write_bytes(b"garbage"))),
        ("mp_rank_00_model_states.pt: not a readable DeepSpeed checkpoint file",)),
    Case("conv-ep-size-0", conv(lambda w, d: w["moe"], "--ep-size", "0", to="ds"), ("--ep-size must be >= 1",)),
    Case("conv-ep-size-3", conv(lambda w, d: w["moe"], "--ep-size", "3", to="ds"),
         ("--ep-size 3 does not divide the number of experts 4",)),
    Case("conv-expert-negative", conv(lambda w, d: w["moe"], "--expert", "-1", to="hf-dense"),
         ("--expert must be >= 0",)),
    Case("conv-expert-out-of-range", conv(lambda w, d: w["moe"], "--expert", "9", to="hf-dense"),
         ("--expert 9 out of range",)),
    Case("conv-already-moe", conv(lambda w, d: w["moe"]), ("already an HF MoE checkpoint",)),
    Case("conv-dense-to-moe", conv(lambda w, d: w["llama"]), ("hf-dense -> hf-moe is `upcycle-ds upcycle`",)),
    Case("conv-output-is-input", lambda w, d: ["convert", "--input", str(copy(w["moe"], d / "m")), "--output",
                                               str(d / "m"), "--to", "ds", "--overwrite"],
         ("is the input", "write the output elsewhere")),
    Case("conv-output-contains-input", lambda w, d: ["convert", "--input", str(copy(w["moe"], d / "x" / "m")),
                                                     "--output", str(d / "x"), "--to", "ds", "--overwrite"],
         ("contains the input",)),
    Case("conv-tag-on-hf", conv(lambda w, d: w["moe"], "--tag", "global_step0", to="ds"),
         ("--tag applies to DeepSpeed checkpoints",)),
    Case("conv-master-on-hf", conv(lambda w, d: w["moe"], "--weights", "master", to="ds"),
         ("--weights master needs a DeepSpeed checkpoint",)),
    Case("conv-max-shard-0", conv(lambda w, d: w["ds"], "--max-shard-gb", "0"), ("--max-shard-gb must be > 0",)),
    Case("conv-noise-nan", conv(lambda w, d: w["llama"], "--noise-std", "nan", to="ds"), ("finite",)),
    Case("conv-moe-transposed", conv(lambda w, d: _moe_with_transposed_expert(w, d), to="ds"),
         ("model.layers.1.block_sparse_moe.experts.0.w3.weight has shape [64, 96]",)),
    Case("conv-to-unknown", conv(lambda w, d: w["moe"], to="gguf"), ("argument --to: invalid choice",)),
    # ---------------------------------------------------------------- train (checked by the launcher, no rank starts)
    Case("train-data-missing", train(data=lambda w, d: d / "nope.jsonl"), ("data file not found", "nope.jsonl")),
    Case("train-data-no-columns", train(data=lambda w, d: jsonl(d / "bad.jsonl", [{"question": "1?", "answer": "1"}])),
         ("bad.jsonl", "messages", "'answer'", "'question'")),
    Case("train-data-one-bad-row", train(data=lambda w, d: jsonl(d / "one.jsonl", w["rows"][:4] + [{"prompt": "x"}]
                                                                 + w["rows"][4:8])), ("one.jsonl", "row 4")),
    Case("train-eval-data-missing", train("--eval-data", lambda w, d: str(d / "eval.jsonl")),
         ("data file not found", "eval.jsonl")),
    Case("train-data-not-utf8", train(data=lambda w, d: _write(d / "bin.jsonl", b"".join(
        (json.dumps(r) + "\n").encode() for r in w["rows"][:5]) + b'{"prompt": "\xff", "response": "x"}\n')),
        ("bin.jsonl: line 6 is not UTF-8 text",)),
    Case("train-data-empty-responses", train("--eval-fraction", "0", data=lambda w, d: jsonl(d / "empty.jsonl", [
        {"prompt": r["prompt"], "response": ""} for r in w["rows"]])),
        ("no training samples with response tokens left",)),
    Case("train-data-prompts-too-long", train("--eval-fraction", "0", data=lambda w, d: jsonl(d / "long.jsonl", [
        {"prompt": "x" * 200, "response": r["response"]} for r in w["rows"]])),
        ("no training samples with response tokens left",)),
    Case("train-data-too-few-rows", train("--grad-accum", "64", "--global-batch-size", "256"),
         ("too few for one step",)),
    Case("train-ep-size-3", train("--ep-size", "3", nproc="3"), ("--ep-size 3 must divide the number of experts (4)",)),
    Case("train-ep-size-world", train("--ep-size", "2", nproc="3"), ("--ep-size 2 must divide the world size",)),
    Case("train-ep-size-0", train("--ep-size", "0"), ("--ep-size 0 must divide",)),
    Case("train-nproc-0", train(nproc="0"), ("--nproc must be >= 1",)),
    Case("train-zero-3", train("--zero-stage", "3"), ("--zero-stage 3 is not supported with DeepSpeed-MoE",)),
    Case("train-offload-zero-0", train("--zero-stage", "0", "--offload-optimizer"),
         ("--offload-optimizer needs --zero-stage 1 or 2",)),
    Case("train-offload-host-memory", train("--zero-stage", "2", "--offload-optimizer", "--host-memory-gb", "0.001"),
         ("--offload-optimizer: 2 ranks need", "MiB of host memory", "usable (--host-memory-gb 0.001, 10% kept free)")),
    Case("train-offload-pin-alone", train("--offload-pin-memory"), ("--offload-pin-memory applies to",)),
    Case("train-fp16-flag", train("--dtype", "fp16"), ("--dtype", "invalid choice: 'fp16'")),
    Case("train-fp16-yaml", train("--config", cfg_yaml("dtype: fp16\n")), ("field 'dtype'", "got 'fp16'")),
    Case("train-int8-yaml", train("--config", cfg_yaml("dtype: int8\n")), ("field 'dtype'", "'bf16', 'fp32'")),
    Case("train-global-batch", train("--micro-batch-size", "2", "--grad-accum", "3", "--global-batch-size", "16"),
         ("--global-batch-size 16 != --micro-batch-size 2 x --grad-accum 3 x 2 ranks = 12",)),
    Case("train-dense-needs-num-experts", train(model=lambda w, d: w["llama"]), ("dense llama checkpoint",
                                                                              "--num-experts")),
    Case("train-lr-nan", train("--lr", "nan"), ("--lr", "finite")),
    Case("train-lr-0", train("--lr", "0"), ("--lr must be > 0",)),
    Case("train-betas-1", train("--adam-betas", "1", "0.9"), ("--adam-betas must be two numbers in [0, 1)",)),
    Case("train-betas-negative", train("--adam-betas", "0.9", "-0.1"), ("--adam-betas",)),
    Case("train-betas-one-value", train("--adam-betas", "0.9"), ("--adam-betas", "expected 2 arguments")),
    Case("train-eval-fraction-1", train("--eval-fraction", "1"), ("--eval-fraction must be in [0, 1)",)),
    Case("train-eval-fraction-negative", train("--eval-fraction", "-0.1"), ("--eval-fraction",)),
    Case("train-min-lr-ratio", train("--min-lr-ratio", "2"), ("--min-lr-ratio must be in [0, 1]",)),
    Case("train-warmup-negative", train("--warmup-steps", "-1"), ("--warmup-steps must be >= 0",)),
    Case("train-grad-clip-negative", train("--grad-clip", "-1"), ("--grad-clip must be >= 0",)),
    Case("train-capacity-nan", train("--capacity-factor", "nan"), ("--capacity-factor", "finite")),
    Case("train-capacity-0", train("--capacity-factor", "0"), ("--capacity-factor must be > 0",)),
    Case("train-max-length-1", train("--max-length", "1"), ("--max-length must be >= 2",)),
    Case("train-max-rows-0", train("--max-rows", "0"), ("--max-rows must be >= 1",)),
    Case("train-seed-negative", train("--seed", "-1"), ("--seed must be >= 0",)),
    Case("train-epochs-0", train("--epochs", "0"), ("--epochs must be > 0",)),
    Case("train-freeze-bad-regex", train("--freeze", "("), ("--freeze '('", "not a valid regular expression")),
    Case("train-only-matches-nothing", train("--train-only", "no_such_param"),
         ("--train-only 'no_such_param' matches no parameter", "model.layers.0.")),
    Case("train-freeze-matches-nothing", train("--freeze", "embed_tokenz"), ("--freeze 'embed_tokenz' matches no",)),
    Case("train-freeze-everything", train("--freeze", "."), ("leave no trainable parameter",)),
    Case("train-ds-config-missing", train("--ds-config", lambda w, d: str(d / "ds.json")),
         ("DeepSpeed config not found",)),
    Case("train-ds-config-not-json", train("--ds-config", lambda w, d: str(_write(d / "ds.json", b"{x"))),
         ("ds.json: not valid JSON",)),
    Case("train-no-tokenizer", train(model=lambda w, d: _moe_without_tokenizer(w, d)), ("cannot load its tokenizer",)),
    Case("train-model-transposed", train(model=lambda w, d: _moe_with_transposed_expert(w, d)),
         ("has shape [64, 96]",)),
    Case("train-out-read-only", train(out=lambda w, d: _read_only(d) / "run"), ("cannot write",)),
    # ---------------------------------------------------------------- train: --config YAML
    Case("yaml-lr-list", train("--config", cfg_yaml("lr: [1, 2]\n")), ("field 'lr'", "expected a number", "list")),
    Case("yaml-freeze-mapping", train("--config", cfg_yaml("freeze: {embed_tokens: 1}\n")),
         ("field 'freeze'", "expected a list", "got dict")),
    Case("yaml-betas-three", train("--config", cfg_yaml("adam_betas: [0.9, 0.95, 0.99]\n")),
         ("field 'adam_betas'", "expected a list of 2 values (got 3)")),
    Case("yaml-nan", train("--config", cfg_yaml("lr: .nan\n")), ("field 'lr'", "must be a finite number")),
    Case("yaml-bool-for-int", train("--config", cfg_yaml("ep_size: true\n")), ("field 'ep_size'", "an integer")),
    Case("yaml-str-for-bool", train("--config", cfg_yaml("resume: maybe\n")), ("field 'resume'", "true or false")),
    Case("yaml-binary", train("--config", cfg_yaml(b"\x00\x01\xff\xfe\x89PNG")), ("not a UTF-8 text file",)),
    Case("yaml-not-mapping", train("--config", cfg_yaml("- 1\n- 2\n")), ("expected a mapping",)),
    Case("yaml-invalid", train("--config", cfg_yaml("a: [1\n")), ("not valid YAML",)),
    Case("yaml-unknown-field", train("--config", cfg_yaml("learning_rate: 1.0\n")), ("unknown field 'learning_rate'",)),
    Case("yaml-missing-file", train("--config", lambda w, d: str(d / "none.yaml")), ("no such file",)),
    Case("yaml-env-not-ours", train("--config", "env:HOME"), ("only UPCYCLE_DS_* environment variables",)),
    # ---------------------------------------------------------------- train: the run dir and --resume
    # (another world size, ep size, ZeRO stage or dtype is not bad input: the resume is elastic, tests/test_elastic.py)
    Case("resume-needed", train(out=lambda w, d: run_dir_with_checkpoint(w, d)),
         ("already holds a checkpoint", "--resume")),
    Case("resume-other-expert-count", train("--resume", out=lambda w, d: run_dir_with_checkpoint(
        w, d, config=lambda c: {**c, "num_local_experts": 8})), ("num_local_experts is 8", "4 now")),
    Case("resume-other-hidden-size", train("--resume", out=lambda w, d: run_dir_with_checkpoint(
        w, d, config=lambda c: {**c, "hidden_size": 128})), ("hidden_size is 128",)),
    Case("resume-other-seed", train("--resume", "--seed", "5", out=lambda w, d: run_dir_with_checkpoint(w, d)),
         ("--seed 0, this run has 5",)),
    Case("resume-latest-missing-tag", train("--resume", out=lambda w, d: run_dir_with_checkpoint(
        w, d, latest="global_step9")), ("names 'global_step9', which is missing or incomplete",)),
    Case("resume-latest-absolute", train("--resume", out=lambda w, d: run_dir_with_checkpoint(
        w, d, latest="/etc")), ("latest names tag", "absolute path")),
    # ---------------------------------------------------------------- sft / router-init (launchers of their own)
    Case("sft-ep-size", train("--ep-size", "2", model=lambda w, d: w["llama"], cmd="sft"),
         ("unrecognized arguments: --ep-size 2",)),  # an MoE-only flag: sft does not offer it
    Case("sft-save-every-0", train("--save-every-epochs", "0", model=lambda w, d: w["llama"], cmd="sft"),
         ("--save-every-epochs must be > 0",)),
    Case("sft-moe-model", train(cmd="sft"), ("sft trains a dense model",)),
    Case("sft-lr-nan", train("--lr", "nan", model=lambda w, d: w["llama"], cmd="sft"), ("--lr", "finite")),
    Case("sft-freeze-nothing", train("--freeze", "deepspeed_moe", model=lambda w, d: w["llama"], cmd="sft"),
         ("--freeze 'deepspeed_moe' matches no parameter",)),
    Case("router-alpha-2", train("--alpha", "2", cmd="router-init"), ("--alpha must be in [0, 1]",)),
    Case("router-alpha-nan", train("--alpha", "nan", cmd="router-init"), ("--alpha", "finite")),
    Case("router-no-labels", train(cmd="router-init"), ("field 'expert'",)),
    Case("router-hidden-no-prompts", lambda w, d: ["router-init", "--mode", "hidden", "--model", str(w["moe"]),
                                                   "--out", str(d / "out")], ("--mode hidden needs --prompts",)),
    Case("router-hidden-prompts-binary", lambda w, d: [
        "router-init", "--mode", "hidden", "--model", str(w["moe"]), "--out", str(d / "out"), "--prompts",
        str(_write(d / "p.yaml", b"\xff\xfe\x00"))], ("--prompts", "not a UTF-8 text file")),
    Case("router-hidden-prompts-count", lambda w, d: [
        "router-init", "--mode", "hidden", "--model", str(w["moe"]), "--out", str(d / "out"), "--prompts",
        str(yaml_file(d / "p.yaml", "experts:\n- positive_prompts: [hi]\n"))], ("1 expert entries", "4 experts")),
    # ---------------------------------------------------------------- seed-data, upit-assemble, plan, upit, demo
    Case("seed-fraction-0", lambda w, d: ["seed-data", "--experts", str(w["llama"]), "--data", str(w["data"]),
                                          "--out", str(d / "s"), "--fraction", "0"], ("--fraction must be in",)),
    Case("seed-batch-0", lambda w, d: ["seed-data", "--experts", str(w["llama"]), "--data", str(w["data"]),
                                       "--out", str(d / "s"), "--micro-batch-size", "0"], ("--micro-batch-size must be",)),
    Case("seed-out-is-data", lambda w, d: ["seed-data", "--experts", str(w["llama"]), "--data",
                                           str(_copy_file(w["data"], d / "t" / "t.jsonl")), "--out", str(d / "t"),
                                           "--overwrite"], ("contains the input",)),
    Case("seed-out-is-a-file-name", lambda w, d: ["seed-data", "--experts", str(w["llama"]), "--data", str(w["data"]),
                                                  "--out", str(d / "s.jsonl")], ("seed-data writes a directory",)),
    Case("seed-data-not-utf8", lambda w, d: ["seed-data", "--experts", str(w["llama"]), "--data",
                                             str(_write(d / "b.jsonl", b'{"prompt": "\xff"}\n')), "--out",
                                             str(d / "s")], ("b.jsonl: line 1 is not UTF-8",)),
    Case("seed-experts-missing", lambda w, d: ["seed-data", "--experts", str(d / "nope"), "--data", str(w["data"]),
                                               "--out", str(d / "s")], ("nope",)),
    Case("assemble-max-shard-0", lambda w, d: ["upit-assemble", "--checkpoints", str(w["llama"]), "--out",
                                               str(d / "out"), "--max-shard-gb", "0"], ("--max-shard-gb must be > 0",)),
    Case("assemble-dare-1", lambda w, d: ["upit-assemble", "--checkpoints", str(w["llama"]), "--out", str(d / "out"),
                                          "--dare-p", "1"], ("--dare-p must be in [0, 1)",)),
    Case("assemble-out-is-input", lambda w, d: ["upit-assemble", "--checkpoints", str(copy(w["llama"], d / "m")),
                                                "--out", str(d / "m"), "--overwrite"], ("is the input",)),
    Case("assemble-missing-checkpoint", lambda w, d: ["upit-assemble", "--checkpoints", str(d / "nope"), "--out",
                                                      str(d / "out")], ("no such directory",)),
    Case("plan-margin-1", lambda w, d: ["plan", "--model", str(w["moe"]), "--margin", "1"], ("--margin",)),
    Case("plan-gpu-nan", lambda w, d: ["plan", "--model", str(w["moe"]), "--gpu-memory-gb", "nan"], ("finite",)),
    Case("plan-ep-3", lambda w, d: ["plan", "--model", str(w["moe"]), "--ep-size", "3"], ("--ep-size",)),
    Case("plan-zero-3", lambda w, d: ["plan", "--model", str(w["moe"]), "--zero-stage", "3"], ("--zero-stage 3",)),
    Case("plan-offload-zero-0", lambda w, d: ["plan", "--model", str(w["moe"]), "--zero-stage", "0",
                                              "--offload-optimizer"],
         ("--offload-optimizer needs --zero-stage 1 or 2",)),
    Case("plan-host-memory-0", lambda w, d: ["plan", "--model", str(w["moe"]), "--host-memory-gb", "0"],
         ("--host-memory-gb must be > 0",)),
    Case("upit-section-not-mapping", lambda w, d: ["upit", "--model", str(w["llama"]), "--data", str(w["data"]),
                                                   "--out", str(d / "out"), "--sft", "[1, 2]"],
         ("--sft", "expected a mapping")),
    Case("demo-rows-0", lambda w, d: ["demo", "--out", str(d / "out"), "--rows", "0"], ("--rows must be >= 1",)),
    Case("demo-rows-negative", lambda w, d: ["demo", "--out", str(d / "out"), "--rows", "-3"], ("--rows",)),
    Case("demo-family", lambda w, d: ["demo", "--out", str(d / "out"), "--family", "gpt2"], ("invalid choice",)),
    Case("demo-out-exists", lambda w, d: ["demo", "--out", str(_mkdir(d / "out"))], ("exists",)),
    Case("demo-parent-missing", lambda w, d: ["demo", "--out", str(d / "a" / "b")], ("parent directory",)),
    Case("demo-read-only", lambda w, d: ["demo", "--out", str(_read_only(d) / "out")], ("cannot write",)),
    Case("eval-model-missing", lambda w, d: ["eval", "--model", str(d / "nope"), "--data", str(w["data"])],
         ("not an HF checkpoint dir",)),
    Case("eval-rows-unknown", lambda w, d: ["eval", "--model", str(w["llama"]), "--data",
                                            str(_write(d / "bad.jsonl", b'{"q": 1}\n'))], ("needs 'choices'",)),
    Case("eval-batch-0", lambda w, d: ["eval", "--model", str(w["llama"]), "--data", str(w["data"]),
                                       "--micro-batch-size", "0"], ("--micro-batch-size",)),
    Case("scripts-out-exists", lambda w, d: ["scripts", "--out", str(_mkdir(d / "out"))], ("exists",)),
    Case("scripts-parent-missing", lambda w, d: ["scripts", "--out", str(d / "a" / "b")], ("parent directory",)),
    Case("scripts-read-only", lambda w, d: ["scripts", "--out", str(_read_only(d) / "out")], ("cannot write",)),
    Case("cli-unknown-subcommand", lambda w, d: ["upcylce"], ("unknown subcommand 'upcylce'",)),
]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    (p / "keep").write_text("mine")
    return p


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def _read_only(d: Path) -> Path:
    """A directory nobody may create files in: chmod 555, or, as root (who ignores modes), sysfs."""
    if ROOT_USER:
        return Path("/sys")
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _drop_tensor(w, d: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    m = copy(w["llama"], d / "m")
    sd = load_file(str(m / "model.safetensors"))
    del sd[key]
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    return m


def _transpose_expert(ds: Path) -> None:
    f = ds / "global_step0" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    sd = torch.load(f, weights_only=True)
    k = next(k for k in sd if k.endswith("up_proj.weight"))
    sd[k] = sd[k].t().contiguous()
    torch.save(sd, f)


def _moe_with_transposed_expert(w, d: Path) -> Path:
    m = copy(w["moe"], d / "moe")
    header, data = read_st(m / "model.safetensors")
    transpose("model.layers.1.block_sparse_moe.experts.0.w3.weight")(header, data)
    write_st(m / "model.safetensors", header, data)
    return m


def _moe_without_tokenizer(w, d: Path) -> Path:
    m = copy(w["moe"], d / "moe")
    for f in m.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    return m


def snapshot(d: Path) -> dict:
    """Every path under d (symlinks not followed) with size and mtime: equal before and after = nothing was created,
    removed or changed."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns) if p.is_file() and not p.is_symlink() else None
    return out


def assert_one_line_error(rc: int, err: str, cmd: str, must=()) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = f"upcycle-ds {cmd}: error: " if cmd in _COMMANDS else "upcycle-ds: error: "
    assert lines[0].startswith(prefix), lines[0]
    for s in must:
        assert s in lines[0], (s, lines[0])
    return lines[0]


from upcycle_ds.cli import COMMANDS as _COMMANDS  # noqa: E402  (every subcommand)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, w, tmp_path, capsys):
    d = tmp_path / "case"
    d.mkdir()
    argv = case.build(w, d)
    before = snapshot(d)
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    assert_one_line_error(rc, cap.err, argv[0], case.must)
    assert cap.out == ""
    assert snapshot(d) == before  # nothing created (no OUT, temp or .old dirs), nothing changed
    if ROOT_USER and any("/sys" in a for a in argv):
        assert not any(p.name.startswith((".out", "out", "run")) for p in Path("/sys").iterdir())


_PREFIX_COMMAND = {"up": "upcycle", "st": "upcycle", "idx": "upcycle", "flag": "upcycle", "out": "upcycle",
                   "conv": "convert", "train": "train", "yaml": "train", "resume": "train", "sft": "sft",
                   "router": "router-init", "seed": "seed-data", "assemble": "upit-assemble", "plan": "plan",
                   "upit": "upit", "demo": "demo", "scripts": "scripts", "eval": "eval", "cli": None}


def test_at_least_100_cases_over_every_subcommand():
    from upcycle_ds.cli import COMMANDS

    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    covered = {_PREFIX_COMMAND[c.id.split("-")[0]] for c in CASES}
    assert covered - {None} == set(COMMANDS)


# ------------------------------------------------------------------------------- the console script, real processes
CONSOLE_CASES = ["flag-noise-nan", "st-offsets-negative", "yaml-freeze-mapping", "demo-rows-0"]


@pytest.mark.parametrize("case_id", CONSOLE_CASES)
def test_console_script_gives_the_same_line(case_id, w, tmp_path, capsys):
    """The installed `upcycle-ds` prints exactly the line `main()` printed in this process, with exit code 2."""
    case = next(c for c in CASES if c.id == case_id)
    d = tmp_path / "case"
    d.mkdir()
    argv = case.build(w, d)
    rc = main(argv)
    line = assert_one_line_error(rc, capsys.readouterr().err, argv[0], case.must)
    r = subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == line and r.stdout == ""


def test_disk_full_while_writing_leaves_nothing(w, tmp_path):
    """A real write failure mid-stream: the child's file size limit (RLIMIT_FSIZE) is below the output size, so a
    write fails with EFBIG the way a full disk fails with ENOSPC. One line, exit 2, no temp dir left."""
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run(cli("upcycle", "--model", w["llama"], "--out", out, "--num-experts", 8), env=cli_env(),
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"upcycle-ds upcycle: error: cannot write {out}: File too large"), r.stderr
    assert "Traceback" not in r.stderr
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_upcycle_removes_the_temp_dir(tmp_path):
    """SIGTERM (what Slurm sends first) while the experts are being written: the temp dir is removed, OUT never
    appears, exit code 143 with one line."""
    dense = make_dense("llama", tmp_path / "dense", hidden_size=256, intermediate_size=1024)
    out_parent = tmp_path / "o"
    out_parent.mkdir()
    proc = subprocess.Popen(cli("upcycle", "--model", dense, "--out", out_parent / "out", "--num-experts", 32,
                                "--noise-std", 0.01, "--max-shard-gb", 0.01), env=cli_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 240
    while not any(p.name.startswith(".out.tmp-") and any(p.iterdir()) for p in out_parent.iterdir()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "upcycle-ds upcycle: terminated (SIGTERM)"
    assert "Traceback" not in err
    assert list(out_parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------- in process
def test_overwrite_replaces_a_file_and_leaves_no_old_copy(w, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file where OUT goes")
    assert main(["upcycle", "--model", str(w["qwen2"]), "--out", str(out), "--overwrite", "--num-experts", "2"]) == 0
    assert out.is_dir() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-PID, no .out.tmp-*


def test_failed_overwrite_keeps_the_old_output(w, tmp_path, capsys):
    out = _mkdir(tmp_path / "out")
    rc = main(["upcycle", "--model", str(w["qwen2"]), "--out", str(out), "--overwrite", "--top-k", "9"])
    assert_one_line_error(rc, capsys.readouterr().err, "upcycle", ("--top-k",))
    assert (out / "keep").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError):
        with atomic_output_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise UserError("boom")
    assert list(tmp_path.iterdir()) == []


def test_hub_cache_snapshot_symlinks_are_allowed(w, tmp_path, capsys):
    """A model from the HF hub cache (models--ORG--NAME/snapshots/REV/* are symlinks into ../../blobs) is read; a
    symlink that leaves the repo folder is not (see the idx-shard-symlink-outside case)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in w["llama"].iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert main(["upcycle", "--model", str(snap), "--out", str(tmp_path / "out"), "--num-experts", "2"]) == 0


@pytest.mark.parametrize("name,ok", [("model-00001.safetensors", True), ("sub/x.pt", True), ("global_step3", True),
                                     ("", False), (".", False), ("/etc/passwd", False), ("../x", False),
                                     ("a/../../x", False), ("a\x00b", False), ("~root/x", False), (3, False),
                                     ("link", False), ("inner_link", True)])
def test_child_keeps_names_inside_their_dir(tmp_path, name, ok):
    from upcycle_ds.io.paths import child

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "link").symlink_to(tmp_path)
    (d / "inner_link").symlink_to(d / "sub")
    if ok:
        assert child(d, name, "test") == d / name
    else:
        with pytest.raises(UserError, match="^test: "):
            child(d, name, "test")


def test_expected_shapes_are_transformers_shapes():
    """Family.expected_shapes (which every reader and writer checks) against transformers' own model classes built on
    the meta device, for every family, dense and MoE, with the attention variants (biases, head_dim, q/k norms)."""
    import warnings

    import transformers

    from upcycle_ds.families import family_for

    configs = []
    for fam in ("llama", "mistral", "qwen2", "qwen3"):
        for extra in ({}, {"attention_bias": True}, {"head_dim": 8}, {"tie_word_embeddings": True}):
            configs.append(json.loads(dense_config(fam, **extra).to_json_string()))
    no_head_dim = json.loads(dense_config("qwen3").to_json_string())
    no_head_dim.pop("head_dim")
    configs.append(no_head_dim)  # Qwen3's default head_dim is 128, not hidden / heads
    for mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
        for extra in ({}, {"attention_bias": True}, {"qkv_bias": False}, {"head_dim": 8}, {"mlp_only_layers": [1]}):
            configs.append(json.loads(moe_config(mt, **extra).to_json_string()))
    for cfg in configs:
        fam, is_moe = family_for(cfg)
        kw = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(cfg["model_type"],
                                                                                                    **kw))
        ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        want = fam.expected_shapes(cfg)
        if is_moe:  # transformers holds experts fused and the router under `mlp.gate`; compare those as such
            for layer in fam.moe_layers(cfg):
                assert ref.pop(f"model.layers.{layer}.mlp.gate.weight") == want.pop(fam.router_key(layer))
                fused = fam.fused_shapes(cfg, layer)
                for k, shape in fused.items():
                    assert ref.pop(k) == shape, (cfg["model_type"], k)
                for e in range(fam.num_experts(cfg)):
                    for p in ("gate", "up", "down"):
                        want.pop(fam.expert_key(layer, e, p))
        assert ref == want, (cfg["model_type"], {k: (ref.get(k), want.get(k)) for k in set(ref) ^ set(want)})


def test_help_explains_every_field(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    squashed = "".join(text.split())  # argparse re-wraps (and may break at hyphens): compare without whitespace
    docs = field_docs(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert docs.get(f.name), f"TrainArgs.{f.name} has no docstring"
        assert "".join(docs[f.name].split()) in squashed, f.name
    assert "--config FILE.yaml" in text and "--no-resume" in text


def test_help_of_every_subcommand_imports_no_heavy_library():
    """`--help` stays instant (< 1 s) because no subcommand's Args pulls torch, transformers or deepspeed in: checked
    in a fresh interpreter per subcommand (this test process has torch loaded already)."""
    from upcycle_ds.cli import COMMANDS

    probe = ("import sys, contextlib, io\nfrom upcycle_ds.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main([sys.argv[1], '--help'])\n"
             "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets', 'wandb') if m in sys.modules]\n"
             "print(rc, *heavy)")
    for name in COMMANDS:
        out = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True, timeout=60)
        assert out.stdout.split() == ["0"], (name, out.stdout, out.stderr[-2000:])


def test_config_yaml_supplies_values_and_flags_override(tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", "out": "o", "lr": "3e-4", "ep_size": 2,
                                   "freeze": ["embed_tokens"], "export_hf": False, "adam_betas": [0.8, 0.9]}))
    args = parse_into(TrainArgs, ["--config", str(cfg), "--ep-size", "4", "--export-hf"], prog="t", description="",
                      yaml_config=True)
    assert (args.model, args.lr, args.ep_size, args.freeze, args.export_hf) == ("m", 3e-4, 4, ["embed_tokens"], True)
    assert list(args.adam_betas) == [0.8, 0.9]
    monkeypatch.setenv("UPCYCLE_DS_ARGS", cfg.read_text())  # how the launcher hands settings to its ranks
    args = parse_into(TrainArgs, ["--config", "env:UPCYCLE_DS_ARGS"], prog="t", description="", yaml_config=True)
    assert (args.model, args.lr, args.ep_size) == ("m", 3e-4, 2)


# ------------------------------------------------------------------------------------------------------ run lock
def test_run_lock_excludes_a_second_holder_and_frees_on_death(tmp_path):
    """Two processes, one run dir: the second gets a UserError naming the first; after the first dies (kill -9,
    no clean-up) the lock is free again; a child given the holder's token sees the lock as its own."""
    from upcycle_ds.launch.run_lock import ENV, RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from upcycle_ds.launch.run_lock import RunLock\n"
        f"l = RunLock({str(out)!r}).acquire(); print(l.token, flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        token = holder.stdout.readline().strip()
        assert token
        with pytest.raises(UserError, match=rf"--out {out} is in use by another job \(host .*, pid {holder.pid}, "):
            RunLock(out).acquire()
        os.environ[ENV] = token
        try:
            lock = RunLock(out).acquire()
            assert lock.inherited
            lock.release()
        finally:
            del os.environ[ENV]
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out) as lock:  # the dead holder's lock is gone with it
        assert not lock.inherited and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert (out / ".lock").read_text() == ""


def _train_cmd(w, out: Path, seed: int) -> list[str]:
    return [*cli("train"), "--nproc", "2", "--model", str(w["moe"]), "--data", str(w["data"]),
            "--out", str(out), "--ep-size", "2", "--zero-stage", "1", "--dtype", "fp32", "--max-steps", "100000",
            "--micro-batch-size", "1", "--max-length", "64", "--seed", str(seed), "--wandb-mode", "disabled",
            "--no-export-hf", "--eval-fraction", "0"]


def _ranks(root) -> list:
    import psutil

    out = []
    for p in root.children(recursive=True):
        try:
            if "upcycle_ds.cli" in p.cmdline() and "RANK" in p.environ():
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


_TREE = """
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(600 if sys.argv[1] == "stay" else 0)
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGHUP", "leader-exits"])
def test_run_job_leaves_no_process_behind(tmp_path, how):
    """`launch.local.run_job` with a stand-in launcher that starts two children (as `deepspeed` starts ranks):
    SIGINT / SIGHUP to the launching process end all of them and raise Terminated; a launcher that exits
    and leaves its children running does not leave them running either. (SIGTERM with real DeepSpeed ranks: the
    slow test below.)"""
    import psutil

    runner = ("import os, sys; from upcycle_ds.launch.local import run_job; from upcycle_ds.errors import Terminated\n"
              f"try: sys.exit(run_job([sys.executable, '-c', {_TREE!r}, {'go' if how == 'leader-exits' else 'stay'!r}], "
              "dict(os.environ), grace_s=5))\n"
              "except Terminated as e: print('terminated', e.signum, file=sys.stderr); sys.exit(128 + e.signum)")
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = [psutil.Process(int(p)) for p in proc.stdout.readline().split()]
    assert len(kids) == 2
    if how != "leader-exits":
        proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert psutil.wait_procs(kids, timeout=10)[1] == []
    if how == "leader-exits":
        assert rc == 0 and err == "", err
    else:
        assert rc == 128 + getattr(signal, how), err
        assert err.strip().splitlines() == [f"terminated {getattr(signal, how)}"]


@pytest.mark.slow
def test_second_job_in_one_out_is_refused_and_sigterm_ends_every_rank(w, tmp_path):
    """A real 2-rank DeepSpeed job holds OUT: a second `train` into the same OUT gets exit 2 and one line, and the
    first job's recorded settings are untouched. Then SIGTERM (what Slurm sends) to the first `upcycle-ds train`:
    the launcher and both ranks end (none orphaned), exit code 143, and OUT's lock is free again."""
    import psutil

    from upcycle_ds.launch.run_lock import RunLock

    sig = signal.SIGTERM
    out = tmp_path / "run"
    env = cli_env()
    first = subprocess.Popen(_train_cmd(w, out, seed=1), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():  # both ranks up and training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first job did not start training in time"
            time.sleep(0.2)
        record = (out / "train_args.yaml").read_text()
        ranks = _ranks(psutil.Process(first.pid))
        assert len(ranks) == 2, ranks

        second = subprocess.run(_train_cmd(w, out, seed=2), env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"upcycle-ds train: error: --out {out} is in use by another job (host ")
        assert f"pid {first.pid}," in lines[0]
        assert (out / "train_args.yaml").read_text() == record  # seed 1 stays the record

        t0 = time.monotonic()
        first.send_signal(sig)
        rc = first.wait(timeout=120)
        gone = psutil.wait_procs(ranks, timeout=30)[1]
        print(f"{signal.Signals(sig).name}: job ended in {time.monotonic() - t0:.1f} s")
        assert rc == 128 + sig, first.stderr.read()[-3000:]
        assert gone == [], f"orphaned ranks: {gone}"
        assert first.stderr.read().strip().splitlines()[-1] == "upcycle-ds train: terminated (SIGTERM)"
        with RunLock(out):
            pass
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
