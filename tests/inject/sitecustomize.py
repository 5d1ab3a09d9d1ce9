"""Test-only fault injection, loaded by Python at start-up when this directory is on PYTHONPATH (never by the
product). Each behaviour is switched on by an environment variable that only tests set:

UPCYCLE_DS_TEST_KILL_IN_SAVE=STEP   SIGKILL rank 0 during the save of STEP: after every file of that checkpoint is
                                    written, before `latest` is committed (the window a crash during a save hits).
UPCYCLE_DS_TEST_SLOW_WRITE=SECONDS  rank 0 sleeps this long before writing each shard of an HF export (a slow
                                    filesystem), while the other ranks wait for it.
UPCYCLE_DS_TEST_STEP_SLEEP=SECONDS  every rank sleeps this long after each optimizer step (a slow model), in the first
                                    start of a Slurm job only (SLURM_RESTART_COUNT unset or 0).
UPCYCLE_DS_TEST_FAIL_IN_LOAD=RANK   that rank raises an OSError when it starts loading a checkpoint on --resume (as
                                    DeepSpeed does for a file it cannot read), while the other ranks load and train.

The patches are applied right after the product module is imported (an import hook), so nothing is imported early.
"""

import importlib.abc
import importlib.util
import os
import sys


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _patch_checkpoint(mod) -> None:
    step = int(os.environ["UPCYCLE_DS_TEST_KILL_IN_SAVE"])
    save, wait = mod.save, mod.wait_for_io
    current = {}

    def save_hook(engine, ckpt_dir, s, *a, **kw):
        current["step"] = s
        return save(engine, ckpt_dir, s, *a, **kw)

    def wait_hook():
        wait()
        if current.get("step") == step and _rank() == 0:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    mod.save, mod.wait_for_io = save_hook, wait_hook


def _patch_load(mod) -> None:
    rank = int(os.environ["UPCYCLE_DS_TEST_FAIL_IN_LOAD"])
    load = mod.load

    def failing_load(*a, **kw):
        if _rank() == rank:
            raise FileNotFoundError(2, "No such file or directory (injected)", "layer_0_expert_1_mp_rank_00_model_states.pt")
        return load(*a, **kw)

    mod.load = failing_load


def _patch_export(mod) -> None:
    seconds = float(os.environ["UPCYCLE_DS_TEST_SLOW_WRITE"])
    write_shard = mod.write_shard

    def slow(*a, **kw):
        if _rank() == 0:
            import time

            time.sleep(seconds)
        return write_shard(*a, **kw)

    mod.write_shard = slow


def _patch_trainer(mod) -> None:
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    seconds = float(os.environ["UPCYCLE_DS_TEST_STEP_SLEEP"])
    step = mod.Trainer.step

    def slow_step(self, *a, **kw):
        out = step(self, *a, **kw)
        import time

        time.sleep(seconds)
        return out

    mod.Trainer.step = slow_step


PATCHES = [  # (module, environment variable that switches the patch on, patch)
    ("upcycle_ds.train.checkpoint", "UPCYCLE_DS_TEST_KILL_IN_SAVE", _patch_checkpoint),
    ("upcycle_ds.train.checkpoint", "UPCYCLE_DS_TEST_FAIL_IN_LOAD", _patch_load),
    ("upcycle_ds.train.export", "UPCYCLE_DS_TEST_SLOW_WRITE", _patch_export),
    ("upcycle_ds.train.trainer", "UPCYCLE_DS_TEST_STEP_SLEEP", _patch_trainer),
]


def _active(name: str) -> list:
    return [patch for module, var, patch in PATCHES if module == name and os.environ.get(var)]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patches = _active(name)
        if not patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if any(os.environ.get(var) for _, var, _ in PATCHES):
    sys.meta_path.insert(0, _Finder())
