"""Expert-load tracking: what `Tracker` logs is checked against wandb's own offline run log (`.wandb`, parsed by
`wandb_read`), against `metrics.jsonl`, and against the heatmap's pixels decoded through matplotlib's colormap.
Also: the W&B environment variables a user sets apply unless a flag is given; the collapse warning; a resumed run
dir continues the same W&B run; the run's files grow with the number of heatmaps only."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import matplotlib
import matplotlib.font_manager  # noqa: F401  (load matplotlib's font cache before HOME is redirected below)
import numpy as np
import pytest
from PIL import Image

from upcycle_ds.errors import UserError
from upcycle_ds.train.tracking import LayerStats, Tracker, read_heatmap_meta
from wandb_read import BLOCK_LEN, find_wandb_file, find_wandb_files, read_offline_run

WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_MODE", "WANDB_SILENT",
              "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_RUN_ID")
LAYER_IDS = [1, 3]
# per step: per MoE layer (tokens_per_expert, aux, z, entropy, dropped)
STEPS = {
    0: [([10, 20, 30, 40], 1.07, 0.011, 1.28, 0.0), (np.array([5, 5, 5, 85]), 1.61, 0.021, 0.83, 0.125)],
    1: [([25, 25, 25, 25], 1.0, 0.009, 1.386, 0.0), (np.array([0, 7, 13, 100]), 1.9, 0.03, 0.5, 0.25)],
    2: [([1, 2, 3, 1000], 3.7, 0.5, 0.1, 0.0), (np.array([40, 30, 20, 10]), 1.2, 0.015, 1.25, 0.0)],
}
EVAL_LOAD = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.15, 0.05]])
CONFIG = {"lr": 3e-4, "moe": {"num_experts": 4, "top_k": 2}, "note": "x" * 40_000}  # > 32 KiB: spans blocks


def layer_stats(step: int) -> list[LayerStats]:
    return [LayerStats(layer=L, tokens_per_expert=t, aux_loss=a, z_loss=z, entropy=h, dropped_fraction=d)
            for L, (t, a, z, h, d) in zip(LAYER_IDS, STEPS[step])]


def scalars(step: int) -> dict[str, float]:
    """What the training loop passes (no namespace: logged as train/...)."""
    return {"loss": 4.0 - 0.5 * step, "lr": 1e-4 * (step + 1), "tokens_per_s": 1000.0 + step}


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One real offline run, HOME and the working dir pointed at empty dirs to catch files written outside."""
    root = tmp_path_factory.mktemp("tracking")
    home, cwd, run_dir = root / "home", root / "cwd", root / "run"
    home.mkdir()
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for var in WANDB_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(home))
        mp.chdir(cwd)
        warnings = []
        tracker = Tracker(run_dir, CONFIG, name="tiny-test", heatmap_every=2, collapse_factor=2.0, collapse_steps=2,
                          warn=warnings.append)
        where, warnings[:] = warnings[:], []
        for step in STEPS:
            tracker.log_step(step, scalars(step), layer_stats(step))
        png = tracker.log_eval(3, {"loss": 2.25, "eval/ppl": 9.49}, EVAL_LOAD, LAYER_IDS)
        tracker.finish()
        tracker.finish()  # idempotent
        env_after = {var: os.environ.get(var) for var in WANDB_VARS}
    return {"run_dir": run_dir, "png": png, "home": home, "cwd": cwd, "env_after": env_after,
            "wandb": read_offline_run(run_dir), "warnings": warnings, "where": where}


def shares(tokens) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.float64)
    return tokens / tokens.sum()


def test_history_has_a_handful_of_scalars_per_layer(offline_run):
    hist = {row["_step"]: row for row in offline_run["wandb"]["history"]}
    assert sorted(hist) == [0, 1, 2, 3]
    for step in STEPS:
        row = hist[step]
        for k, v in scalars(step).items():
            assert row[f"train/{k}"] == pytest.approx(v, rel=1e-12) and k not in row
        for L, (tokens, aux, z, ent, dropped) in zip(LAYER_IDS, STEPS[step]):
            f = shares(tokens)
            # 2 layers x 4 experts <= expert_shares_max (256): each expert's share is a plain W&B scalar
            assert [row[f"moe/layer{L}/expert{e}_share"] for e in range(4)] == pytest.approx(f.tolist(), rel=1e-12)
            assert row[f"moe/layer{L}/max_share"] == pytest.approx(f.max(), rel=1e-12)
            assert row[f"moe/layer{L}/min_share"] == pytest.approx(f.min(), rel=1e-12)
            assert row[f"moe/layer{L}/imbalance"] == pytest.approx(4 * f.max(), rel=1e-12)
            nz = f[f > 0]
            assert row[f"moe/layer{L}/load_entropy"] == pytest.approx(-(nz * np.log(nz)).sum() / np.log(4), rel=1e-12)
            assert row[f"moe/layer{L}/starved_frac"] == (f < 1 / 16).mean()
            assert row[f"moe/layer{L}/aux_loss"] == pytest.approx(aux, rel=1e-12)
            assert row[f"moe/layer{L}/z_loss"] == pytest.approx(z, rel=1e-12)
            assert row[f"moe/layer{L}/entropy"] == pytest.approx(ent, rel=1e-12)
            assert row[f"moe/layer{L}/dropped_frac"] == pytest.approx(dropped, rel=1e-12)
        assert not any(k.startswith("moe/layer2/") for k in row)  # only the MoE layers given


def test_load_heatmap_at_the_heatmap_interval_equals_metrics_jsonl(offline_run):
    """heatmap_every=2: pictures at steps 0 and 2, each the load since the previous heatmap (step 2: steps 1 + 2
    together), as metrics.jsonl records it; W&B holds them as images and nothing else (no tables)."""
    hist = {row["_step"]: row for row in offline_run["wandb"]["history"]}
    lines = {r["step"]: r for r in map(json.loads, (offline_run["run_dir"] / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r}
    assert [s for s in lines if "moe/train_load" in lines[s]] == [0, 2]
    assert [s for s in hist if "moe/load_heatmap_train" in hist[s]] == [0, 2]
    files = Path(offline_run["wandb"]["run"]["files_dir"])
    for s in (0, 2):
        image = hist[s]["moe/load_heatmap_train"]
        png = offline_run["run_dir"] / f"load_heatmap_train_step{s}.png"
        assert image["_type"] == "image-file" and (files / image["path"]).read_bytes() == png.read_bytes()
    for i, L in enumerate(LAYER_IDS):
        want0 = shares(STEPS[0][i][0])
        want2 = shares(np.asarray(STEPS[1][i][0], dtype=np.float64) + np.asarray(STEPS[2][i][0]))
        assert lines[2]["moe/train_load"]["fractions"][i] == pytest.approx(want2.tolist(), rel=1e-12)
        assert lines[0]["moe/train_load"]["fractions"][i] == pytest.approx(want0.tolist(), rel=1e-12)
        png = offline_run["run_dir"] / "load_heatmap_train_step2.png"
        assert read_heatmap_meta(png)["load"][i] == pytest.approx(want2.tolist(), rel=1e-12)
    assert not any(isinstance(v, dict) and v.get("_type") != "image-file" for row in hist.values() for v in row.values())


def test_collapse_warning_once_per_layer(offline_run):
    """collapse_factor 2, 2 steps: layer 3 has one expert above 50% at steps 0 and 1 -> one warning; layer 1 only
    at step 2 (one step) -> none."""
    assert len(offline_run["warnings"]) == 1, offline_run["warnings"]
    assert "MoE layer 3 may be collapsing" in offline_run["warnings"][0] and "expert 3" in offline_run["warnings"][0]


def test_eval_row_has_scalars_and_the_heatmap_image(offline_run):
    row = next(r for r in offline_run["wandb"]["history"] if r["_step"] == 3)
    assert row["eval/loss"] == 2.25 and row["eval/ppl"] == 9.49  # prefixed once, not twice
    image = row["moe/load_heatmap"]
    assert image["_type"] == "image-file" and image["format"] == "png"
    media = Path(offline_run["wandb"]["run"]["files_dir"]) / image["path"]
    png_bytes = offline_run["png"].read_bytes()
    assert media.read_bytes() == png_bytes
    assert image["sha256"] == hashlib.sha256(png_bytes).hexdigest()
    with Image.open(offline_run["png"]) as img:
        assert (img.width, img.height) == (image["width"], image["height"])


def test_config_summary_and_exit(offline_run):
    run = offline_run["wandb"]
    assert run["config"]["lr"] == CONFIG["lr"] and run["config"]["moe"] == CONFIG["moe"]
    assert run["config"]["note"] == CONFIG["note"]
    assert run["run"]["name"] == "tiny-test" and run["run"]["project"] == "upcycle_ds"
    assert run["summary"]["train/loss"] == scalars(2)["loss"] and run["summary"]["_step"] == 3
    assert run["exit_code"] == 0
    assert find_wandb_file(offline_run["run_dir"]).stat().st_size > BLOCK_LEN  # the multi-block path was read


def test_metrics_jsonl_matches_wandb_history(offline_run):
    lines = [json.loads(l) for l in (offline_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [0, 1, 2, 3]
    hist = {row["_step"]: row for row in offline_run["wandb"]["history"]}
    for rec in lines[:3]:  # the same names and values in both
        logged = {k: v for k, v in hist[rec["step"]].items() if not k.startswith("_") and not isinstance(v, dict)}
        ours = {k: v for k, v in rec.items() if k != "step" and not isinstance(v, dict)}
        assert ours == pytest.approx(logged, rel=1e-12) and len(ours) == len(logged)
        assert all(k.startswith(("train/", "moe/")) for k in ours)
        for i, L in enumerate(LAYER_IDS):
            got = [rec[f"moe/layer{L}/expert{e}_share"] for e in range(4)]
            assert got == pytest.approx(shares(STEPS[rec["step"]][i][0]).tolist(), rel=1e-12)
    ev = lines[3]
    assert ev["eval/loss"] == 2.25 and ev["moe/load_heatmap"] == offline_run["png"].name
    assert ev["moe/load"] == {"layer_ids": LAYER_IDS, "fractions": EVAL_LOAD.tolist()}


def test_heatmap_pixels_show_one_row_per_moe_layer(offline_run):
    png = offline_run["png"]
    assert png == offline_run["run_dir"] / "load_heatmap_step3.png"
    meta = read_heatmap_meta(png)
    assert meta["layer_ids"] == LAYER_IDS and meta["load"] == EVAL_LOAD.tolist()
    # Decode the colour of each cell back to a value through the colormap and compare with the matrix.
    table = matplotlib.colormaps[meta["cmap"]](np.linspace(0, 1, 256))[:, :3] * 255
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    left, top, right, bottom = meta["axes_px"]
    n_rows, n_cols = EVAL_LOAD.shape
    cell_w, cell_h = (right - left) / n_cols, (bottom - top) / n_rows
    decoded = np.zeros_like(EVAL_LOAD)
    for i in range(n_rows):
        for e in range(n_cols):
            # a point inside the cell, off its centre (where the value is written) and off its edges
            px = rgb[int(top + (i + 0.2) * cell_h), int(left + (e + 0.2) * cell_w)]
            idx = np.argmin(((table - px) ** 2).sum(axis=1))
            decoded[i, e] = meta["vmin"] + idx / 255 * (meta["vmax"] - meta["vmin"])
    np.testing.assert_allclose(decoded, EVAL_LOAD, atol=1.5 / 255 * meta["vmax"])
    # just outside the heatmap (above its top edge) is not a colormap cell
    above = rgb[int(top) - 3, int(left + 0.2 * cell_w)]
    assert above.tolist() == [255, 255, 255]


def test_nothing_written_outside_the_run_dir(offline_run):
    assert all_files(offline_run["home"]) == []
    assert all_files(offline_run["cwd"]) == []
    assert all(v is None for v in offline_run["env_after"].values())  # env restored by finish()
    wandb_dir = offline_run["run_dir"] / "wandb"
    assert list(wandb_dir.glob("offline-run-*/run-*.wandb"))
    assert list((wandb_dir / ".cache").rglob("core-debug-*.log"))  # wandb's own service log landed in the run


def test_corrupted_log_is_rejected(offline_run, tmp_path):
    bad = tmp_path / "run-bad.wandb"
    data = bytearray(find_wandb_file(offline_run["run_dir"]).read_bytes())
    data[BLOCK_LEN + 100] ^= 0xFF  # a byte inside the second block
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="CRC mismatch"):
        read_offline_run(bad)
    bad.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(UserError, match="not a W&B run log"):
        read_offline_run(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .wandb run log"):
        read_offline_run(tmp_path / "empty")


def test_disabled_mode_writes_metrics_jsonl_and_no_wandb_dir(tmp_path, monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, CONFIG, mode="disabled", heatmap_every=0)
    for step in STEPS:
        tracker.log_step(step, scalars(step), layer_stats(step))
    png = tracker.log_eval(3, {"loss": 2.25}, EVAL_LOAD, LAYER_IDS)
    tracker.finish()
    assert sorted(p.name for p in run_dir.iterdir()) == ["load_heatmap_step3.png", "metrics.jsonl"]
    assert read_heatmap_meta(png)["load"] == EVAL_LOAD.tolist()
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [0, 1, 2, 3]
    rec = lines[1]
    assert rec["train/loss"] == 3.5
    assert [rec[f"moe/layer3/expert{e}_share"] for e in range(4)] == pytest.approx([0, 7 / 120, 13 / 120, 100 / 120])
    assert rec["moe/layer3/dropped_frac"] == 0.25
    assert not any(var in os.environ for var in WANDB_VARS)


def test_non_rank0_tracker_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, CONFIG, enabled=False)
    tracker.log_step(0, scalars(0), layer_stats(0))
    assert tracker.log_eval(0, {}, EVAL_LOAD, LAYER_IDS) is None
    tracker.finish()
    assert not run_dir.exists()


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="--wandb-mode must be one of offline, online, disabled"):
        Tracker(tmp_path / "run", {}, mode="offlin")
    tracker = Tracker(tmp_path / "run", {}, mode="disabled")
    with pytest.raises(ValueError, match="layer 1 given twice"):
        tracker.log_step(0, {}, layer_stats(0) + layer_stats(0)[:1])
    with pytest.raises(ValueError, match=r"must be \[len\(layer_ids\)=2, E\]"):
        tracker.log_eval(0, {}, EVAL_LOAD[:1], LAYER_IDS)


def test_context_manager_records_a_failed_run(tmp_path, monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="diverged"):
        with Tracker(run_dir, {"lr": 1.0}) as tracker:
            tracker.log_step(0, {"loss": float("nan")}, layer_stats(0))
            raise RuntimeError("loss diverged")
    run = read_offline_run(run_dir)
    assert run["exit_code"] == 1
    assert np.isnan(run["history"][0]["train/loss"])
    assert np.isnan(json.loads((run_dir / "metrics.jsonl").read_text())["train/loss"])


@pytest.mark.parametrize("var,value,key,want", [
    ("WANDB_PROJECT", "myproj", "project", "myproj"),
    ("WANDB_ENTITY", "myteam", "entity", "myteam"),
    ("WANDB_RUN_GROUP", "sweep-7", "group", "sweep-7"),
    ("WANDB_TAGS", "moe, upcycled", "tags", ["moe", "upcycled"]),
    ("WANDB_NAME", "job-7", "name", "job-7"),
])
def test_wandb_environment_applies_unless_a_flag_is_given(tmp_path, monkeypatch, var, value, key, want):
    for v in WANDB_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    with Tracker(tmp_path / "env", {}) as tracker:  # offline: the run record says what wandb was given
        tracker.log_step(0, {"loss": 1.0}, [])
    assert read_offline_run(tmp_path / "env")["run"][key] == want
    flag = {"project": "flagproj", "entity": "flagteam", "group": "flaggroup", "tags": ["flag"], "name": "flagname"}[key]
    with Tracker(tmp_path / "flag", {}, **{key: flag}) as tracker:
        tracker.log_step(0, {"loss": 1.0}, [])
    assert read_offline_run(tmp_path / "flag")["run"][key] == flag


def test_wandb_mode_from_the_environment(tmp_path, monkeypatch):
    for v in WANDB_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "myproj")
    with Tracker(tmp_path / "off", {}) as tracker:
        tracker.log_step(0, {"loss": 1.0}, [])
    assert not (tmp_path / "off" / "wandb").exists()
    assert (tmp_path / "off" / "metrics.jsonl").is_file()
    with Tracker(tmp_path / "on", {}, mode="offline") as tracker:  # the flag wins over WANDB_MODE
        tracker.log_step(0, {"loss": 1.0}, [])
    assert read_offline_run(tmp_path / "on")["run"]["project"] == "myproj"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_PROJECT")
    with Tracker(tmp_path / "default", {}) as tracker:  # nothing set: offline, project upcycle_ds
        tracker.log_step(0, {"loss": 1.0}, [])
    assert read_offline_run(tmp_path / "default")["run"]["project"] == "upcycle_ds"


def test_where_the_run_went_is_printed_once(offline_run):
    run_id = offline_run["wandb"]["run"]["id"]
    folder = Path(offline_run["wandb"]["run"]["files_dir"]).parent
    assert offline_run["where"] == [
        f"W&B offline run {run_id} in {folder} (upload: wandb sync {folder.parent}/offline-run-*-{run_id}*); "
        f"metrics in {offline_run['run_dir'] / 'metrics.jsonl'}"]


def test_resumed_run_dir_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """Two starts of one run dir (a crash after step 3, a resume from the checkpoint of step 1) are one W&B run:
    the id kept in run_dir/wandb/run_id (WANDB_RUN_ID of the first start; the file wins later), name and group
    from WANDB_NAME / WANDB_RUN_GROUP, two offline folders that `wandb sync` of the printed glob uploads in order.
    A heatmap at every step: each start's files are its images and nothing else (O(heatmaps); the per-layer
    tables W&B's line_series re-logged at every heatmap grew with the square). The second start logs expert shares
    only within expert_shares_max (2 layers x 4 experts = 8 > 7: per-layer scalars only)."""
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_NAME", "job-7")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-3")
    monkeypatch.setenv("WANDB_RUN_ID", "first-id")
    run_dir = tmp_path / "run"
    printed = []
    segments = {0: [0, 1, 2, 3], 1: [2, 3, 4, 5]}
    for seg, steps in segments.items():
        with Tracker(run_dir, CONFIG, heatmap_every=1, expert_shares_max=8 - seg, warn=printed.append) as tracker:
            for step in steps:
                tracker.log_step(step, scalars(step % 3), layer_stats(step % 3))
        monkeypatch.setenv("WANDB_RUN_ID", "other-id")  # the kept id wins on every later start
    assert (run_dir / "wandb" / "run_id").read_text() == "first-id\n"
    folders = [p.parent for p in find_wandb_files(run_dir)]  # oldest first
    assert ["-first-id" in f.name for f in folders] == [True, True]  # (two starts in one second: `-first-id-1`)
    glob = f"{run_dir / 'wandb'}/offline-run-*-first-id*"
    assert printed == [f"W&B offline run first-id in {f} (upload: wandb sync {glob}); metrics in "
                       f"{run_dir / 'metrics.jsonl'}" for f in folders]
    assert sorted(run_dir.glob("wandb/offline-run-*-first-id*")) == sorted(folders)
    for seg, folder in enumerate(folders):
        run = read_offline_run(folder)
        assert {k: run["run"][k] for k in ("id", "name", "group", "resume")} == {
            "id": "first-id", "name": "job-7", "group": "sweep-3", "resume": True}
        assert [row["_step"] for row in run["history"]] == segments[seg] and run["exit_code"] == 0
        media = sorted(p.relative_to(folder / "files") for p in (folder / "files" / "media").rglob("*") if p.is_file())
        assert len(media) == len(segments[seg]) and all(p.parts[1] == "images" for p in media), media
        share_keys = {k for row in run["history"] for k in row if k.endswith("_share") and "/expert" in k}
        assert len(share_keys) == (8 if seg == 0 else 0)
        assert all("moe/layer3/max_share" in row for row in run["history"])
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("moe/layer3/expert3_share" in rec for rec in jsonl) and len(jsonl) == 8


def test_bad_kept_run_id(tmp_path, monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "run" / "wandb").mkdir(parents=True)
    (tmp_path / "run" / "wandb" / "run_id").write_text("../../etc\n")
    with pytest.raises(UserError, match=r"run_id: '\.\./\.\./etc' is not a W&B run id"):
        Tracker(tmp_path / "run", {})
    assert not any(var in os.environ for var in WANDB_VARS)
