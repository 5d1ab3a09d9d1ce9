"""The pure parts of resuming (no ranks): checkpoint retention across requeues, the data position and the global
batch carried to another layout. The runs that use them are in tests/test_elastic.py and tests/test_slurm.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from upcycle_ds.errors import UserError
from upcycle_ds.train import checkpoint, elastic


def make_tags(ckpt: Path, complete: list[int], partial: list[int] = (), latest: int | None = None) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    for s in complete:
        (ckpt / f"global_step{s}").mkdir()
        (ckpt / f"global_step{s}" / checkpoint.MODEL_STATES).write_bytes(b"x")
    for s in partial:  # a save killed before its model file was written
        (ckpt / f"global_step{s}").mkdir()
        (ckpt / f"global_step{s}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if latest is not None:
        (ckpt / "latest").write_text(f"global_step{latest}")


def tags(ckpt: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step")) for p in ckpt.glob("global_step*"))


def test_prune_keeps_latest_and_the_newest_before_it(tmp_path):
    make_tags(tmp_path, [2, 4, 6, 8], latest=8)
    assert checkpoint.prune(tmp_path, 2) == ["global_step2", "global_step4"]
    assert tags(tmp_path) == [6, 8]
    assert checkpoint.prune(tmp_path, 1) == ["global_step6"] and tags(tmp_path) == [8]


def test_prune_across_a_requeue_never_deletes_latest_and_drops_leftovers(tmp_path):
    """Run 1 saved 2, 4 and was killed saving 6 (partial); the requeued run resumed from 4 (`latest`), and a stale
    complete-looking 10 from an older run lies around: after run 2 commits 6, keep-last 2 keeps 6 and 4 only."""
    make_tags(tmp_path, [2, 4, 10], partial=[6], latest=4)
    assert checkpoint.discard_uncommitted(tmp_path) == ["global_step10", "global_step6"]  # on resume, rank 0
    assert tags(tmp_path) == [2, 4]
    make_tags(tmp_path, [6], latest=6)  # run 2 saved and committed 6
    assert checkpoint.prune(tmp_path, 2) == ["global_step2"]
    assert tags(tmp_path) == [4, 6] and (tmp_path / "latest").read_text() == "global_step6"


def test_prune_with_latest_older_than_other_tags_keeps_latest(tmp_path):
    make_tags(tmp_path, [2, 4, 6], partial=[3], latest=2)  # `latest` edited by hand to an older checkpoint
    checkpoint.prune(tmp_path, 1)
    assert tags(tmp_path) == [2]
    make_tags(tmp_path / "none", [2, 4])
    assert checkpoint.prune(tmp_path / "none", 1) == [] and tags(tmp_path / "none") == [2, 4]  # no latest: keep all


LAYOUT = {"world_size": 2, "ep_size": 2, "zero_stage": 2, "dtype": "fp32", "num_experts": 4, "micro_batch_size": 2,
          "grad_accum": 1}


def test_position_is_the_same_rows_on_any_layout():
    # 2 ranks x micro batch 2, 6 micro-batches each into epoch 1 = 24 rows = 12 micro-batches of 2 on 1 rank
    now = {**LAYOUT, "world_size": 1, "ep_size": 1, "grad_accum": 2}
    state = {"step": 9, "epoch": 1, "batch_in_epoch": 6}
    assert elastic.position(state, LAYOUT, now) == {"step": 9, "epoch": 1, "batch_in_epoch": 12}
    assert elastic.position(state, LAYOUT, {**LAYOUT, "world_size": 4, "micro_batch_size": 1}) == {
        "step": 9, "epoch": 1, "batch_in_epoch": 6}
    with pytest.raises(UserError, match="not a whole number of micro-batches"):
        elastic.position(state, LAYOUT, {**LAYOUT, "world_size": 1, "micro_batch_size": 5})


def test_grad_accum_keeps_the_checkpoints_global_batch():
    args = SimpleNamespace(micro_batch_size=2, grad_accum=1, global_batch_size=None)
    assert "--grad-accum 1 -> 4" in elastic.adapt_grad_accum(args, 1, {**LAYOUT, "grad_accum": 2})
    assert args.grad_accum == 4  # 2 x 2 x 2 rows on 1 rank x micro batch 2
    assert elastic.adapt_grad_accum(args, 1, {**LAYOUT, "grad_accum": 2}) is None  # already kept
    with pytest.raises(UserError, match="cannot make"):
        elastic.adapt_grad_accum(SimpleNamespace(micro_batch_size=3, grad_accum=1, global_batch_size=None), 1, LAYOUT)
    with pytest.raises(UserError, match="--global-batch-size 8"):
        elastic.adapt_grad_accum(SimpleNamespace(micro_batch_size=2, grad_accum=1, global_batch_size=8), 1, LAYOUT)


def test_layout_differences_name_what_changed():
    assert elastic.differences(LAYOUT, LAYOUT) == []
    now = {**LAYOUT, "world_size": 1, "ep_size": 1, "dtype": "bf16", "grad_accum": 2}
    assert elastic.differences(LAYOUT, now) == ["world_size 2 -> 1", "ep_size 2 -> 1", "dtype fp32 -> bf16"]
    assert elastic.rng_seed(0, 4, 1) == elastic.rng_seed(0, 4, 1) != elastic.rng_seed(0, 4, 0)
