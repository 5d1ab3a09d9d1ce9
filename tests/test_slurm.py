"""Slurm launch: pure parsing of Slurm variables, then the real slurm/*.sbatch scripts on a real local 2-node Slurm.

The cluster tests use tests/slurm_standin.py in place of `upcycle-ds` (UPCYCLE_DS_CMD): it takes the same command
line, derives its rank with upcycle_ds.launch.dist_env, and all_reduces over gloo across the two Slurm nodes. The last
two tests run the real `upcycle-ds train` through slurm/train.sbatch (expert parallel across the two nodes): a
completed run (checkpoint files of both ranks, W&B offline log), and a run whose node2 rank is SIGKILLed, resubmitted,
killed again inside a checkpoint save, resubmitted again, and compared loss by loss with the completed one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import FINAL_STATES, NODE_ADDRS, slurm_cluster  # noqa: F401  (session fixture)
from upcycle_ds.launch import slurm
from upcycle_ds.launch.dist_env import DistEnv, dist_env, setup_dist_env

REPO = Path(__file__).resolve().parents[1]
STANDIN = f"{sys.executable} {REPO / 'tests' / 'slurm_standin.py'}"
CPU_JOB = ["--cpus-per-task=1", "--time=5"]
# sbatch jobs: the scripts ask for USR1 600 s before the limit, which with --time=5 Slurm would send at once (the
# test of stopping before the limit sets its own --signal)
BATCH_JOB = [*CPU_JOB, "--signal=B:USR1@30"]

# The environment of task 1 of `srun` in `sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=2` (real Slurm 22.05,
# trimmed), and of the batch script itself (no step variables).
STEP_ENV = {
    "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_NODEID": "0", "SLURM_NODELIST": "node[1-2]", "SLURM_NPROCS": "4", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURMD_NODENAME": "node1",
    "SLURM_GPUS_ON_NODE": "2",
}
BATCH_ENV = {k: v for k, v in STEP_ENV.items() if "STEP" not in k} | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def fake_lookup(addrs):
    return dict(hostnames=slurm.expand_hostlist, node_addr=lambda n: addrs[n])


# -- pure parsing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, counts", [("8", [8]), ("2(x2)", [2, 2]), ("2(x3),1", [2, 2, 2, 1]),
                                          ("4,3(x2)", [4, 3, 3])])
def test_parse_tasks_per_node(spec, counts):
    assert slurm.parse_tasks_per_node(spec) == counts


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError, match="tasks-per-node"):
        slurm.parse_tasks_per_node("2(x)")


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],login", ["gpu01", "gpu02", "gpu03", "gpu7", "login"]),  # padding per range, as scontrol does
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("dgx-[009-010],cpu-a[1]-x", ["dgx-009", "dgx-010", "cpu-a1-x"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert slurm.expand_hostlist(nodelist) == hosts


def test_parse_node_addr():
    line = ("NodeName=node1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=2 CPULoad=0.40 AvailableFeatures=(null) "
            "Gres=gpu:2 NodeAddr=10.1.2.3 NodeHostName=node1 Version=22.05.8 OS=Linux")
    assert slurm.parse_node_addr(line) == "10.1.2.3"
    assert slurm.parse_node_addr("NodeName=x\n   NodeAddr=gpu-x.ib NodeHostName=x\n") == "gpu-x.ib"
    assert slurm.parse_node_addr("nothing") is None


def test_master_port_is_per_job_and_outside_ephemeral_range():
    ports = {slurm.master_port_for_job(j) for j in range(100_000, 112_000)}
    assert len(ports) == 12_000 and min(ports) >= 1024 and max(ports) < 32768
    assert slurm.master_port_for_job("1234") == 21234


# -- dist_env ---------------------------------------------------------------------------------------------------------
def test_dist_env_torchrun_vars_win_over_slurm():
    env = {**STEP_ENV, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert dist_env(env, **fake_lookup({})) == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                                       master_addr="10.0.0.1", master_port=29400, source="launcher")


def test_dist_env_deepspeed_launcher_local_size():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "MASTER_ADDR": "h1", "MASTER_PORT": "29500"}
    de = dist_env(env)
    assert (de.rank, de.local_rank, de.local_world_size, de.source) == (3, 1, 2, "launcher")


def test_dist_env_slurm_step():
    de = dist_env(STEP_ENV, **fake_lookup({"node1": "10.0.0.7", "node2": "10.0.0.8"}))
    assert de == DistEnv(rank=1, world_size=4, local_rank=1, local_world_size=2, master_addr="10.0.0.7",
                         master_port=21234, source="slurm")


def test_dist_env_slurm_uneven_nodes_and_exported_master():
    env = {**STEP_ENV, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "1",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "0", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "23000"}
    de = dist_env(env, **fake_lookup({}))  # no lookup: the exported master wins
    assert (de.rank, de.world_size, de.local_rank, de.local_world_size) == (3, 4, 0, 1)
    assert (de.master_addr, de.master_port) == ("10.9.9.9", 23000)


def test_dist_env_batch_script_without_srun_is_one_process():
    # The batch step has SLURM_PROCID=0 and SLURM_NTASKS=4 but is not rank 0 of 4: nothing would start ranks 1-3.
    assert dist_env(BATCH_ENV).source == "single"
    de = dist_env({})
    assert (de.rank, de.world_size, de.local_rank, de.local_world_size, de.master_addr, de.source) == (
        0, 1, 0, 1, "127.0.0.1", "single")
    assert 0 < de.master_port < 65536
    assert dist_env({"MASTER_PORT": "29511"}).master_port == 29511


def test_dist_env_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="inconsistent"):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_setup_dist_env_writes_torch_variables():
    env = {**STEP_ENV, "MASTER_ADDR": "10.0.0.7"}  # exported by the sbatch script: no scontrol lookup
    setup_dist_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                "MASTER_PORT")} == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7",
                                                    "MASTER_PORT": "21234"}


# -- real Slurm -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hostlist_parser_agrees_with_scontrol(slurm_cluster):
    nodelist = "gpu[01-03,7],login,a[1-2]b[3-4],dgx-[009-010]"
    assert slurm.hostnames(nodelist) == slurm.expand_hostlist(nodelist)
    assert slurm.node_addr("node2") == NODE_ADDRS[1]


@pytest.mark.slow
def test_dist_env_inside_real_srun_step(slurm_cluster):
    """No MASTER_ADDR exported: every rank derives it itself (scontrol: first host -> its NodeAddr)."""
    code = ("import json; from upcycle_ds.launch.dist_env import dist_env; import os; "
            "print(json.dumps({**dist_env().as_environ(), 'node': os.environ['SLURMD_NODENAME']}))")
    out = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", *CPU_JOB, f"--chdir={REPO}",
                            sys.executable, "-c", code, timeout=60)
    ranks = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda r: int(r["RANK"]))
    assert [(r["RANK"], r["LOCAL_RANK"], r["node"]) for r in ranks] == [
        ("0", "0", "node1"), ("1", "1", "node1"), ("2", "0", "node2"), ("3", "1", "node2")]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["MASTER_ADDR"]) for r in ranks} == {("4", "2", NODE_ADDRS[0])}
    assert len({r["MASTER_PORT"] for r in ranks}) == 1


def _ranks(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]


@pytest.mark.slow
def test_train_sbatch_two_nodes(slurm_cluster, tmp_path):
    """The real slurm/train.sbatch (GPU lines unchanged: the test nodes have 2 fake GPUs each), 2 nodes x 2 ranks."""
    config, run_dir = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text("model: tiny\n")
    job = slurm_cluster.submit(REPO / "slurm" / "train.sbatch", config, run_dir, "--lr", "1e-4",
                               env={"UPCYCLE_DS_CMD": STANDIN},
                               sbatch_args=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", *BATCH_JOB,
                                            f"--output={tmp_path}/batch.log"])
    state = slurm_cluster.wait(job, timeout=60)
    batch_log = slurm_cluster.read_log(tmp_path / "batch.log")
    assert state == "COMPLETED", batch_log + slurm_cluster.daemon_logs()

    ranks = _ranks(run_dir)
    assert [(r["RANK"], r["LOCAL_RANK"], r["node"]) for r in ranks] == [
        ("0", "0", "node1"), ("1", "1", "node1"), ("2", "0", "node2"), ("3", "1", "node2")]
    master = {(r["MASTER_ADDR"], r["MASTER_PORT"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for r in ranks}
    assert master == {(NODE_ADDRS[0], str(20000 + job % 12000), "4", "2")}
    assert {r["allreduce"] for r in ranks} == {1.0 + 2 + 3 + 4}
    assert all(r["command"] == "train" and r["config"] == str(config) and r["extra"] == ["--lr", "1e-4"]
               and r["resume"] is False for r in ranks)

    for rank in range(4):
        log = slurm_cluster.read_log(run_dir / "logs" / f"train-{job}.0-rank{rank}.log")
        assert f"rank {rank}/4" in log and f"rank {rank} done" in log, log
    assert f"master {NODE_ADDRS[0]}:" in batch_log and "fresh start" in batch_log
    assert f"job {job} done" in batch_log


@pytest.mark.slow
def test_train_sbatch_requeue_resumes(slurm_cluster, tmp_path):
    """`scontrol requeue` mid-run: the script runs again under the same job id and adds --resume (checkpoint seen)."""
    config, run_dir = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text("model: tiny\n")
    job = slurm_cluster.submit(REPO / "slurm" / "train.sbatch", config, run_dir, "--save", "--hold", "2",
                               env={"UPCYCLE_DS_CMD": STANDIN},
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", *BATCH_JOB,
                                            f"--output={tmp_path}/batch.log"])
    slurm_cluster.wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), timeout=60, what="checkpoint")
    slurm_cluster.run("scontrol", "requeue", str(job))
    # Slurm holds a requeued job for the credential lifetime (cred_expire: 120 s by default, 8 s on the test cluster).
    slurm_cluster.wait_for(lambda: slurm_cluster.job(job)["Reason"] == "BeginTime", timeout=10, what="requeue hold")
    state = slurm_cluster.wait(job, timeout=60)
    batch_log = slurm_cluster.read_log(tmp_path / "batch.log")
    assert state == "COMPLETED", batch_log + str(slurm_cluster.job(job)) + slurm_cluster.daemon_logs(40)
    assert slurm_cluster.job(job)["Restarts"] == "1"
    ranks = _ranks(run_dir)
    assert [(r["restart"], r["resume"]) for r in ranks] == [(1, True), (1, True)]
    assert "fresh start" in batch_log and "--resume" in batch_log  # both runs appended to the same log
    assert (run_dir / "logs" / f"train-{job}.1-rank1.log").exists()


def _submit_two_ranks(cluster, tmp_path, *flags):
    config, run_dir = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text("model: tiny\n")
    job = cluster.submit(REPO / "slurm" / "train.sbatch", config, run_dir, *flags, env={"UPCYCLE_DS_CMD": STANDIN},
                         sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", *BATCH_JOB,
                                      f"--output={tmp_path}/batch.log"])
    pid_file = run_dir / "pids" / "rank1.pid"
    cluster.wait_for(pid_file.exists, timeout=60, what="rank 1 pid file")
    time.sleep(1.5)  # past init_process_group and the first all_reduce: inside --hold
    return job, run_dir, int(pid_file.read_text())


def _time_to_final_state(cluster, job) -> tuple[str, float]:
    t0 = time.monotonic()
    state = cluster.wait(job, timeout=60)
    return state, time.monotonic() - t0


@pytest.mark.slow
def test_killed_rank_fails_job_fast(slurm_cluster, tmp_path):
    """Rank 1 SIGKILLed (as by the OOM killer) while rank 0 computes without communicating for 120 s: srun's
    --kill-on-bad-exit ends the step at once, so the job is FAILED in seconds, not after rank 0's 120 s."""
    job, run_dir, pid = _submit_two_ranks(slurm_cluster, tmp_path, "--hold", "120")
    os.kill(pid, signal.SIGKILL)
    state, elapsed = _time_to_final_state(slurm_cluster, job)
    print(f"SIGKILL rank 1 -> job {state} in {elapsed:.1f} s")
    batch_log = slurm_cluster.read_log(tmp_path / "batch.log")
    assert state == "FAILED" and elapsed < 30, batch_log
    assert not (run_dir / "ranks").exists()  # no rank got to the end
    assert f"job {job} done" not in batch_log


@pytest.mark.slow
def test_hung_rank_fails_job_by_collective_timeout(slurm_cluster, tmp_path):
    """Rank 1 frozen (SIGSTOP: alive, silent, like a hung GPU or filesystem) while rank 0 waits in all_reduce: the
    torch.distributed timeout (5 s here) fails rank 0, and --kill-on-bad-exit then takes down the frozen rank."""
    job, run_dir, pid = _submit_two_ranks(slurm_cluster, tmp_path, "--hold", "120", "--hold-comm", "--timeout", "5")
    os.kill(pid, signal.SIGSTOP)
    state, elapsed = _time_to_final_state(slurm_cluster, job)
    print(f"SIGSTOP rank 1 -> job {state} in {elapsed:.1f} s")
    assert state == "FAILED" and elapsed < 30, slurm_cluster.read_log(tmp_path / "batch.log")
    rank0_log = slurm_cluster.read_log(run_dir / "logs" / f"train-{job}.0-rank0.log")
    assert "timed out" in rank0_log.lower() or "timeout" in rank0_log.lower(), rank0_log


@pytest.mark.slow
def test_train_sbatch_missing_config_fails_with_message(slurm_cluster, tmp_path):
    job = slurm_cluster.submit(REPO / "slurm" / "train.sbatch", tmp_path / "nope.yaml", tmp_path / "run",
                               env={"UPCYCLE_DS_CMD": STANDIN},
                               sbatch_args=["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", *BATCH_JOB,
                                            f"--output={tmp_path}/batch.log"])
    assert slurm_cluster.wait(job, timeout=30) == "FAILED"
    assert slurm_cluster.job(job)["ExitCode"] == "2:0"
    assert "nope.yaml not found" in slurm_cluster.read_log(tmp_path / "batch.log")


@pytest.mark.slow
def test_upit_sbatch_two_nodes_cpu_only(slurm_cluster, tmp_path):
    """slurm/upit.sbatch with the GPU request dropped (--gpus-per-node=0): plain CPU ranks across 2 nodes."""
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "upit"
    recipe.write_text("experts: []\n")
    job = slurm_cluster.submit(REPO / "slurm" / "upit.sbatch", recipe, "--out", out,
                               env={"UPCYCLE_DS_CMD": STANDIN, "LOG_DIR": str(tmp_path / "logs")},
                               sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", *BATCH_JOB,
                                            f"--output={tmp_path}/batch.log"])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.read_log(tmp_path / "batch.log")
    ranks = _ranks(out)
    assert [(r["RANK"], r["node"], r["command"], r["allreduce"]) for r in ranks] == [
        ("0", "node1", "upit", 3.0), ("1", "node2", "upit", 3.0)]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"upit-{job}.0-rank0.log",
                                                                      f"upit-{job}.0-rank1.log"]


# -- the real `upcycle-ds train` on the two Slurm nodes ---------------------------------------------------------
# 2 nodes x 1 CPU rank, expert parallel across the nodes (ep 2: rank 0 on node1 holds experts 0-1, rank 1 on node2
# experts 2-3), ZeRO-2, fp32, a checkpoint every 2 of 8 steps. Real-train jobs are the expensive part of this module
# (~10-40 s each, mostly imports): the module runs four, the reference and the three of the fault test.
REAL_STEPS, REAL_SAVE_EVERY, NUM_EXPERTS, NUM_LAYERS = 8, 2, 4, 4


@pytest.fixture(scope="module")
def real_train_inputs(tmp_path_factory):
    """A tiny Mixtral (4 experts, top 2, 4 layers), its tokenizer, 200 rows of data, a run config, the job env."""
    import yaml
    from tiny import make_jsonl, make_moe, make_tokenizer

    root = tmp_path_factory.mktemp("real_train")
    moe = make_moe("mixtral", root / "moe", num_experts=NUM_EXPERTS, top_k=2)
    make_tokenizer(moe)
    data = make_jsonl(root / "train.jsonl", 200)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(moe), "data": str(data), "ep_size": 2, "zero_stage": 2,
                                      "dtype": "fp32", "micro_batch_size": 2, "max_length": 128, "lr": 1e-3,
                                      "seed": 0, "max_steps": REAL_STEPS, "save_every": REAL_SAVE_EVERY,
                                      "export_hf": False, "wandb_mode": "offline"}))
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(root / "torch_ext")}
    return config, env


def _submit_real(cluster, inputs, run_dir: Path, *flags: str, env: dict[str, str] | None = None) -> int:
    """slurm/train.sbatch with the real `upcycle-ds` (from PATH: the script's default command); batch log in
    RUN_DIR/../batch-<run>.log (appended to by every job of the run, as on a cluster)."""
    config, base_env = inputs
    return cluster.submit(REPO / "slurm" / "train.sbatch", config, run_dir, *flags, env={**base_env, **(env or {})},
                          sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", *BATCH_JOB,
                                       f"--output={run_dir.parent}/batch-{run_dir.name}.log"])


def _real_logs(cluster, run_dir: Path, job: int) -> list[str]:
    return [cluster.read_log(run_dir / "logs" / f"train-{job}.0-rank{r}.log") for r in range(2)]


def _why(cluster, run_dir: Path, job: int) -> str:
    return (cluster.read_log(run_dir.parent / f"batch-{run_dir.name}.log") + str(cluster.job(job)) + "\n"
            + "\n".join(log[-3000:] for log in _real_logs(cluster, run_dir, job)))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _latest(run_dir: Path) -> str | None:
    f = run_dir / "checkpoints" / "latest"
    return f.read_text().strip() if f.is_file() else None


@pytest.fixture(scope="module")
def real_reference(slurm_cluster, real_train_inputs, tmp_path_factory):
    """One uninterrupted real-train job (W&B offline): its run dir, job id, and the losses of steps 1..REAL_STEPS."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.monotonic()
    job = _submit_real(slurm_cluster, real_train_inputs, run_dir)
    state = slurm_cluster.wait(job, timeout=300)
    assert state == "COMPLETED", _why(slurm_cluster, run_dir, job)
    print(f"reference real-train job: {time.monotonic() - t0:.1f} s")
    return run_dir, job, _losses(run_dir)


@pytest.mark.slow
def test_real_train_on_two_slurm_nodes(slurm_cluster, real_train_inputs, real_reference):
    """The real `upcycle-ds train` under slurm/train.sbatch, 2 nodes x 1 CPU rank, ep 2 across the nodes, ZeRO-2:
    both ranks write their own experts' files, and the W&B offline run holds every logged step."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from wandb_read import read_offline_run

    run_dir, job, losses = real_reference
    logs = _real_logs(slurm_cluster, run_dir, job)
    assert "[upcycle-ds train] 2 ranks on cpu, ep_size 2, ZeRO-2, fp32" in logs[0], logs[0][-3000:]
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert logs[0].count(f"[upcycle-ds train] W&B offline run {run_id} in {run_dir}/wandb/offline-run-") == 1
    assert "W&B" not in logs[1]
    assert sorted(losses) == list(range(1, REAL_STEPS + 1))
    assert all(0 < v < 20 for v in losses.values()), losses
    ckpts = run_dir / "checkpoints"
    assert _latest(run_dir) == f"global_step{REAL_STEPS}"
    saved = sorted(p.name for p in ckpts.glob("global_step*"))
    assert saved == sorted(f"global_step{s}" for s in range(REAL_SAVE_EVERY, REAL_STEPS + 1, REAL_SAVE_EVERY))

    # Expert files: one per (MoE layer, global expert id), for all experts. With ep 2 no rank holds the other's
    # experts, so files 0-1 can only come from rank 0 (node1) and 2-3 only from rank 1 (node2). Each file holds expert
    # E of its layer (global id in the keys; its weights are the source model's expert E moved by 8 small AdamW steps,
    # nearer to it than to any other expert of the layer), and each rank's experts were trained (most moved; an expert
    # of the last layer that gets only unlabelled tokens has no gradient and may stay put).
    model = yaml.safe_load(real_train_inputs[0].read_text())["model"]
    source = load_file(f"{model}/model.safetensors")
    last = ckpts / f"global_step{REAL_STEPS}"
    names = {p.name for p in last.glob("layer_*_expert_*_mp_rank_00_model_states.pt")}
    assert names == {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
                     for layer in range(NUM_LAYERS) for e in range(NUM_EXPERTS)}, sorted(names)
    moved = {0: 0, 1: 0}
    for layer in range(NUM_LAYERS):
        def hf(e, proj):
            w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            return source[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]

        for e in range(NUM_EXPERTS):
            name = f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
            sd = torch.load(last / name, map_location="cpu", weights_only=True)
            prefix = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
            assert sorted(sd) == [prefix + f"{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")], (name, sd)
            dist_to = {j: max((sd[prefix + f"{p}.weight"] - hf(j, p)).abs().max().item()
                              for p in ("gate_proj", "up_proj", "down_proj")) for j in range(NUM_EXPERTS)}
            assert dist_to[e] < 0.05 and all(dist_to[e] < dist_to[j] for j in dist_to if j != e), (name, dist_to)
            moved[e * 2 // NUM_EXPERTS] += dist_to[e] > 0
    assert all(n > NUM_LAYERS for n in moved.values()), f"expert files changed since the start, per ep rank: {moved}"
    # The rest of the checkpoint: one ZeRO-2 optimizer shard and one RNG state per rank, the non-expert weights.
    assert {p.name for p in last.glob("*optim_states.pt")} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                               for r in range(2)}
    assert (last / "mp_rank_00_model_states.pt").is_file()
    assert {p.name for p in last.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    # W&B offline run (rank 0 only) under RUN_DIR/wandb: history = the logged steps with metrics.jsonl's losses.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    wb = read_offline_run(run_dir / "wandb")
    history = {row["_step"]: row for row in wb["history"] if "train/loss" in row}
    assert sorted(history) == list(range(1, REAL_STEPS + 1))
    assert {s: row["train/loss"] for s, row in history.items()} == losses
    assert wb["exit_code"] == 0 and wb["config"]["ep_size"] == 2


def _rank_process(run_dir: Path, rank: int):
    """The training process of `rank` of a job writing to run_dir, found like an operator would: `ps` by command
    line (train ... --out RUN_DIR) plus the rank Slurm gave it (SLURM_PROCID in its environment)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "train" not in cmd or str(run_dir) not in cmd:
            continue
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_PROCID") == str(rank):
            found.append((p, env.get("SLURMD_NODENAME")))
    # The rank itself, not a child it started (same command line and environment): the one whose parent isn't one.
    pids = {p.pid for p, _ in found}
    top = [(p, node) for p, node in found if p.ppid() not in pids]
    return top[0] if len(top) == 1 else None


@pytest.mark.slow
def test_real_train_rank_killed_then_resubmitted_matches_reference(slurm_cluster, real_train_inputs, real_reference,
                                                                   tmp_path):
    """Fault tolerance of the real training on Slurm, against the uninterrupted reference run (same config):

    1. the rank on node2 is SIGKILLed once a checkpoint exists -> the job is FAILED within 60 s (no hang);
    2. resubmitting the same script resumes (--resume) from the last complete checkpoint; this time rank 0 is
       SIGKILLed inside the next checkpoint save after its files are written (tests/inject/sitecustomize.py,
       switched on by UPCYCLE_DS_TEST_KILL_IN_SAVE exported into the job) -> FAILED, and `latest` still points at
       the previous checkpoint;
    3. resubmitting again resumes from that checkpoint and completes; every step's loss, before and after each
       resume, equals the reference run's bit for bit."""
    _, _, reference = real_reference
    run_dir = tmp_path / "run"
    flags = ("--wandb-mode", "disabled")  # W&B is covered by the reference; it would only add start-up time here

    # 1. SIGKILL the node2 rank after the first checkpoint is committed.
    job1 = _submit_real(slurm_cluster, real_train_inputs, run_dir, *flags)
    # Find the process while it starts up (seconds of imports), so the kill follows the checkpoint at once (a step
    # takes ~0.2 s here): the killed run must have steps left after its last checkpoint.
    found = slurm_cluster.wait_for(lambda: _rank_process(run_dir, 1) or slurm_cluster.state(job1) in FINAL_STATES,
                                   timeout=300, poll=0.2, what="rank 1 process")
    assert isinstance(found, tuple), _why(slurm_cluster, run_dir, job1)  # else: the job ended first
    proc, node = found
    assert node == "node2"
    slurm_cluster.wait_for(lambda: _latest(run_dir) or not proc.is_running(), timeout=300, poll=0.02,
                           what="first checkpoint")
    assert proc.is_running() and _latest(run_dir), _why(slurm_cluster, run_dir, job1)
    proc.kill()
    t0 = time.monotonic()
    state = slurm_cluster.wait(job1, timeout=60)
    elapsed = time.monotonic() - t0
    tag1 = _latest(run_dir)
    print(f"SIGKILL rank 1 (node2, pid {proc.pid}) at {tag1} -> job {state} in {elapsed:.1f} s")
    assert state == "FAILED" and elapsed < 60, _why(slurm_cluster, run_dir, job1)
    step1 = int(tag1.removeprefix("global_step"))
    assert step1 + REAL_SAVE_EVERY < REAL_STEPS, f"killed too late ({tag1}): nothing left to resume"
    killed1 = _losses(run_dir)
    assert killed1 and max(killed1) < REAL_STEPS
    assert all(killed1[s] == reference[s] for s in killed1), (killed1, reference)

    # 2. Resubmit: resumes from tag1, then rank 0 dies while saving the next checkpoint.
    kill_step = step1 + REAL_SAVE_EVERY
    inject = str(Path(__file__).parent / "inject")  # test-only fault injection (tests/inject/sitecustomize.py)
    job2 = _submit_real(slurm_cluster, real_train_inputs, run_dir, *flags,
                        env={"UPCYCLE_DS_TEST_KILL_IN_SAVE": str(kill_step),
                             "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")]))})
    t0 = time.monotonic()
    state = slurm_cluster.wait(job2, timeout=300)
    logs = _real_logs(slurm_cluster, run_dir, job2)
    assert state == "FAILED", _why(slurm_cluster, run_dir, job2)
    print(f"UPCYCLE_DS_TEST_KILL_IN_SAVE={kill_step}: job {state} after {time.monotonic() - t0:.1f} s")
    assert f"resumed from {run_dir / 'checkpoints'}/{tag1} at step {step1}" in logs[0], logs[0][-3000:]
    assert _latest(run_dir) == tag1  # the interrupted save was never committed...
    assert (run_dir / "checkpoints" / f"global_step{kill_step}" / "rng_rank0.pt").is_file()  # ...rank 0's files were
    killed2 = _losses(run_dir)
    assert sorted(killed2) == list(range(1, kill_step + 1))
    assert killed2 == {s: reference[s] for s in killed2}

    # 3. Resubmit: resumes from tag1 again (the previous checkpoint is loadable) and finishes the run.
    job3 = _submit_real(slurm_cluster, real_train_inputs, run_dir, *flags)
    state = slurm_cluster.wait(job3, timeout=300)
    logs = _real_logs(slurm_cluster, run_dir, job3)
    assert state == "COMPLETED", _why(slurm_cluster, run_dir, job3)
    assert f"resumed from {run_dir / 'checkpoints'}/{tag1} at step {step1}" in logs[0], logs[0][-3000:]
    assert _latest(run_dir) == f"global_step{REAL_STEPS}"
    assert _losses(run_dir) == reference
    batch_log = slurm_cluster.read_log(tmp_path / "batch-run.log")
    assert batch_log.count("fresh start") == 1 and batch_log.count("--resume") == 2
    assert f"job {job3} done" in batch_log
    assert f"job {job1} done" not in batch_log and f"job {job2} done" not in batch_log


@pytest.mark.slow
def test_real_train_stops_before_time_limit_requeues_and_continues_on_one_node(slurm_cluster, real_train_inputs,
                                                                                real_reference, tmp_path):
    """Save before the time limit, requeue, continue -- on fewer nodes.

    The job asks for 2 nodes x 1 rank (ep 1: ZeRO-2 partitions over the 2 ranks), --time=2 and --signal=B:USR1@90,
    so Slurm signals the batch script at its first time-limit check (within 30 s). Each step of this first start is
    slowed to 5 s (tests/inject: the run must still be training then). The script passes USR1 on to the ranks, they
    save at the next logging step, and the script requeues the job. While the requeued job is held, the test shrinks
    it to 1 node (as an admin or a smaller free allocation would): it restarts with 1 rank, resumes elastically
    (grad accum 1 -> 2 keeps the global batch) and finishes all 8 steps with the losses of the uninterrupted 2-rank
    reference (ep 2 there: same math, another summation order; 1e-5 relative). --keep-last 2 holds across the
    requeue. Both starts log to one W&B run (offline: two folders with the run dir's one run id, the second a
    resume, together every step once with the losses of metrics.jsonl)."""
    _, _, reference = real_reference
    run_dir = tmp_path / "run"
    inject = str(Path(__file__).parent / "inject")
    config, base_env = real_train_inputs
    job = slurm_cluster.submit(
        REPO / "slurm" / "train.sbatch", config, run_dir, "--ep-size", "1", "--keep-last", "2",
        env={**base_env, "UPCYCLE_DS_TEST_STEP_SLEEP": "5",
                         "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")]))},
        sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=2",
                     "--signal=B:USR1@90", f"--output={tmp_path}/batch.log"])
    t0 = time.monotonic()
    slurm_cluster.wait_for(lambda: slurm_cluster.job(job)["Restarts"] == "1" or slurm_cluster.state(job) in
                           FINAL_STATES, timeout=150, poll=0.2, what="requeue")
    info = slurm_cluster.job(job)
    batch_log = slurm_cluster.read_log(tmp_path / "batch.log")
    assert info["Restarts"] == "1", batch_log + str(info) + "\n".join(_real_logs(slurm_cluster, run_dir, job))
    print(f"signalled, saved and requeued after {time.monotonic() - t0:.1f} s")
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1", "MinCPUsNode=1",
                      "TimeLimit=10")
    state = slurm_cluster.wait(job, timeout=300)
    batch_log = slurm_cluster.read_log(tmp_path / "batch.log")
    first = _real_logs(slurm_cluster, run_dir, job)
    second = slurm_cluster.read_log(run_dir / "logs" / f"train-{job}.1-rank0.log")
    assert state == "COMPLETED", batch_log + str(slurm_cluster.job(job)) + second[-3000:]

    stopped = re.search(r"stopped before the time limit at step (\d+) with a checkpoint saved; requeued", batch_log)
    assert stopped, batch_log
    step = int(stopped.group(1))
    assert 1 <= step < REAL_STEPS
    assert f"stopping at step {step} on SIGUSR1: checkpoint global_step{step} saved" in first[0], first[0][-3000:]
    assert f"job {job} (restart 0): 2 ranks on 2 nodes" in batch_log
    assert f"job {job} (restart 1): 1 ranks on 1 nodes" in batch_log and "--resume" in batch_log
    assert f"job {job} done" in batch_log
    assert "--grad-accum 1 -> 2" in second, second[-3000:]
    assert (f"resumed from {run_dir / 'checkpoints'}/global_step{step} at step {step} on another layout "
            f"(world_size 2 -> 1)") in second, second[-3000:]

    got = _losses(run_dir)
    assert sorted(got) == list(range(1, REAL_STEPS + 1))
    diffs = {s: abs(got[s] - reference[s]) / abs(reference[s]) for s in got}
    assert max(diffs.values()) <= 1e-5, {s: (got[s], reference[s], f"{d:.1e}") for s, d in diffs.items()}
    # --keep-last 2 across the requeue: the last checkpoint and the newest before it (every 2 steps, or the stop's)
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*"))
    assert _latest(run_dir) == f"global_step{REAL_STEPS}"
    assert tags == sorted({f"global_step{REAL_STEPS}", f"global_step{max(REAL_STEPS - REAL_SAVE_EVERY, step)}"}), tags

    from wandb_read import find_wandb_files, read_offline_run

    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    starts = [read_offline_run(f) for f in find_wandb_files(run_dir / "wandb")]
    assert [(w["run"]["id"], w["run"]["resume"], w["exit_code"]) for w in starts] == [(run_id, True, 0)] * 2
    logged = [{row["_step"]: row["train/loss"] for row in w["history"] if "train/loss" in row} for w in starts]
    assert sorted(logged[0]) == list(range(1, step + 1)) and sorted(logged[1]) == list(range(step + 1, REAL_STEPS + 1))
    assert {**logged[0], **logged[1]} == got
    assert f"W&B offline run {run_id} in " in first[0] and f"W&B offline run {run_id} in " in second
