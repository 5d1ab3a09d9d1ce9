"""Training metrics and expert-load tracking: W&B (offline by default) + `metrics.jsonl` + load pictures.

Only rank 0 builds an enabled `Tracker`; the other ranks build `Tracker(..., enabled=False)`, whose methods do
nothing, so the training loop calls them unconditionally. Per logging step the loop passes one `LayerStats` per
MoE layer (summed over the window's micro-batches and ranks).

Every metric has a namespace, and metrics.jsonl and W&B use the same names: `train/...` (loss, lr, tokens_per_s,
...; a name the loop passes without a namespace is a training metric), `eval/...` (held-out loss, perplexity) and
`moe/...` (the router). "Is my router collapsing?" is answered by:

- a handful of scalars per MoE layer L, whatever the number of experts E:
      moe/layer{L}/max_share, min_share  share of the layer's routed token-slots on its busiest / idlest expert
      moe/layer{L}/imbalance              max_share * E (1 = balanced, E = everything on one expert)
      moe/layer{L}/load_entropy           entropy of the shares / log E (1 = balanced, 0 = one expert)
      moe/layer{L}/starved_frac           fraction of experts below a quarter of their fair share, 1 / (4E)
      moe/layer{L}/aux_loss, z_loss, entropy (router entropy, nats), dropped_frac
- each expert's share of every logged step, `moe/layer{L}/expert{e}_share`: always in metrics.jsonl; in W&B as plain
  scalars (charted natively, one line per expert) while MoE layers x E <= `expert_shares_max` (default 256: 32
  layers x 8 experts), above that only the per-layer scalars above;
- every `heatmap_every` steps: a [MoE layers x experts] heatmap of the load since the previous one
  (`moe/load_heatmap_train`, `load_heatmap_train_step{N}.png`; one image per heatmap, so the run's files grow with
  the number of heatmaps, not with its square); the same matrix goes to metrics.jsonl as `moe/train_load`;
- a warning line in the log, once per layer, when one expert holds more than `collapse_factor` x its fair share for
  `collapse_steps` logged steps in a row.

`log_eval` draws the eval load heatmap to `run_dir/load_heatmap_step{N}.png`; every heatmap PNG's text chunk
`upcycle_ds.load` holds the matrix, the colour scale and the heatmap's pixel box (to check a picture against numbers).

W&B settings: a flag wins; otherwise the environment a W&B user sets applies (WANDB_MODE, WANDB_PROJECT,
WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_TAGS, WANDB_DIR); with neither, the run is offline in project
`upcycle_ds`. W&B files stay inside the run: unless already set, WANDB_DIR = run_dir and WANDB_CACHE_DIR /
WANDB_DATA_DIR (and WANDB_CONFIG_DIR, except in "online" mode, which uses the user's own wandb login/settings) point
under `run_dir/wandb/`.

One training run is one W&B run, however often it is resumed or requeued: the first start keeps the W&B run id in
`run_dir/wandb/run_id` (WANDB_RUN_ID if set, else a new one) and every later start of the same run dir continues
that W&B run (`resume="allow"`). Online, steps the resumed W&B run already holds are not sent again (a resume
repeats the steps after its checkpoint with the same values). Offline, each start writes its own
`run_dir/wandb/offline-run-*-<id>*` folder with the same id; `wandb sync run_dir/wandb/offline-run-*-<id>*` uploads
them into one run, in order. The tracker prints where the run goes (URL, or folder and sync command) once at start.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError

WANDB_MODES = ("offline", "online", "disabled")
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings wandb itself accepts
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
    """The per-layer scalars of one logged step (see the module docstring), for W&B and metrics.jsonl."""
    out: dict[str, float] = {}
    seen: set[int] = set()
    for st in layers:
        if st.layer in seen:
            raise ValueError(f"layer {st.layer} given twice in one step")
        seen.add(st.layer)
        frac = st.fractions()
        E = frac.size
        prefix = f"moe/layer{st.layer}/"
        out[prefix + "max_share"] = float(frac.max())
        out[prefix + "min_share"] = float(frac.min())
        out[prefix + "imbalance"] = float(frac.max() * E)
        nz = frac[frac > 0]
        out[prefix + "load_entropy"] = float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 else 1.0
        out[prefix + "starved_frac"] = float((frac < 1 / (4 * E)).mean())
        out[prefix + "aux_loss"] = _scalar(st.aux_loss)
        out[prefix + "z_loss"] = _scalar(st.z_loss)
        out[prefix + "entropy"] = _scalar(st.entropy)
        out[prefix + "dropped_frac"] = _scalar(st.dropped_fraction)
    return out


def expert_shares(layers: Sequence[LayerStats]) -> dict[str, float]:
    """`moe/layer{L}/expert{e}_share` of one logged step: each expert's share of the layer's routed token-slots."""
    return {f"moe/layer{st.layer}/expert{e}_share": float(f) for st in layers for e, f in enumerate(st.fractions())}


NAMESPACES = ("train/", "eval/", "moe/")


def namespaced(name: str) -> str:
    """A metric name under its namespace: `train/` unless it already has one of `NAMESPACES`."""
    return name if name.startswith(NAMESPACES) else f"train/{name}"


def _scalar(v: Any) -> float | int | bool:
    """A plain Python number from a float / int / numpy scalar / 1-element tensor."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, (bool, int)):
        return v
    return float(v)


def resolve_wandb(mode: str | None = None, project: str | None = None, entity: str | None = None,
                  group: str | None = None, tags: Sequence[str] | None = None, name: str | None = None,
                  environ=None) -> dict[str, Any]:
    """W&B settings: each flag given wins, else the W&B user's environment variable, else our default (offline,
    project upcycle_ds, W&B's own generated run name)."""
    env = os.environ if environ is None else environ
    mode = mode or env.get("WANDB_MODE") or "offline"
    mode = _WANDB_MODE_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        raise UserError(f"--wandb-mode must be one of {', '.join(WANDB_MODES)} (got {mode!r})")
    env_tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {"mode": mode, "project": project or env.get("WANDB_PROJECT") or "upcycle_ds",
            "entity": entity or env.get("WANDB_ENTITY") or None, "group": group or env.get("WANDB_RUN_GROUP") or None,
            "name": name or env.get("WANDB_NAME") or None, "tags": list(tags) if tags else env_tags or None}


RUN_ID_FILE = Path("wandb") / "run_id"
"""Under the run dir: the W&B run id every start of this run dir logs to."""
_RUN_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def run_id(run_dir: Path, environ=None) -> str:
    """The W&B run id of `run_dir`: the one kept in RUN_ID_FILE, else WANDB_RUN_ID, else a new one; kept in the
    file (written atomically) before wandb starts, so a crash at any later point resumes the same W&B run."""
    from ..io.atomic import write_text_atomic

    env = os.environ if environ is None else environ
    path = run_dir / RUN_ID_FILE
    rid = path.read_text().strip() if path.is_file() else (env.get("WANDB_RUN_ID") or "").strip()
    if not rid:
        import secrets

        rid = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    if not (0 < len(rid) <= 64 and set(rid) <= _RUN_ID_OK):
        where = path if path.is_file() else "WANDB_RUN_ID"
        raise UserError(f"{where}: {rid[:70]!r} is not a W&B run id (letters, digits, - _ . and at most 64 of them)")
    if not path.is_file():
        write_text_atomic(path, rid + "\n")
    return rid


class Tracker:
    """W&B run + `metrics.jsonl` + load pictures for one training run. See the module docstring."""

    def __init__(self, run_dir: Path | str, config: dict, *, enabled: bool = True, mode: str | None = None,
                 project: str | None = None, entity: str | None = None, group: str | None = None,
                 tags: Sequence[str] | None = None, name: str | None = None, heatmap_every: int = 100,
                 expert_shares_max: int = 256, collapse_factor: float = 4.0, collapse_steps: int = 10, warn=None):
        self.wandb = resolve_wandb(mode, project, entity, group, tags, name)
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.mode = self.wandb["mode"]
        self.run = None
        self.heatmap_every, self.collapse_factor, self.collapse_steps = heatmap_every, collapse_factor, collapse_steps
        self.expert_shares_max = expert_shares_max
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        """Prints a line to the run's log (the collapse warning, where the W&B run goes)."""
        self._wandb_from_step = 0  # a resumed online run already holds the steps before this one
        self._saved_env: dict[str, str | None] = {}
        self._window: dict[int, np.ndarray] = {}  # layer -> token-slot counts since the last heatmap
        self._hot: dict[int, int] = {}  # layer -> logged steps in a row with one expert over collapse_factor x fair
        self._warned: set[int] = set()
        self._prev_step: int | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.mode != "disabled":
            self.run = self._init_wandb(config)
        self.warn(self.where())

    @classmethod
    def for_run(cls, args, *, enabled: bool, warn=None) -> Tracker:
        """The tracker of a training run from its settings (`TrainArgs`: out, wandb_*, heatmap_every, collapse_*)."""
        return cls(args.out, args.to_dict(), enabled=enabled, mode=args.wandb_mode, project=args.wandb_project,
                   entity=args.wandb_entity, group=args.wandb_group, tags=args.wandb_tags, name=args.wandb_name,
                   heatmap_every=args.heatmap_every, expert_shares_max=args.wandb_expert_shares_max,
                   collapse_factor=args.collapse_factor, collapse_steps=args.collapse_steps, warn=warn)

    def where(self) -> str:
        """One line: where this run's metrics go."""
        jsonl = f"metrics in {self.metrics_path}"
        if self.run is None:
            return f"W&B disabled; {jsonl}"
        if self.mode == "online":
            return f"W&B run {self.run.url}; {jsonl}"
        # every start of the run dir has a folder of its own (`-1`, `-2`, ... appended when two start in one second)
        folders = Path(self.run.dir).parent.parent / f"offline-run-*-{self.run.id}*"
        return (f"W&B offline run {self.run.id} in {Path(self.run.dir).parent} (upload: wandb sync {folders}); "
                f"{jsonl}")

    # -- W&B ---------------------------------------------------------------------------------------------------
    def _wandb_env(self) -> dict[str, str]:
        wb = self.run_dir / "wandb"
        env = {"WANDB_DIR": str(self.run_dir), "WANDB_CACHE_DIR": str(wb / ".cache"),
               "WANDB_DATA_DIR": str(wb / ".data"), "WANDB_SILENT": "true"}
        if self.mode != "online":
            env["WANDB_CONFIG_DIR"] = str(wb / ".config")
        return env

    def _init_wandb(self, config: dict):
        # Set before importing/initialising wandb: its service process inherits this environment.
        for key, value in self._wandb_env().items():
            if os.environ.get(key):
                continue  # the user chose it
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        import wandb

        w = self.wandb
        try:
            rid = run_id(self.run_dir)
            run = wandb.init(project=w["project"], entity=w["entity"], group=w["group"], tags=w["tags"],
                             name=w["name"], config=config, mode=self.mode, dir=os.environ["WANDB_DIR"], id=rid,
                             resume="allow", settings=wandb.Settings(silent=True))
        except UserError:
            self._restore_env()
            raise
        except Exception as exc:  # wandb raises its own error types for login / network problems
            self._restore_env()
            hint = " (run `wandb login`, or use --wandb-mode offline)" if self.mode == "online" else ""
            raise UserError(f"wandb init failed in mode {self.mode}: {exc}{hint}".replace("\n", " ")) from exc
        if run.resumed:
            self._wandb_from_step = run.step
        return run

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
        """Log one logging step: `scalars` (loss, lr, tokens_per_s, ...; `train/` unless namespaced), the per-layer
        load scalars and each expert's share, and every `heatmap_every` steps the load heatmap; warn once per
        collapsing layer."""
        if not self.enabled:
            return
        metrics = {namespaced(k): _scalar(v) for k, v in scalars.items()}
        metrics.update(layer_metrics(layers))
        shares = expert_shares(layers)
        record = {"step": int(step), **metrics, **shares}
        if len(shares) <= self.expert_shares_max:
            metrics.update(shares)
        wandb_extra: dict[str, Any] = {}
        for st in layers:
            counts = np.asarray(st.tokens_per_expert, dtype=np.float64)
            self._window[st.layer] = self._window.get(st.layer, 0) + counts
            self._check_collapse(st)
        prev, self._prev_step = self._prev_step, int(step)
        N = self.heatmap_every
        if layers and N and step // N > (step - 1 if prev is None else prev) // N:  # reached or crossed a multiple
            record["moe/train_load"], wandb_extra = self._heatmap(int(step), layers)
        self._append_jsonl(record)
        self._log_wandb({**metrics, **wandb_extra}, int(step))

    def _log_wandb(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None and step >= self._wandb_from_step:
            self.run.log(values, step=step)

    def _check_collapse(self, st: LayerStats) -> None:
        frac = st.fractions()
        E = frac.size
        if not np.isfinite(frac).all() or frac.max() <= self.collapse_factor / E:
            self._hot[st.layer] = 0
            return
        self._hot[st.layer] = self._hot.get(st.layer, 0) + 1
        if self._hot[st.layer] >= self.collapse_steps and st.layer not in self._warned:
            self._warned.add(st.layer)
            e = int(frac.argmax())
            self.warn(f"warning: MoE layer {st.layer} may be collapsing: expert {e} got {frac[e]:.0%} of the "
                      f"token-slots ({frac[e] * E:.1f}x its fair share of {1 / E:.1%}) for {self._hot[st.layer]} "
                      f"logged steps in a row (raise --aux-loss-coef, or lower the learning rate)")

    def _heatmap(self, step: int, layers: Sequence[LayerStats]) -> tuple[dict, dict]:
        """The load since the previous heatmap: a PNG (and its W&B image)."""
        ids = [st.layer for st in layers]
        load = np.stack([LayerStats(layer=L, tokens_per_expert=self._window[L], aux_loss=0, z_loss=0,
                                    entropy=0).fractions() for L in ids])
        self._window = {}
        path = render_load_heatmap(load, ids, self.run_dir / f"load_heatmap_train_step{step}.png",
                                   title=f"expert load up to step {step}")
        extra: dict[str, Any] = {}
        if self.run is not None:
            import wandb

            extra["moe/load_heatmap_train"] = wandb.Image(str(path))
        return {"layer_ids": ids, "fractions": load.tolist(), "heatmap": path.name}, extra

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

            self._log_wandb({**metrics, "moe/load_heatmap": wandb.Image(str(path))}, int(step))
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
