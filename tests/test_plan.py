"""`upcycle-ds plan`: parameter counts against transformers models, model-state bytes against DeepSpeed's own estimator
and against the files and buffers of a real 2-rank DeepSpeed-MoE run (ZeRO 0/1/2, ep 1/2, bf16)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from upcycle_ds.io.ds import load_pt
import transformers

import tiny
from upcycle_ds.cli import main
from upcycle_ds.families import FAMILIES, MoESpec
from upcycle_ds.plan import (Setup, count_params, make_plan, model_states, shape_from_config, upcycled_shape,
                             valid_ep_sizes)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llama3-8b-shape" / "config.json"


def as_dict(hf_config) -> dict:
    return json.loads(hf_config.to_json_string())


def hf_numel(hf_config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_dense_count_equals_transformers(family, tied):
    extra = {"attention_bias": True} if family in ("llama", "qwen3") else {}
    cfg = tiny.dense_config(family, tie_word_embeddings=tied, **extra)
    c = count_params(shape_from_config(as_dict(cfg)))
    assert c.expert == 0
    assert c.total == hf_numel(cfg)


def test_dense_count_llama_mlp_bias_and_head_dim():
    cfg = tiny.dense_config("llama", mlp_bias=True, head_dim=32)  # head_dim != hidden / heads
    assert count_params(shape_from_config(as_dict(cfg))).total == hf_numel(cfg)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_count_equals_transformers(model_type):
    extra = {} if model_type == "mixtral" else {"mlp_only_layers": [0], "decoder_sparse_step": 1}
    cfg = tiny.moe_config(model_type, num_experts=6, top_k=2, **extra)
    c = count_params(shape_from_config(as_dict(cfg)))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert (c.non_expert, c.expert) == (sum(p.numel() for p in model.parameters()) - expert, expert)


@pytest.mark.parametrize("family,layers", [("llama", "all"), ("mistral", "all"), ("qwen2", "1,3"),
                                           ("qwen3", "every:2"), ("qwen2", "all")])
def test_upcycled_count_equals_transformers_moe(family, layers):
    """Dense config -> our upcycled shape == the HF MoE config `upcycle` writes, built by transformers."""
    dense = as_dict(tiny.dense_config(family, tie_word_embeddings=(family == "qwen3")))
    shape = upcycled_shape(dense, num_experts=4, top_k=2, layers=layers)
    fam = FAMILIES[family]
    moe_cfg = fam.moe_config(dense, MoESpec(num_experts=4, top_k=2, moe_layers=shape.moe_layers))
    hf = transformers.AutoConfig.for_model(moe_cfg.pop("model_type"), **moe_cfg)
    assert count_params(shape).total == hf_numel(hf)


def test_llama3_8b_shape_count():
    """The worked example: the published Llama-3-8B size (8,030,261,248) and its 8-expert upcycle."""
    cfg = json.loads(EXAMPLE.read_text())
    assert count_params(shape_from_config(cfg)).total == 8_030_261_248
    c = count_params(upcycled_shape(cfg, num_experts=8, top_k=2))
    assert c.expert == 32 * 8 * 3 * 4096 * 14336
    assert c.non_expert == 8_030_261_248 - 32 * 3 * 4096 * 14336 + 32 * 8 * 4096


# --------------------------------------------------------------------------------- model states formulas
def test_zero2_matches_deepspeed_estimator():
    """No experts, ZeRO-2, bf16: DeepSpeed's estimate_zero2_model_states_mem_needs (2P + 18P/W on the GPU) counts
    the same bytes as our params + grads + optimizer + fp32 step grads."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = 1_234_567_890
    for nodes, gpus in ((1, 1), (1, 8), (4, 8)):
        setup = Setup(nodes=nodes, gpus_per_node=gpus, zero_stage=2, dtype="bf16")
        rows = model_states(P, 0, setup)
        ours = sum(rows[k][0] for k in ("params", "grads", "optim", "step_grads"))
        _, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=False)
        assert abs(ours - gpu) <= 1, (nodes, gpus, ours, gpu)


def test_expert_states_partition_over_expert_dp():
    n, x = 1000 * 16, 8000 * 16
    s = Setup(nodes=2, gpus_per_node=8, ep_size=4, zero_stage=1, dtype="bf16")
    rows = model_states(n, x, s)
    assert rows["params"] == (2 * n, 2 * x / 4)
    assert rows["optim"] == (12 * n / 16, 12 * (x / 4) / 4)  # experts over world/ep = 4 ranks
    assert rows["grads"] == (2 * n + 2 * n / 16, 2 * x / 4 + 2 * (x / 4) / 4)
    z0 = model_states(n, x, replace(s, zero_stage=0, dtype="fp32"))
    assert z0["optim"] == (8 * n, 8 * x / 4) and z0["step_grads"] == (0.0, 0.0)


def test_valid_ep_sizes():
    assert valid_ep_sizes(8, 16) == [1, 2, 4, 8]
    assert valid_ep_sizes(6, 8) == [1, 2]
    assert valid_ep_sizes(64, 4) == [1, 2, 4]


def test_checkpointing_shrinks_activations_and_more_ranks_shrink_states():
    shape = upcycled_shape(json.loads(EXAMPLE.read_text()), num_experts=8, top_k=2)
    base = Setup(nodes=2, gpus_per_node=8, ep_size=2, zero_stage=2, activation_checkpointing=False)
    no_ac, ac = make_plan(shape, base), make_plan(shape, replace(base, activation_checkpointing=True))
    assert ac.activations < no_ac.activations / 5
    assert make_plan(shape, replace(base, ep_size=8)).persistent < no_ac.persistent


# ------------------------------------------------------------------------------------------------------ CLI
def run_cli(capsys, *argv):
    rc = main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_worked_example(capsys):
    rc, out, _ = run_cli(capsys, "--model", EXAMPLE, "--num-experts", 8, "--top-k", 2, "--ep-size", 1,
                         "--zero-stage", 2, "--nodes", 2, "--gpus-per-node", 8, "--seq-len", 4096, "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["params"]["total"] == 47_491_321_856
    assert not res["fits"]
    assert res["suggestion"] == {"ep_size": 8, "zero_stage": 2, "activation_checkpointing": True,
                                 "offload_optimizer": False}
    rc, text, _ = run_cli(capsys, "--model", EXAMPLE.parent, "--num-experts", 8, "--top-k", 2, "--ep-size", 8,
                          "--nodes", 2, "--gpus-per-node", 8, "--zero-stage", 2, "--micro-batch-size", 1,
                          "--max-length", 4096, "--activation-checkpointing")
    assert rc == 0 and "FITS" in text
    assert text.endswith(  # one command, at the end
        f"\ncommand (the layout asked for fits: 65.65 GiB per GPU):\n  upcycle-ds train --nproc 8 --model "
        f"{EXAMPLE.parent} --data DATA --out OUT --ep-size 8 --zero-stage 2 --dtype bf16 --micro-batch-size 1 "
        "--max-length 4096 --activation-checkpointing --num-experts 8 --top-k 2 --layers all   (x 2 nodes: see "
        "slurm/train.sbatch)\n")
    assert text.count("upcycle-ds train") == 1 and "suggestion" not in text
    for row in ("parameters", "gradients", "optimizer states", "activations: layers", "peak per rank"):
        assert row in text


def test_cli_prints_one_command_the_smallest_fit_or_none(capsys):
    """The asked layout does not fit: the one command runs the smallest that fits (the JSON says the same); nothing
    fits: no command."""
    flags = ["--model", EXAMPLE.parent, "--num-experts", 8, "--top-k", 2, "--ep-size", 1, "--zero-stage", 2,
             "--micro-batch-size", 1, "--max-length", 4096, "--activation-checkpointing"]
    rc, text, _ = run_cli(capsys, *flags)
    assert rc == 0 and text.count("upcycle-ds train") == 1 and "suggestion" not in text
    why, command = text.rstrip("\n").split("\n")[-2:]
    assert why.startswith("command (the layout asked for does not fit; this is the smallest ep_size, then ZeRO "
                          "stage, that fits: 55.75 GiB per GPU, 803.96 GiB host memory per node")
    assert command.startswith("  upcycle-ds train --nproc 8 ") and "--ep-size 2 --zero-stage 2" in command
    assert command.endswith("--activation-checkpointing --offload-optimizer --num-experts 8 --top-k 2 --layers all")
    rc, out, _ = run_cli(capsys, *flags, "--json")
    assert json.loads(out)["train_command"] == command.strip()
    rc, text, _ = run_cli(capsys, *flags, "--gpu-memory-gb", 8, "--host-memory-gb", 16)
    assert rc == 0 and "upcycle-ds train" not in text
    assert text.endswith("\nno command: nothing fits, even with the optimizer offloaded; lower --micro-batch-size / "
                         "--max-length, or add GPUs\n")
    rc, out, _ = run_cli(capsys, *flags, "--gpu-memory-gb", 8, "--host-memory-gb", 16, "--json")
    assert json.loads(out)["train_command"] is None


def test_cli_moe_config_uses_its_own_experts(tmp_path, capsys):
    cfg = tiny.moe_config("qwen3_moe", num_experts=4, top_k=2)
    cfg.save_pretrained(tmp_path)
    rc, out, _ = run_cli(capsys, "--model", tmp_path / "config.json", "--ep-size", 2, "--gpus-per-node", 2,
                         "--seq-len", 64, "--json")
    assert rc == 0
    assert json.loads(out)["params"]["total"] == hf_numel(cfg)


@pytest.mark.parametrize("argv,match", [
    (["--num-experts", 8, "--top-k", 2, "--ep-size", 3], "--ep-size 3 must divide"),
    (["--num-experts", 8, "--top-k", 2, "--zero-stage", 3], "not supported with ZeRO stage 3"),
    (["--top-k", 2], "needs --num-experts and --top-k"),
    (["--num-experts", 8, "--top-k", 9], "--top-k must be between 1 and"),
    (["--num-experts", 8, "--top-k", 2, "--layers", "40"], "out of range"),
    (["--num-experts", 8, "--top-k", 2, "--margin", 1.5], "--margin must be in"),
])
def test_cli_errors(capsys, argv, match):
    rc, _, err = run_cli(capsys, "--model", EXAMPLE, "--nodes", 2, *argv)
    assert rc == 2
    assert match in err and "Traceback" not in err


def test_cli_missing_config(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model", tmp_path, "--num-experts", 8, "--top-k", 2)
    assert rc == 2 and "no such config.json" in err


# -------------------------------------------------------------- a real DeepSpeed-MoE checkpoint on 2 ranks
CKPT_DENSE = dict(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
CKPT_MOE_LAYERS = (1, 3)
CKPT_E, CKPT_K, CKPT_WORLD = 4, 2, 2
CKPT_RUNS = [(ep, stage) for ep in (1, 2) for stage in (0, 1, 2)]


class _SwiGLU(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = torch.nn.Linear(h, i, bias=False)
        self.up_proj = torch.nn.Linear(h, i, bias=False)
        self.down_proj = torch.nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _MoEBlock(torch.nn.Module):
    """A native `deepspeed.moe.layer.MoE` standing where the HF MLP was (aux loss dropped: sizes are all we check)."""

    def __init__(self, h, i, ep):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(h, _SwiGLU(h, i), num_experts=CKPT_E, ep_size=ep, k=CKPT_K, drop_tokens=False)

    def forward(self, x):
        return self.moe(x)[0]


def _ckpt_worker(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(CKPT_WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import importlib

    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # skip a 60-80 s JIT build used only by inference all-reduce. Not `import deepspeed.comm.torch as m`: that binds
    # the attribute `deepspeed.comm.torch`, which is the real torch module (re-exported by deepspeed.comm).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    report = {}
    for ep, stage in CKPT_RUNS:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CKPT_DENSE))
        for layer in CKPT_MOE_LAYERS:
            model.model.layers[layer].mlp = _MoEBlock(CKPT_DENSE["hidden_size"], CKPT_DENSE["intermediate_size"], ep)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters()], "name": "params"})
        opt = torch.optim.AdamW(groups, lr=1e-3)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": 100_000},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        ids = tiny.input_ids(seed=rank, batch=2, seq=16, vocab=CKPT_DENSE["vocab_size"])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
        # ZeRO 1/2 (DeepSpeed 0.19): after backward only this rank's reduced partition is kept, in averaged_gradients
        grads += _tensor_bytes(getattr(engine.optimizer, "averaged_gradients", None))
        engine.step()
        params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        engine.save_checkpoint(str(Path(out) / f"ep{ep}_z{stage}"), tag="t")
        report[f"ep{ep}_z{stage}"] = {"param_bytes": params, "grad_bytes": grads}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory):
    import torch.multiprocessing as mp

    from upcycle_ds.launch.distributed import free_port

    out = tmp_path_factory.mktemp("ds_ckpt")
    mp.start_processes(_ckpt_worker, args=(str(out), free_port()), nprocs=CKPT_WORLD, start_method="spawn")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ep,stage", CKPT_RUNS)
def test_plan_matches_deepspeed_checkpoint(ds_checkpoints, ep, stage):
    dense = as_dict(transformers.LlamaConfig(**CKPT_DENSE))
    shape = upcycled_shape(dense, num_experts=CKPT_E, top_k=CKPT_K, layers=",".join(map(str, CKPT_MOE_LAYERS)))
    setup = Setup(nodes=1, gpus_per_node=CKPT_WORLD, ep_size=ep, zero_stage=stage, dtype="bf16",
                  micro_batch_size=2, seq_len=16, reduce_bucket_size=100_000)
    plan = make_plan(shape, setup)
    counts = plan.params
    d = ds_checkpoints / f"ep{ep}_z{stage}" / "t"

    # experts: one file per global expert, bf16
    expert_files = sorted(d.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(expert_files) == len(CKPT_MOE_LAYERS) * CKPT_E
    tensors = sum(_tensor_bytes(torch.load(f, weights_only=True)) for f in expert_files)
    assert tensors == 2 * counts.expert
    on_disk = sum(f.stat().st_size for f in expert_files)
    assert 2 * counts.expert <= on_disk <= 1.03 * 2 * counts.expert
    assert plan.rows["params"].expert == 2 * counts.expert / ep

    # non-expert weights: the module of mp_rank_00 (experts are stripped from it)
    module = load_pt(d / "mp_rank_00_model_states.pt")["module"]
    assert _tensor_bytes(module) == 2 * counts.non_expert == plan.rows["params"].non_expert

    # optimizer states per rank: fp32 master + Adam m, v of this rank's partitions (ZeRO 1/2) or of everything
    want = plan.rows["optim"].total
    pad = 12 * 2 * CKPT_WORLD * 4  # DeepSpeed aligns each of the 2 flat groups to 2 * dp elements
    # ZeRO 1/2: one (bf16_)zero_pp_rank_{r} file per rank; ZeRO 0: one expp_rank_{e} file per expert-parallel rank
    # (written by its expert-data-parallel rank 0; every rank holds the same amount)
    files = ([next(d.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")) for r in range(CKPT_WORLD)] if stage
             else [d / f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep)])
    for r, f in enumerate(files):
        state = load_pt(f, zero=True)
        have = _tensor_bytes(state) - _tensor_bytes(state.get("module"))
        assert want - 64 <= have <= want + pad + 64, (r, have, want)  # + Adam's scalar `step` tensors
        assert want <= f.stat().st_size <= 1.03 * want + 64 * 1024

    # what each rank allocated at run time: parameters, and gradients after backward (before step)
    for r in range(CKPT_WORLD):
        rep = json.loads((ds_checkpoints / f"rank{r}.json").read_text())[f"ep{ep}_z{stage}"]
        assert rep["param_bytes"] == plan.rows["params"].total
        # stage 1 also holds the full gradients until the end of backward (counted in its plan row), then frees them
        g = make_plan(shape, replace(setup, zero_stage=2)).rows["grads"].total if stage else plan.rows["grads"].total
        assert abs(rep["grad_bytes"] - g) <= 0.02 * g, (r, rep["grad_bytes"], g)


@pytest.mark.slow
def test_planned_train_command_runs_with_the_planned_settings(tmp_path, capsys):
    """`plan` prints the exact `upcycle-ds train` command it planned; run for 2 steps, it trains with that layout
    (here with the optimizer offloaded to host memory: `--offload-optimizer` through the launcher; and the launcher
    ignores a DS_ACCELERATOR that contradicts the hardware)."""
    import shlex
    import subprocess

    from cli_proc import cli, cli_env

    dense = tiny.make_dense("llama", tmp_path / "dense")
    tiny.make_tokenizer(dense)
    data = tiny.make_jsonl(tmp_path / "train.jsonl", 60)
    rc, out, _ = run_cli(capsys, "--model", dense, "--num-experts", 4, "--top-k", 2, "--gpus-per-node", 2,
                         "--ep-size", 2, "--zero-stage", 2, "--dtype", "fp32", "--max-length", 64,
                         "--activation-checkpointing", "--offload-optimizer", "--json")
    assert rc == 0
    cmd = shlex.split(json.loads(out)["train_command"])
    assert cmd[:2] == ["upcycle-ds", "train"]
    cmd = cli(*cmd[1:], "--max-steps", 2, "--wandb-mode", "disabled", "--no-export-hf")
    cmd[cmd.index("DATA")], cmd[cmd.index("OUT")] = str(data), str(tmp_path / "run")
    # under a stale DS_ACCELERATOR=cuda (a GPU job's environment; this machine has no CUDA device): the launcher
    # picks the hardware's accelerator for its ranks and says so in its start line
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(DS_ACCELERATOR="cuda"))
    assert r.returncode == 0, r.stderr[-3000:]
    launch = next(line for line in r.stderr.splitlines() if "launching 2 ranks" in line)
    assert "accelerator cpu (no CUDA device); DS_ACCELERATOR=cuda in the environment overridden" in launch, launch
    start = next(line for line in r.stderr.splitlines() if "ranks on" in line)
    assert "2 ranks on cpu, ep_size 2, ZeRO-2 (optimizer state on the host), fp32" in start, start
    assert "activation checkpointing on" in start, start
    assert "rows x 64 tokens" in start, start
    assert "step 2/2" in r.stderr
    assert yaml.safe_load((tmp_path / "run" / "train_args.yaml").read_text())["parallelism"]["offload_optimizer"] is True
