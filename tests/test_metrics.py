"""What a training run reports, in-process: the real-token count of packed micro-batches (padding excluded even
where the pad id is also a real token), carried through the `StepMeter` window into tokens/s and MFU, perplexity
of the eval loss, the checkpoint line. tests/test_train.py checks the same numbers in a real 2-rank run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from upcycle_ds.data.pack import PackedDataset
from upcycle_ds.train.metrics import StepMeter, checkpoint_line, eval_scalars, window_scalars

PAD = 7  # also a real token of the samples below (as when the pad token is the EOS)


def samples(lengths: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for n in lengths:
        ids = rng.integers(0, 20, n)
        ids[-1] = PAD
        out.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return out


def test_num_tokens_counts_each_rows_samples_not_its_padding():
    lengths = [5, 9, 3, 12, 1, 7, 16, 2]
    ds = PackedDataset.from_examples(samples(lengths), max_length=16, pad_id=PAD)
    b = ds.batch(list(range(len(ds))) + [-1])  # -1: an all-padding row
    want = [sum(lengths[i] for i in ds.row_samples[r]) for r in range(len(ds))] + [0]
    assert b["num_tokens"].tolist() == want and b["num_tokens"].dtype == torch.int64
    assert sum(want) == sum(lengths) == ds.num_tokens
    assert (b["input_ids"] == PAD).sum(dim=1).tolist() != want  # counting pad ids would be wrong here


def test_window_throughput_and_mfu_come_from_real_tokens():
    meter = StepMeter([], 1, torch.device("cpu"))
    ds = PackedDataset.from_examples(samples([5, 9, 3, 12, 1, 7]), max_length=16, pad_id=PAD)
    real = 0
    for rows in ([0, 1], [2, -1]):
        b = ds.batch(rows)
        meter.add_micro_step(torch.tensor(2.0), tokens=b["num_tokens"])
        real += int(b["num_tokens"].sum())
    assert meter.pending_tokens() == real  # (a checkpoint between logging steps) the window is not consumed
    red = meter.reduce(steps=1)
    assert red.tokens == real < 4 * 16  # 4 rows of 16 positions, partly padding
    meter.reset()
    assert meter.pending_tokens() == 0
    out = window_scalars(red, steps=1, seconds=0.5, lr=1e-4, tokens_seen=1000 + real, epoch=0.25,
                         flops_per_token=6e9, devices=2, peak_tflops=989.0, max_mem_gib=3.5)
    assert out["tokens_per_s"] == pytest.approx(real / 0.5, rel=1e-12)
    assert out["mfu"] == pytest.approx(6e9 * real / 0.5 / (2 * 989e12), rel=1e-12)
    assert (out["tokens"], out["epoch"], out["loss"], out["step_time_s"]) == (1000 + real, 0.25, 2.0, 0.5)
    assert "mfu" not in window_scalars(red, steps=1, seconds=0.5, lr=1e-4, tokens_seen=0, epoch=0.0,
                                       flops_per_token=6e9, devices=2, peak_tflops=None)


def test_eval_perplexity():
    assert eval_scalars(2.0) == {"eval/loss": 2.0, "eval/ppl": math.exp(2.0)}
    assert eval_scalars(1e4)["eval/ppl"] == math.inf


def test_checkpoint_line(tmp_path):
    tag = tmp_path / "global_step200"
    (tag / "sub").mkdir(parents=True)
    (tag / "a.pt").write_bytes(b"x" * 1_500_000)
    (tag / "sub" / "b.pt").write_bytes(b"y" * 20_000_000)
    assert checkpoint_line(tag, 41.26) == "checkpoint global_step200 saved in 41.3 s (0.02 GB)"  # 21.5 MB
