"""`upcycle-ds upcycle` end to end: tiny random dense HF model -> CLI -> HF MoE checkpoint loaded by transformers'
own classes (no remote code) -> same logits as the dense model, hub per-expert key layout on disk."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny import input_ids, logits, make_dense

from upcycle_ds.cli import main

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TOL = 1e-5  # fp32
E = 4
N_LAYERS = 4

# Written out here (not taken from upcycle_ds.families) so the test checks the hub layout independently.
MOE_TYPE = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
MOE_ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MIXTRAL_W = {"gate": "w1", "up": "w3", "down": "w2"}


def hub_moe_keys(family: str, layer: int) -> set[str]:
    """The per-expert on-disk keys the hub uses for one MoE layer with E experts."""
    pre = f"model.layers.{layer}."
    if MOE_TYPE[family] == "mixtral":
        keys = {pre + "block_sparse_moe.gate.weight"}
        keys |= {pre + f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(E) for w in MIXTRAL_W.values()}
        return keys
    keys = {pre + "mlp.gate.weight"}
    keys |= {pre + f"mlp.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up", "down")}
    if family == "qwen2":
        keys |= {pre + f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {pre + "mlp.shared_expert_gate.weight"}
    return keys


def dense_mlp_keys(layer: int) -> set[str]:
    return {f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def st_keys(path: Path) -> set[str]:
    """All tensor names in a checkpoint dir (single file or shards)."""
    keys: set[str] = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    return keys


def st_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def upcycle(dense: Path, out: Path, *flags: str) -> Path:
    rc = main(["upcycle", "--model", str(dense), "--out", str(out), "--num-experts", str(E), *flags])
    assert rc == 0
    return out


def load(path: Path):
    """AutoModelForCausalLM with no remote code; fails on any missing / unexpected / mismatched weight."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True, trust_remote_code=False)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: make_dense(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def ids():
    return input_ids(seed=1, batch=2, seq=16)


def check_experts_are_copies(moe_model, dense_sd: dict[str, torch.Tensor], moe_layers) -> None:
    """Every expert of every MoE layer, as transformers fused it on load, equals the dense MLP exactly."""
    for l in moe_layers:
        mlp = moe_model.model.layers[l].mlp
        g, u, d = (dense_sd[f"model.layers.{l}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        assert mlp.experts.gate_up_proj.shape[0] == E
        for e in range(E):
            assert torch.equal(mlp.experts.gate_up_proj[e], torch.cat([g, u], 0))
            assert torch.equal(mlp.experts.down_proj[e], d)
        assert mlp.gate.weight.shape == (E, g.shape[1])


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_logits_equal_dense(family, k, dense_dirs, ids, tmp_path):
    dense_dir = dense_dirs[family]
    out = upcycle(dense_dir, tmp_path / "moe", "--top-k", str(k))

    cfg = json.loads((out / "config.json").read_text())
    moe_type = MOE_TYPE[family]
    assert cfg["model_type"] == moe_type and cfg["architectures"] == [MOE_ARCH[moe_type]]
    assert cfg["num_experts_per_tok"] == k
    assert cfg["num_local_experts" if moe_type == "mixtral" else "num_experts"] == E
    assert "auto_map" not in cfg
    if moe_type != "mixtral":
        assert cfg["norm_topk_prob"] is True and not cfg["mlp_only_layers"]

    # hub per-expert layout on disk: dense MLP keys replaced by router + per-expert keys, all else unchanged
    dense_keys = st_keys(dense_dir)
    want = set(dense_keys)
    for l in range(N_LAYERS):
        want = (want - dense_mlp_keys(l)) | hub_moe_keys(family, l)
    assert st_keys(out) == want

    dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe_model = load(out)
    assert type(moe_model).__name__ == MOE_ARCH[moe_type]
    dense_sd = dense_model.state_dict()
    check_experts_are_copies(moe_model, dense_sd, range(N_LAYERS))
    moe_sd = moe_model.state_dict()
    for key, t in dense_sd.items():  # attention, norms, embeddings, lm_head: exact copies
        if ".mlp." not in key:
            assert torch.equal(moe_sd[key], t), key

    ref, got = logits(dense_model, ids), logits(moe_model, ids)
    diff = (ref - got).abs().max().item()
    print(f"{family} -> {moe_type} E={E} k={k}: max abs logit diff {diff:.2e}")
    assert diff <= TOL
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("layers,moe_layers", [("every:2", [1, 3]), ("0,3", [0, 3])])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_partial_layers_qwen(family, layers, moe_layers, dense_dirs, ids, tmp_path):
    dense_dir = dense_dirs[family]
    out = upcycle(dense_dir, tmp_path / "moe", "--top-k", "2", "--layers", layers)
    cfg = json.loads((out / "config.json").read_text())
    dense_layers = [l for l in range(N_LAYERS) if l not in moe_layers]
    assert cfg["mlp_only_layers"] == dense_layers
    assert cfg["decoder_sparse_step"] == 1

    want = set(st_keys(dense_dir))
    for l in moe_layers:
        want = (want - dense_mlp_keys(l)) | hub_moe_keys(family, l)
    assert st_keys(out) == want

    dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe_model = load(out)
    dense_sd = dense_model.state_dict()
    for l in dense_layers:  # really dense in the loaded model: a plain MLP holding the dense weights
        mlp = moe_model.model.layers[l].mlp
        assert not hasattr(mlp, "experts") and not hasattr(mlp, "gate"), type(mlp)
        for p in ("gate", "up", "down"):
            assert torch.equal(getattr(mlp, f"{p}_proj").weight, dense_sd[f"model.layers.{l}.mlp.{p}_proj.weight"])
    for l in moe_layers:
        assert "SparseMoeBlock" in type(moe_model.model.layers[l].mlp).__name__
    check_experts_are_copies(moe_model, dense_sd, moe_layers)

    diff = (logits(dense_model, ids) - logits(moe_model, ids)).abs().max().item()
    print(f"{family} --layers {layers}: max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_sharded_input_and_output(dense_dirs, ids, tmp_path):
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense_dirs["llama"], dtype=torch.float32)
    sharded_in = tmp_path / "dense_sharded"
    dense_model.save_pretrained(sharded_in, max_shard_size="60KB")
    in_index = json.loads((sharded_in / "model.safetensors.index.json").read_text())
    assert len(set(in_index["weight_map"].values())) >= 3 and not (sharded_in / "model.safetensors").exists()

    max_gb = 200e3 / 1024**3  # ~200 KB shards; the output holds ~1.7 MB of weights
    out = upcycle(sharded_in, tmp_path / "moe", "--top-k", "2", "--max-shard-gb", str(max_gb))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 4 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for name in shards:  # every tensor in exactly the shard the index names; shards within the size limit
        with safe_open(str(out / name), framework="pt") as h:
            keys = list(h.keys())
            nbytes = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in keys)
        assert all(index["weight_map"][k] == name for k in keys)
        assert nbytes <= max_gb * 1024**3 or len(keys) == 1
        total += nbytes
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == len(st_keys(out))

    diff = (logits(dense_model, ids) - logits(load(out), ids)).abs().max().item()
    assert diff <= TOL


def test_bf16_dense_gives_bitwise_bf16_experts(tmp_path):
    dense_dir = make_dense("qwen3", tmp_path / "dense", dtype=torch.bfloat16)
    out = upcycle(dense_dir, tmp_path / "moe")
    dense, moe = st_tensors(dense_dir), st_tensors(out)
    assert {t.dtype for t in moe.values()} == {torch.bfloat16}
    for l in range(N_LAYERS):
        for e in range(E):
            for p in ("gate", "up", "down"):
                assert torch.equal(moe[f"model.layers.{l}.mlp.experts.{e}.{p}_proj.weight"],
                                   dense[f"model.layers.{l}.mlp.{p}_proj.weight"])


def make_tokenizer(path: Path) -> None:
    """A small real fast tokenizer with a chat template, saved next to the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("hello world how are you".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def test_tokenizer_and_generation_files_copied(dense_dirs, tmp_path):
    dense_dir = tmp_path / "dense"
    transformers.AutoModelForCausalLM.from_pretrained(dense_dirs["mistral"]).save_pretrained(dense_dir)
    make_tokenizer(dense_dir)
    side = {p.name for p in dense_dir.iterdir()} - {"config.json", "model.safetensors"}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= side
    out = upcycle(dense_dir, tmp_path / "moe")
    for name in side:
        assert (out / name).read_bytes() == (dense_dir / name).read_bytes(), name
    tok_in, tok_out = transformers.AutoTokenizer.from_pretrained(dense_dir), transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hello world how are you"}]
    assert tok_out("hello you").input_ids == tok_in("hello you").input_ids
    assert tok_out.apply_chat_template(msgs, tokenize=False) == tok_in.apply_chat_template(msgs, tokenize=False)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.to_dict() == transformers.GenerationConfig.from_pretrained(dense_dir).to_dict()


def test_console_script(dense_dirs, ids, tmp_path):
    from cli_proc import CONSOLE_SCRIPT as exe

    out = tmp_path / "moe"
    r = subprocess.run([str(exe), "upcycle", "--model", str(dense_dirs["qwen2"]), "--out", str(out),
                        "--num-experts", "3", "--top-k", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote qwen2_moe checkpoint with 3 experts" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temp dir left next to it
    diff = (logits(dense_dirs["qwen2"], ids) - logits(load(out), ids)).abs().max().item()
    assert diff <= TOL

    r = subprocess.run([str(exe), "upcycle", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--reinit-ratio" in r.stdout and "--num-experts" in r.stdout


def test_checkpoint_reader_matches_safetensors(tmp_path):
    """io.hf.HFCheckpoint (plain file reads, no mmap) returns what safetensors' own loader does, for every dtype."""
    from safetensors.torch import load_file, save_file

    from upcycle_ds.io.hf import HFCheckpoint

    g = torch.Generator().manual_seed(0)
    sd = {"bf16": torch.randn(7, 3, generator=g).bfloat16(), "empty": torch.zeros(0, 5, dtype=torch.bfloat16),
          "f16": torch.randn(4, generator=g).half(), "f64": torch.tensor(3.5, dtype=torch.float64),
          "fp8": torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn), "bool": torch.tensor([True, False, True]),
          "i64": torch.arange(5), "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    ref, ck = load_file(str(tmp_path / "model.safetensors")), HFCheckpoint(tmp_path, check_shapes=False)
    assert sorted(ck.keys()) == sorted(ref)
    for k, t in ref.items():
        got = ck.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and ck.shape(k) == tuple(t.shape), k
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k  # bitwise
    ck.close()
