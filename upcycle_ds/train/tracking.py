"""Training metrics and expert-load tracking: W&B (offline by default) + `metrics.jsonl` + load heatmaps.

Only rank 0 builds an enabled `Tracker`; the other ranks build `Tracker(..., enabled=False)`, whose methods do
nothing, so the training loop calls them unconditionally. Per optimizer step the loop passes one `LayerStats` per
MoE layer (already summed over micro-batches and ranks); the tracker logs, for MoE layer L and expert e:

    moe/layer{L}/expert{e}_frac   share of layer L's routed token-slots sent to expert e (sums to 1 over e)
    moe/layer{L}/imbalance        max_e frac * E (1 = perfectly balanced, E = everything on one expert)
    moe/layer{L}/aux_loss, z_loss, entropy, dropped_frac

Every record also goes, as one JSON line {"step": ..., key: value, ...}, to `run_dir/metrics.jsonl` (whatever the
wandb mode, "disabled" included). `log_eval` draws a [MoE layers x experts] load heatmap to
`run_dir/load_heatmap_step{N}.png`, whose PNG text chunk `upcycle_ds.load` holds the matrix, the colour scale and
the heatmap's pixel box (so a reader can check the picture against the numbers).

W&B files stay inside the run: unless already set, WANDB_DIR = run_dir and WANDB_CACHE_DIR / WANDB_DATA_DIR (and
WANDB_CONFIG_DIR, except in "online" mode, which uses the user's own wandb login/settings) point under
`run_dir/wandb/`. Offline runs can be uploaded later with `wandb sync run_dir/wandb/offline-run-*` or read
locally with `upcycle_ds.train.wandb_read.read_offline_run(run_dir)`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError

WANDB_MODES = ("offline", "online", "disabled")
HEATMAP_META_KEY = "upcycle_ds.load"
HEATMAP_CMAP = "viridis"


@dataclass
class LayerStats:
    """Router statistics of one MoE layer for one optimizer step, summed over micro-batches and ranks."""

    layer: int
    """Decoder layer index."""
    tokens_per_expert: Sequence[int] | np.ndarray
    """Routed token-slots per expert (length E), counted before capacity drops."""
    aux_loss: float
    """Load-balancing loss (Switch: E * sum_i f_i P_i)."""
    z_loss: float
    """Router z-loss."""
    entropy: float
    """Mean router entropy over tokens (nats)."""
    dropped_fraction: float = 0.0
    """Fraction of token-slots dropped by expert capacity (0 when dropless)."""

    def fractions(self) -> np.ndarray:
        """tokens_per_expert / their sum (NaN everywhere if no token was routed)."""
        counts = np.asarray(self.tokens_per_expert, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0:
            raise ValueError(f"layer {self.layer}: tokens_per_expert must be a non-empty 1-D list, got {counts.shape}")
        if (counts < 0).any():
            raise ValueError(f"layer {self.layer}: negative token counts {counts.tolist()}")
        total = counts.sum()
        return counts / total if total > 0 else np.full_like(counts, math.nan)


def layer_metrics(layers: Sequence[LayerStats]) -> dict[str, float]:
    """The flat `moe/layer{L}/...` metrics of one step."""
    out: dict[str, float] = {}
    seen: set[int] = set()
    for st in layers:
        if st.layer in seen:
            raise ValueError(f"layer {st.layer} given twice in one step")
        seen.add(st.layer)
        frac = st.fractions()
        prefix = f"moe/layer{st.layer}/"
        for e, f in enumerate(frac):
            out[f"{prefix}expert{e}_frac"] = float(f)
        out[prefix + "imbalance"] = float(frac.max() * frac.size)
        out[prefix + "aux_loss"] = _scalar(st.aux_loss)
        out[prefix + "z_loss"] = _scalar(st.z_loss)
        out[prefix + "entropy"] = _scalar(st.entropy)
        out[prefix + "dropped_frac"] = _scalar(st.dropped_fraction)
    return out


def _scalar(v: Any) -> float | int | bool:
    """A plain Python number from a float / int / numpy scalar / 1-element tensor."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, (bool, int)):
        return v
    return float(v)


class Tracker:
    """W&B run + `metrics.jsonl` + heatmaps for one training run. See the module docstring."""

    def __init__(self, run_dir: Path | str, config: dict, *, enabled: bool = True, mode: str = "offline",
                 project: str = "upcycle_ds", name: str | None = None):
        if mode not in WANDB_MODES:
            raise UserError(f"--wandb-mode must be one of {', '.join(WANDB_MODES)} (got {mode!r})")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.mode = mode
        self.run = None
        self._saved_env: dict[str, str | None] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if mode != "disabled":
            self.run = self._init_wandb(config, project, name)

    # -- W&B ---------------------------------------------------------------------------------------------------
    def _wandb_env(self) -> dict[str, str]:
        wb = self.run_dir / "wandb"
        env = {"WANDB_DIR": str(self.run_dir), "WANDB_CACHE_DIR": str(wb / ".cache"),
               "WANDB_DATA_DIR": str(wb / ".data"), "WANDB_SILENT": "true"}
        if self.mode != "online":
            env["WANDB_CONFIG_DIR"] = str(wb / ".config")
        return env

    def _init_wandb(self, config: dict, project: str, name: str | None):
        # Set before importing/initialising wandb: its service process inherits this environment.
        for key, value in self._wandb_env().items():
            if os.environ.get(key):
                continue  # the user chose it
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        import wandb

        try:
            return wandb.init(project=project, name=name, config=config, mode=self.mode, dir=str(self.run_dir),
                              settings=wandb.Settings(silent=True))
        except Exception as exc:  # wandb raises its own error types for login / network problems
            self._restore_env()
            hint = " (run `wandb login`, or use --wandb-mode offline)" if self.mode == "online" else ""
            raise UserError(f"wandb init failed in mode {self.mode}: {exc}{hint}".replace("\n", " ")) from exc

    def _restore_env(self) -> None:
        for key, old in self._saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._saved_env = {}

    # -- logging -----------------------------------------------------------------------------------------------
    def _append_jsonl(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_step(self, step: int, scalars: dict[str, float], layers: Sequence[LayerStats]) -> None:
        """Log one optimizer step: `scalars` (loss, lr, tokens_per_s, ...) as given plus the per-layer MoE metrics."""
        if not self.enabled:
            return
        metrics = {k: _scalar(v) for k, v in scalars.items()}
        metrics.update(layer_metrics(layers))
        self._append_jsonl({"step": int(step), **metrics})
        if self.run is not None:
            self.run.log(metrics, step=int(step))

    def log_eval(self, step: int, scalars: dict[str, float], load: np.ndarray,
                 layer_ids: Sequence[int]) -> Path | None:
        """Log evaluation results: `scalars` (prefixed `eval/` unless they already are) and the expert-load matrix
        `load` [num MoE layers, E] (fractions, rows in `layer_ids` order) as a heatmap PNG, logged to W&B as
        `moe/load_heatmap`. Returns the PNG path (None on a disabled tracker)."""
        if not self.enabled:
            return None
        load = np.asarray(load, dtype=np.float64)
        path = render_load_heatmap(load, layer_ids, self.run_dir / f"load_heatmap_step{int(step)}.png",
                                   title=f"expert load, step {int(step)}")
        metrics = {(k if k.startswith("eval/") else f"eval/{k}"): _scalar(v) for k, v in scalars.items()}
        self._append_jsonl({"step": int(step), **metrics, "moe/load_heatmap": path.name,
                            "moe/load": {"layer_ids": [int(i) for i in layer_ids], "fractions": load.tolist()}})
        if self.run is not None:
            import wandb

            self.run.log({**metrics, "moe/load_heatmap": wandb.Image(str(path))}, step=int(step))
        return path

    def finish(self, exit_code: int | None = None) -> None:
        """Close the W&B run (writes its exit record), stop wandb's service and restore the environment.
        Safe to call twice."""
        if self.run is not None:
            import wandb

            self.run.finish(exit_code=exit_code)
            self.run = None
            wandb.teardown()  # stop wandb's service process: it was started with this run's WANDB_* environment
        self._restore_env()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def render_load_heatmap(load: np.ndarray, layer_ids: Sequence[int], path: Path, *, title: str = "expert load",
                        annotate: bool | None = None) -> Path:
    """Draw `load` [num MoE layers, E] as a heatmap (rows = MoE layers labelled with their decoder layer ids,
    columns = experts, colour = fraction from 0 to the max, values written in the cells when they fit) and save it
    as a PNG whose `upcycle_ds.load` text chunk holds {"layer_ids", "load", "vmin", "vmax", "cmap", "axes_px"};
    axes_px = [left, top, right, bottom] of the heatmap in image pixels (origin top-left)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    load = np.asarray(load, dtype=np.float64)
    layer_ids = [int(i) for i in layer_ids]
    if load.ndim != 2 or load.shape[0] != len(layer_ids) or load.shape[0] == 0:
        raise ValueError(f"load must be [len(layer_ids)={len(layer_ids)}, E], got shape {load.shape}")
    n_layers, n_experts = load.shape
    if annotate is None:
        annotate = n_experts <= 32 and n_layers <= 64
    finite = load[np.isfinite(load)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    fig = Figure(figsize=(min(2.5 + 0.6 * n_experts, 30), min(1.5 + 0.4 * n_layers, 30)), dpi=100,
                 layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(load, cmap=HEATMAP_CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of routed token-slots")
    ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)])
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in layer_ids])
    ax.set_xlabel("expert")
    ax.set_title(f"{title} (balanced = 1/E = {1 / n_experts:.3f})")
    if annotate:
        for i in range(n_layers):
            for e in range(n_experts):
                v = load[i, e]
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if np.isfinite(v) and v > 0.6 * vmax else "white")
    canvas.draw()  # runs the layout; freeze it so the saved PNG has exactly the geometry recorded below
    fig.set_layout_engine("none")
    box = ax.get_window_extent()
    height_px = fig.bbox.height
    meta = {"layer_ids": layer_ids, "load": load.tolist(), "vmin": 0.0, "vmax": vmax, "cmap": HEATMAP_CMAP,
            "axes_px": [box.x0, height_px - box.y1, box.x1, height_px - box.y0]}
    path = Path(path)
    fig.savefig(path, format="png", metadata={HEATMAP_META_KEY: json.dumps(meta)})
    return path


def read_heatmap_meta(path: Path | str) -> dict[str, Any]:
    """The `upcycle_ds.load` metadata of a heatmap PNG written by `render_load_heatmap`."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.text.get(HEATMAP_META_KEY)
    if text is None:
        raise UserError(f"{path}: not an upcycle_ds load heatmap (no {HEATMAP_META_KEY} metadata)")
    return json.loads(text)
