"""`upcycle-ds train` end to end: real ranks (2 CPU processes under the `deepspeed` launcher), real DeepSpeed
checkpoint files, real W&B offline run files, real transformers loading.

Five launches shared by all tests (each ~15-25 s on an idle 2-core machine):
    straight  `upcycle-ds train --config run.yaml` + flag overrides: ep 2, ZeRO-2, fp32, 6 steps, save every 3,
              W&B offline, --debug-dump-logits, HF export
    direct    launchers/deepspeed_direct.sh: ep 2, ZeRO-1, bf16, 6 steps, save every 3, on a copy of the model with
              attention dropout 0.1 (so training draws random numbers and resume must restore the RNG);
              UPCYCLE_DS_VERBOSE=1 (the libraries' own messages)
    half/rest launchers/train_single_node.sh twice on one OUT, same settings as `direct`: 3 steps
              (--exit-after-steps 3), then the script adds --resume by itself and the run does steps 4-6; compared
              bit for bit with `direct`
    killed    ep 2, ZeRO-2, bf16, save every 2, one rank SIGKILLed after a few steps
so ZeRO-1 and ZeRO-2, fp32 and bf16 are each trained (ZeRO-1 x fp32 is not launched here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import transformers
import yaml

from cli_proc import cli, cli_env
from tiny import make_dense, make_jsonl, make_tokenizer

from upcycle_ds.cli import main as cli_main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
E, K, MOE_LAYERS, WORLD, MBS, SEQ = 4, 2, [0, 1, 2, 3], 2, 2, 128
COMMON = ["--ep-size", "2", "--max-steps", "6", "--micro-batch-size", str(MBS), "--seed", "0", "--lr", "1e-3",
          "--max-length", str(SEQ)]
TIMEOUT = 420


def _env(**extra) -> dict:
    env = cli_env(drop=("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_MODE",
                        "UPCYCLE_DS_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"),
                  **extra)
    # the shipped launcher scripts run `deepspeed` / `upcycle-ds` from the activated environment
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


def steps(run_dir: Path) -> list[dict]:
    """The per-step training records of metrics.jsonl (eval records left out), in file order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def _n_steps(run_dir: Path) -> int:
    """Logged training steps so far, while the run may be appending (a torn last line is not counted)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"train/loss"' in line)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_loss_goes_down(recs: list[dict]) -> None:
    losses = [r["train/loss"] for r in recs]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # tiny model on "a+b=c" rows, lr 1e-3: ~5.1 at step 1, ~3.5 after 6 steps
    assert losses[-1] < losses[0] - 0.5, losses
    assert min(losses[len(losses) // 2:]) < min(losses[: len(losses) // 2]), losses


def assert_deepspeed_files(tag_dir: Path, optim_prefix: str) -> None:
    """DeepSpeed's own layout: one file per MoE layer and *global* expert holding just that expert, the non-expert
    module file, one ZeRO optimizer partition per rank, our RNG file per rank."""
    names = {p.name for p in tag_dir.iterdir()}
    expert_files = {f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt" for L in range(len(MOE_LAYERS))
                    for e in range(E)}
    assert expert_files <= names, sorted(expert_files - names)
    assert {n for n in names if re.fullmatch(r"layer_\d+_expert_\d+_mp_rank_00_model_states\.pt", n)} == expert_files
    assert "mp_rank_00_model_states.pt" in names
    assert {f"{optim_prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)} <= names, names
    assert {f"rng_rank{r}.pt" for r in range(WORLD)} <= names
    for L in range(len(MOE_LAYERS)):
        for e in range(E):
            sd = torch.load(tag_dir / f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt", weights_only=True)
            assert sd and all(f"deepspeed_experts.{e}." in k for k in sd), list(sd)
            assert all(f"layers.{MOE_LAYERS[L]}.mlp." in k for k in sd), list(sd)


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dense = make_dense("llama", root / "dense")
    make_tokenizer(dense)
    data = make_jsonl(root / "train.jsonl", 200)
    moe = root / "moe"
    assert cli_main(["upcycle", "--model", str(dense), "--out", str(moe), "--num-experts", str(E), "--top-k",
                     str(K)]) == 0
    dropout = root / "moe_dropout"
    shutil.copytree(moe, dropout)
    cfg = json.loads((dropout / "config.json").read_text())
    assert cfg["attention_dropout"] == 0.0
    (dropout / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.1}))
    return {"root": root, "dense": dense, "moe": moe, "moe_dropout": dropout, "data": data}


@pytest.fixture(scope="module")
def straight(tiny):
    """Run A through `--config run.yaml` whose values the flags partly override."""
    out = tiny["root"] / "straight"
    cfg = tiny["root"] / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny["moe"]), "data": str(tiny["data"]), "out": str(out),
                                   "nproc": 2, "zero_stage": 1, "dtype": "bf16", "max_steps": 100, "lr": 1e-3,
                                   "save_every": 3, "wandb_mode": "offline", "debug_dump_logits": True,
                                   "heatmap_every": 2}))
    t0 = time.monotonic()
    r = _run([*cli("train"), "--config", str(cfg), *COMMON, "--zero-stage", "2",
              "--dtype", "fp32"])
    return {"out": out, "stderr": r.stderr, "wall_s": time.monotonic() - t0}


@pytest.fixture(scope="module")
def resumed(tiny):
    """launchers/train_single_node.sh twice on one OUT: 3 steps and exit, then (auto --resume) steps 4-6."""
    out = tiny["root"] / "resumed"
    env = dict(NPROC="2", MODEL=str(tiny["moe_dropout"]), DATA=str(tiny["data"]), OUT=str(out), EP="2", ZERO="1",
               DTYPE="bf16", EXTRA_ARGS=" ".join(COMMON[2:] + ["--save-every", "3", "--wandb-mode", "disabled"]))
    script = str(REPO / "launchers" / "train_single_node.sh")
    first = _run([script, "--exit-after-steps", "3", "--no-export-hf"], **env)
    after_first = {"latest": (out / "checkpoints" / "latest").read_text(), "steps": steps(out),
                   "tags": sorted(p.name for p in (out / "checkpoints").glob("global_step*"))}
    second = _run([script, "--no-export-hf"], **env)
    return {"out": out, "first": first, "second": second, "after_first": after_first}


@pytest.fixture(scope="module")
def direct(tiny):
    out = tiny["root"] / "direct"
    from upcycle_ds.launch.dist_env import free_port

    env = dict(NPROC="2", MODEL=str(tiny["moe_dropout"]), DATA=str(tiny["data"]), OUT=str(out), EP="2", ZERO="1",
               DTYPE="bf16", MASTER_PORT=str(free_port()), UPCYCLE_DS_VERBOSE="1",
               EXTRA_ARGS=" ".join(COMMON[2:] + ["--save-every", "3", "--wandb-mode", "disabled", "--no-export-hf"]))
    r = _run([str(REPO / "launchers" / "deepspeed_direct.sh")], **env)
    return {"out": out, "stderr": r.stderr, "stdout": r.stdout}


def _rank_processes(root: psutil.Process, config: Path) -> dict[int, psutil.Process]:
    ranks = {}
    for p in root.children(recursive=True):
        try:
            if "upcycle_ds.cli" in p.cmdline() and "env:UPCYCLE_DS_ARGS" in p.cmdline():  # settings of this run
                ranks[int(p.environ()["RANK"])] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    return ranks


@pytest.fixture(scope="module")
def killed(tiny):
    """A long ZeRO-2 bf16 run; once it has a checkpoint and >= 4 logged steps, rank 1 gets SIGKILL."""
    out = tiny["root"] / "killed"
    cmd = [*cli("train"), "--nproc", "2", "--model", str(tiny["moe"]), "--data",
           str(tiny["data"]), "--out", str(out), "--ep-size", "2", "--zero-stage", "2", "--dtype", "bf16",
           "--max-steps", "100000", "--save-every", "2", "--micro-batch-size", str(MBS), "--seed", "0", "--lr",
           "1e-3", "--max-length", str(SEQ), "--wandb-mode", "disabled", "--no-export-hf"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + TIMEOUT
        latest = out / "checkpoints" / "latest"
        while not (latest.is_file() and _n_steps(out) >= 4):
            assert proc.poll() is None, f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        ranks = _rank_processes(psutil.Process(proc.pid), out / "train_args.yaml")
        assert sorted(ranks) == [0, 1], ranks
        t_kill = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            rc = None
        exit_s = time.monotonic() - t_kill
        survivors = [p.pid for p in ranks.values() if _alive(p)]
        print(f"kill -9 rank 1 after {_n_steps(out)} steps: job exit code {rc} after {exit_s:.1f} s")
        return {"out": out, "rc": rc, "exit_s": exit_s, "survivors": survivors, "stderr": proc.stderr.read()}
    finally:
        if proc.poll() is None:  # only on failure: end the process group this fixture started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------- logs

def test_log_holds_our_lines_only_unless_verbose(straight, direct):
    """`upcycle-ds train --nproc 2` (ep 2, ZeRO-2) into a pipe: every line is ours (no launcher INFO lines, hostfile
    warning, DeepSpeed process-group print, torch FutureWarning, progress bars); with UPCYCLE_DS_VERBOSE=1 they are
    there."""
    lines = [line for line in straight["stderr"].splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("[upcycle-ds train] ")] == []
    assert "\r" not in straight["stderr"] and "--quiet" in lines[0]
    for notice in ("[INFO] [launch.py", "No existing process group found", "all_gather_into_tensor` is deprecated"):
        assert notice in direct["stderr"] or notice in direct["stdout"], notice


# ---------------------------------------------------------------------------------------------- loss + files

def test_straight_run_trains_and_saves_expert_files(straight):
    out = straight["out"]
    recs = steps(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert_loss_goes_down(recs)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step6"
    for tag in ("global_step3", "global_step6"):
        assert_deepspeed_files(ckpts / tag, optim_prefix="")
    assert "ZeRO-2, fp32" in straight["stderr"]


def test_config_yaml_with_flag_overrides(straight):
    """run.yaml said ZeRO-1 / bf16 / 100 steps; the flags' ZeRO-2 / fp32 / 6 steps win, the rest comes from it."""
    from upcycle_ds.cli_args import flatten_sections
    from upcycle_ds.train.config import TrainArgs

    recorded = yaml.safe_load((straight["out"] / "train_args.yaml").read_text())
    assert recorded["parallelism"]["zero_stage"] == 2  # grouped in sections, as --print-config prints them
    resolved = flatten_sections(recorded, TrainArgs)
    assert (resolved["zero_stage"], resolved["dtype"], resolved["max_steps"]) == (2, "fp32", 6)
    assert resolved["save_every"] == 3 and resolved["debug_dump_logits"] is True  # only in the YAML
    recs = steps(straight["out"])
    assert recs[0]["train/lr"] == 1e-3 and len(recs) == 6


def test_direct_launcher_zero1_bf16(direct):
    out = direct["out"]
    recs = steps(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert_loss_goes_down(recs)
    assert (out / "checkpoints" / "latest").read_text() == "global_step6"
    for tag in ("global_step3", "global_step6"):
        assert_deepspeed_files(out / "checkpoints" / tag, optim_prefix="bf16_")
    assert "ZeRO-1, bf16" in direct["stderr"]
    assert not (out / "hf").exists()


# ------------------------------------------------------------------------------------------------------ resume

def test_resume_is_bit_exact(direct, resumed):
    first = resumed["after_first"]
    assert first["latest"] == "global_step3" and first["tags"] == ["global_step3"]
    assert [r["step"] for r in first["steps"]] == [1, 2, 3]
    assert "resuming from global_step3" in resumed["second"].stderr  # the launcher script added --resume
    assert "resumed from" in resumed["second"].stderr and "at step 3" in resumed["second"].stderr
    got, want = steps(resumed["out"]), steps(direct["out"])
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want):
        keys = [k for k in w if k.startswith("moe/") or k in ("train/loss", "train/lr", "train/tokens", "train/epoch")]
        assert len(keys) > 2 + E * len(MOE_LAYERS)
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, f"step {w['step']}"  # bit-identical
    assert (resumed["out"] / "checkpoints" / "latest").read_text() == "global_step6"


def test_resume_continues_lr_schedule(resumed):
    from upcycle_ds.train.optim import lr_lambda

    lrs = [r["train/lr"] for r in steps(resumed["out"])]
    f = lr_lambda(0, 6, 0.1)
    assert lrs == pytest.approx([1e-3 * f(s) for s in range(6)], rel=1e-12)
    assert lrs[3] < lrs[2] < lrs[0]  # step 4 continues the cosine; it does not restart at the peak


# --------------------------------------------------------------------------------------------------- kill -9

def test_killed_rank_fails_the_job_fast(killed):
    assert killed["rc"] is not None, "the job hung after a rank was killed"
    assert killed["rc"] != 0
    assert killed["exit_s"] < 60, killed["exit_s"]
    assert killed["survivors"] == []


def test_last_checkpoint_after_kill_loads(killed, tiny):
    from upcycle_ds.io.ds import DSCheckpoint, load_pt
    from upcycle_ds.surgery import build_moe_model

    ckpts = killed["out"] / "checkpoints"
    tag = (ckpts / "latest").read_text()
    n = int(tag.removeprefix("global_step"))
    assert n >= 2 and n % 2 == 0
    assert_deepspeed_files(ckpts / tag, optim_prefix=_optim_prefix(ckpts / tag))
    assert load_pt(ckpts / tag / "mp_rank_00_model_states.pt")["train_state"]["step"] == n
    recs = steps(killed["out"])
    assert len(recs) >= n
    assert_loss_goes_down(recs[:max(n, 4)])  # ZeRO-2 bf16 trains too

    src = DSCheckpoint(ckpts)
    assert src.tag == tag
    model = build_moe_model(src).eval()
    initial = transformers.AutoModelForCausalLM.from_pretrained(tiny["moe"], dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        before = initial(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert (got - before).abs().max() > 1e-2  # it holds trained weights, not the initial ones


def _optim_prefix(tag_dir: Path) -> str:
    return "bf16_" if (tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() else ""


# ------------------------------------------------------------------------------------------------------- W&B

def _wandb_steps(out: Path) -> dict[int, dict]:
    from wandb_read import read_offline_run

    run = read_offline_run(out / "wandb")
    assert run["exit_code"] == 0
    return {row["_step"]: row for row in run["history"] if "train/loss" in row}


def test_wandb_load_scalars_match_metrics_and_shares_sum_to_one(straight):
    hist = _wandb_steps(straight["out"])
    assert sorted(hist) == [1, 2, 3, 4, 5, 6]
    for rec in steps(straight["out"]):
        row = hist[rec["step"]]
        assert row["train/loss"] == rec["train/loss"] and row["train/lr"] == rec["train/lr"]
        for L in MOE_LAYERS:
            fr = [rec[f"moe/layer{L}/expert{e}_share"] for e in range(E)]  # each expert's share, the same in both
            assert [row[f"moe/layer{L}/expert{e}_share"] for e in range(E)] == fr
            assert f"moe/layer{L}/expert{E}_share" not in rec
            assert sum(fr) == pytest.approx(1.0, abs=1e-12)
            assert row[f"moe/layer{L}/max_share"] == max(fr) and row[f"moe/layer{L}/min_share"] == min(fr)
            # fraction x (2 ranks x 2 rows x 128 tokens x k) is a whole number of token-slots
            slots = [f * WORLD * MBS * SEQ * K for f in fr]
            assert slots == pytest.approx([round(s) for s in slots], abs=1e-6)
    assert f"moe/layer{MOE_LAYERS[-1] + 1}/max_share" not in hist[1]


def test_load_heatmap_every_heatmap_interval(straight):
    """--heatmap-every 2: the layer x expert heatmap at steps 2, 4 and 6, an image each (no tables)."""
    hist = _wandb_steps(straight["out"])
    assert [s for s in sorted(hist) if "moe/load_heatmap_train" in hist[s]] == [2, 4, 6]
    assert not any(k.endswith("_table") for row in hist.values() for k in row)
    assert (straight["out"] / "load_heatmap_train_step4.png").is_file()


def test_step1_expert_shares_equal_transformers_router_counts(straight, tiny):
    """Independent count: step 1 routes the untrained upcycled weights, so transformers' own Mixtral, loaded from
    the upcycled checkpoint and run on exactly the step-1 micro-batches of both ranks (rebuilt with
    upcycle_ds.data), must pick the same top-k experts."""
    from transformers import AutoTokenizer

    from upcycle_ds.data import DataConfig, batches, build_datasets

    tok = AutoTokenizer.from_pretrained(tiny["moe"])
    train_ds, _ = build_datasets(DataConfig(data=str(tiny["data"]), max_length=SEQ, eval_fraction=0.05,
                                            eval_data=None, seed=0, max_samples=None), tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["moe"], dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    counts = torch.zeros(len(MOE_LAYERS), E, dtype=torch.int64)
    for rank in range(WORLD):
        b = next(batches(train_ds, micro_batch_size=MBS, rank=rank, world_size=WORLD, seed=0, epoch=0))
        with torch.no_grad():
            out = hf(input_ids=b["input_ids"], position_ids=b["position_ids"], output_router_logits=True,
                     use_cache=False)
        assert len(out.router_logits) == len(MOE_LAYERS)
        for i, logits in enumerate(out.router_logits):
            top = logits.float().topk(K, dim=-1).indices
            counts[i] += torch.bincount(top.reshape(-1), minlength=E)
    total = WORLD * MBS * SEQ * K
    assert (counts.sum(dim=1) == total).all()
    row = steps(straight["out"])[0]
    assert row["step"] == 1
    logged = torch.tensor([[row[f"moe/layer{L}/expert{e}_share"] * total for e in range(E)] for L in MOE_LAYERS],
                          dtype=torch.float64)
    assert torch.equal(logged.round().long(), counts), (logged, counts)
    assert (counts.max(dim=1).values < total).all()  # not trivially "everything on one expert"


def test_load_heatmap_has_one_row_per_moe_layer(straight):
    from upcycle_ds.train.tracking import read_heatmap_meta

    meta = read_heatmap_meta(straight["out"] / "load_heatmap_step6.png")
    assert meta["layer_ids"] == MOE_LAYERS
    assert len(meta["load"]) == len(MOE_LAYERS) and all(len(r) == E for r in meta["load"])
    evals = [json.loads(line) for line in (straight["out"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "moe/load" in r]
    assert len(evals) == 1 and evals[0]["step"] == 6
    assert evals[0]["moe/load"]["fractions"] == meta["load"]
    assert all(sum(r) == pytest.approx(1.0, abs=1e-12) for r in meta["load"])


# ------------------------------------------------------------------------------------------- what is reported

def test_throughput_counts_real_tokens_and_progress_is_logged(straight, tiny):
    """tokens/s x s/step of every step = the step's non-padding tokens over both ranks, counted independently from
    the rebuilt micro-batches (the character tokenizer's pad id never occurs in text); train/tokens adds them up;
    train/epoch is fractional; eval/ppl = exp(eval/loss); one line per checkpoint with its tag, time and size."""
    import math

    from transformers import AutoTokenizer

    from upcycle_ds.data import DataConfig, batches, build_datasets

    tok = AutoTokenizer.from_pretrained(tiny["moe"])
    train_ds, _ = build_datasets(DataConfig(data=str(tiny["data"]), max_length=SEQ, eval_fraction=0.05,
                                            eval_data=None, seed=0, max_samples=None), tok)
    per_rank = [list(batches(train_ds, micro_batch_size=MBS, rank=r, world_size=WORLD, seed=0, epoch=0))
                for r in range(WORLD)]
    real = [sum(int((per_rank[r][s]["input_ids"] != tok.pad_token_id).sum()) for r in range(WORLD))
            for s in range(6)]
    assert all(0 < n < WORLD * MBS * SEQ for n in real)  # the rows are partly padding
    recs = steps(straight["out"])
    for s, rec in enumerate(recs):
        assert rec["train/tokens_per_s"] * rec["train/step_time_s"] == pytest.approx(real[s], rel=1e-9)
        assert rec["train/tokens"] == sum(real[: s + 1])
        assert rec["train/epoch"] == pytest.approx((s + 1) / len(per_rank[0]), rel=1e-12)
    rows = [json.loads(line) for line in (straight["out"] / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in rows if "eval/loss" in r]
    assert ev["eval/ppl"] == pytest.approx(math.exp(ev["eval/loss"]), rel=1e-12)
    assert re.search(rf"\[upcycle-ds train\] step 6: eval loss {ev['eval/loss']:.4f} \(perplexity \S+\)",
                     straight["stderr"])
    for tag in ("global_step3", "global_step6"):
        size = sum(p.stat().st_size for p in (straight["out"] / "checkpoints" / tag).rglob("*") if p.is_file())
        line = re.search(rf"\[upcycle-ds train\] checkpoint {tag} saved in (\d+\.\d) s \((\d+\.\d\d) GB\)\n",
                         straight["stderr"])
        assert line and line.group(2) == f"{size / 1e9:.2f}", straight["stderr"][-3000:]


# ---------------------------------------------------------------------------------------------------- export

def test_hf_export_gives_the_engines_logits(straight, tiny):
    """OUT/hf in transformers vs the logits the trained DeepSpeed engine itself computed (--debug-dump-logits)."""
    hf_dir = straight["out"] / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    initial = transformers.AutoModelForCausalLM.from_pretrained(tiny["moe"], dtype=torch.float32).eval()
    for rank in range(WORLD):
        dump = torch.load(straight["out"] / "debug" / f"final_logits_rank{rank}.pt", weights_only=True)
        assert dump["logits"].shape == (MBS, SEQ, 128)
        with torch.no_grad():
            got = model(input_ids=dump["input_ids"], position_ids=dump["position_ids"], use_cache=False).logits
            before = initial(input_ids=dump["input_ids"], position_ids=dump["position_ids"], use_cache=False).logits
        err = (got - dump["logits"]).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: max |HF - engine| = {err}"
        assert (before - dump["logits"]).abs().max() > 1e-2  # the export holds the trained weights
