"""Which accelerator and which GPU a rank gets, decided on this CPU machine from the variables a GPU machine, a
launcher or a Slurm task would give it (no GPU needed: the choices are functions of the environment and of the
device count torch reports, which the tests pass in).

- The accelerator comes from the hardware: a stale DS_ACCELERATOR=cpu on a CUDA machine is overridden by the
  launcher, with a note in its start line (DeepSpeed would otherwise keep the model on the CPU while batches go to
  the GPU); a rank started without our launcher refuses it with one line, checked against DeepSpeed's own choice.
  Test children never carry the CPU session's DS_ACCELERATOR onto a GPU machine. (The launcher end to end under a
  stale value: tests/test_plan.py::test_planned_train_command_runs_with_the_planned_settings.)
- The process group is bound to the rank's own GPU, `LOCAL_RANK % visible devices`: with one GPU per Slurm task
  (`--gpus-per-task=1`, CUDA_VISIBLE_DEVICES holding one id) task 5 of a node binds cuda:0 — DeepSpeed 0.19's own
  `init_process_group` would bind cuda:$LOCAL_RANK = cuda:5, which does not exist there.
"""

from __future__ import annotations

import pytest
import torch

from cli_proc import cli_env
from upcycle_ds.errors import UserError
from upcycle_ds.launch.accelerator import check_deepspeed, choose
from upcycle_ds.launch.distributed import local_device_index, process_group_device


@pytest.mark.parametrize("given, devices, name, overridden", [
    (None, 8, "cuda", False), (None, 0, "cpu", False),
    ("cpu", 8, "cuda", True),   # the stale value of a CPU shell or test session on a GPU machine
    ("cuda", 0, "cpu", True),   # a GPU job's environment on a CPU machine
    ("cuda", 8, "cuda", False), ("cpu", 0, "cpu", False),
    ("npu", 0, "npu", False),   # hardware we do not know: DeepSpeed's value is kept
])
def test_accelerator_comes_from_the_hardware(given, devices, name, overridden):
    env = {} if given is None else {"DS_ACCELERATOR": given}
    acc = choose(env, devices)
    assert acc.name == name
    assert bool(acc.note) == overridden
    line = acc.describe()
    assert line.startswith(f"accelerator {name} (")
    if overridden:
        assert f"DS_ACCELERATOR={given} in the environment overridden" in line, line


def test_a_rank_refuses_deepspeeds_cpu_accelerator_on_a_cuda_machine():
    """This session's DeepSpeed picked its CPU accelerator (DS_ACCELERATOR=cpu, tests/conftest.py): right for a
    machine without CUDA, refused where 8 CUDA devices are visible."""
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"
    check_deepspeed(devices=0)
    with pytest.raises(UserError, match=r"DeepSpeed chose its cpu accelerator \(DS_ACCELERATOR=cpu\) but torch sees "
                                        r"8 CUDA devices: the model would stay on the CPU; unset DS_ACCELERATOR"):
        check_deepspeed(devices=8)


def test_test_children_do_not_inherit_the_cpu_accelerator_on_a_gpu_machine(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RANK", "3")
    assert "DS_ACCELERATOR" not in cli_env(cuda_devices=8)
    assert cli_env(cuda_devices=0)["DS_ACCELERATOR"] == "cpu"
    assert "RANK" not in cli_env(cuda_devices=0)  # a child is a job of its own


# task 5 of `srun` in `sbatch --nodes=1 --ntasks-per-node=8 --gpus-per-task=1` (the sbatch scripts export
# MASTER_ADDR / MASTER_PORT once per job); Slurm sets CUDA_VISIBLE_DEVICES to that task's one GPU
SLURM_TASK = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu01", "SLURM_NODEID": "0", "SLURM_NTASKS": "8",
              "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
              "SLURM_STEP_TASKS_PER_NODE": "8", "SLURM_STEP_NODELIST": "gpu01", "CUDA_VISIBLE_DEVICES": "5",
              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "21234"}


@pytest.mark.parametrize("visible, index", [(1, 0), (8, 5), (2, 1)], ids=["gpus-per-task=1", "gpus-per-node=8",
                                                                        "gpus-per-task=2"])
def test_process_group_binds_the_tasks_own_gpu(visible, index):
    assert process_group_device(SLURM_TASK, visible) == torch.device("cuda", index)
    assert local_device_index(5, visible) == index


def test_no_device_binding_on_cpu_or_for_a_single_rank():
    assert process_group_device(SLURM_TASK, 0) is None
    single = {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert process_group_device(single, 1) is None
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert process_group_device(launcher, 2) == torch.device("cuda", 1)
