"""The optimizer state of one of our DeepSpeed MoE checkpoints, per parameter and whatever layout it was saved with:
read from DeepSpeed's per-rank files, or written layout-free (`convert --to ds --with-optimizer`).

A rank's optimizer state is stored in the form of that rank's optimizer (docs/training.md, "Resuming on another
layout"):

- ZeRO 1/2 (`[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, one per rank): per param group one flat fp32 partition
  of the masters, the AdamW state of that partition (`exp_avg`, `exp_avg_sq`: flat, same layout; `step`), and
  `param_slice_mappings` {name: (start, numel)}. Non-expert groups are partitioned over all W ranks, expert groups
  over the expert-data-parallel ranks of one expert-parallel rank e (ranks r with r % ep == e, in order), and their
  names carry *local* expert ids. `param_shapes` in the model file gives every parameter's shape.
- ZeRO 0, fp32 (a plain torch AdamW): `expp_rank_{e}_mp_rank_00_optim_states.pt` per expert-parallel rank (MoE) or
  `optimizer` in `mp_rank_00_model_states.pt` (dense): the torch state dict, state by parameter index; the module
  weights are the fp32 masters. Parameter names come from `optimizer_param_names`, which `train.checkpoint.save`
  records in the model file (DeepSpeed saves none for ZeRO 0).
- ZeRO 0, bf16 (DeepSpeed's `FP16_UnfusedOptimizer`): the same files, holding {`optimizer_state_dict`,
  `fp32_groups`: the fp32 masters per group}.
- universal (ours): `universal_optim_states.pt` {format, run, params: {name: {fp32, exp_avg, exp_avg_sq, step}}}
  for the non-expert parameters and `layer_{L}_expert_{G}_universal_optim_states.pt` per MoE layer and global expert.

Names handed out are *global*: our module names, with the global expert id in expert names (as the per-expert model
files hold them). Every file is opened with `io.safe_load` (weights_only, memory-mapped): only the
tensors of the parameter asked for are read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..moe.names import expert_of, to_global, with_expert
from .ds import EXPERT_FILE, EXPP_FILE, MODEL_STATES, ZERO_FILE, check_rank_files, join_fragments
from .safe_load import load_dict

UNIVERSAL = "universal_optim_states.pt"
UNIVERSAL_EXPERT = "layer_{moe_layer}_expert_{expert}_universal_optim_states.pt"
UNIVERSAL_FORMAT = "upcycle_ds.universal_optim_states/1"
RUN_KEYS = ("train_state", "layout", "data_identity", "lr_scheduler", "global_steps", "global_samples",
            "skipped_steps")
"""What a checkpoint holds about the run besides weights and optimizer state (all plain data)."""


def _load(path: Path):
    return load_dict(path)


def _step(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# --------------------------------------------------------------------------------------------------- the state
@dataclass
class ParamState:
    """One parameter's optimizer state, full (not partitioned), on the CPU."""

    fp32: torch.Tensor
    """The fp32 master weight."""
    exp_avg: torch.Tensor | None
    """AdamW's first moment; None where the optimizer has no state for the parameter yet (never stepped)."""
    exp_avg_sq: torch.Tensor | None
    step: float
    """AdamW's step count of this parameter."""


def saved_layout(states: dict) -> dict:
    """The layout a model file records (`layout`, written by the Trainer), completed from DeepSpeed's own `ds_config`
    for keys older checkpoints lack (micro batch size, grad accum)."""
    layout = dict(states.get("layout") or {}) if isinstance(states.get("layout"), dict) else {}
    ds = states.get("ds_config") if isinstance(states.get("ds_config"), dict) else {}
    layout.setdefault("micro_batch_size", ds.get("train_micro_batch_size_per_gpu"))
    layout.setdefault("grad_accum", ds.get("gradient_accumulation_steps"))
    if "zero_stage" not in layout and isinstance(ds.get("zero_optimization"), dict):
        layout["zero_stage"] = ds["zero_optimization"].get("stage", 0)
    if "dtype" not in layout and isinstance(ds.get("bf16"), dict):
        layout["dtype"] = "bf16" if ds["bf16"].get("enabled") else "fp32"
    layout.setdefault("world_size", states.get("dp_world_size"))
    return layout


class SavedOptimizer(ABC):
    """The optimizer state of a checkpoint tag, per parameter under global names (see the module docstring).

    `kind`: "zero" (ZeRO 1/2), "zero0-fp32", "zero0-bf16" or "universal". `run` holds the run-level state
    (RUN_KEYS); `layout` the layout it was saved with."""

    kind: str

    def __init__(self, tag_dir: Path, states: dict, run: dict):
        self.tag_dir, self.states, self.run = Path(tag_dir), states, run
        self.layout = saved_layout(run)
        E = int(self.layout.get("num_experts") or 1)
        ep = int(self.layout.get("ep_size") or 1)
        if ep < 1 or E % ep:
            raise UserError(f"{self.tag_dir}: saved with ep_size {ep} and {E} experts (not a divisor)")
        self.num_experts, self.ep_size, self.n_local = E, ep, E // ep

    @abstractmethod
    def names(self) -> list[str]:
        """Every parameter the saved optimizer held (global names)."""

    @abstractmethod
    def get(self, name: str) -> ParamState | None:
        """The state of parameter `name` (global), None when the optimizer did not hold it (frozen there)."""

    @abstractmethod
    def meta(self, name: str) -> tuple[tuple[int, ...], bool, float]:
        """(shape, has AdamW moments, step) without reading the tensors."""

    @abstractmethod
    def step_of(self, name: str) -> float | None:
        """The AdamW step count of `name`; None when the optimizer did not hold it."""

    def _split(self, name: str) -> tuple[int, str]:
        """(expert-parallel rank holding `name`, its local name there)."""
        e = expert_of(name)
        if e is None:
            return 0, name
        ep_rank, local = divmod(e[1], self.n_local)
        if ep_rank >= self.ep_size:
            raise UserError(f"{self.tag_dir}: no expert {e[1]} (saved with {self.num_experts} experts)")
        return ep_rank, with_expert(name, local)

    def _globals(self, local_names) -> list[str]:
        out = []
        for n in local_names:
            out.extend([n] if expert_of(n) is None else
                       [to_global(n, e, self.n_local) for e in range(self.ep_size)])
        return out


def _files(tag_dir: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(m.group(1)): p for p in Path(tag_dir).iterdir() if (m := pattern.match(p.name))}


class _ZeroState(SavedOptimizer):
    kind = "zero"

    def __init__(self, tag_dir, states, run, files: dict[int, Path]):
        super().__init__(tag_dir, states, run)
        W = check_rank_files(tag_dir, files)
        saved_w = self.layout.get("world_size")
        if saved_w is not None and int(saved_w) != W:
            raise UserError(f"{tag_dir}: {W} ZeRO optimizer files, but the checkpoint was saved on {saved_w} ranks "
                            f"(missing optimizer files?)")
        if W % self.ep_size:
            raise UserError(f"{tag_dir}: {W} ranks is not a multiple of ep_size {self.ep_size}")
        self.world = W
        shapes = states.get("param_shapes")
        if not isinstance(shapes, list):
            raise UserError(f"{tag_dir / MODEL_STATES}: no param_shapes (not a ZeRO 1/2 checkpoint of ours)")
        self._shapes = {n: tuple(s) for group in shapes for n, s in group.items()}
        self._ranks = []  # per rank: (fp32 partitions, AdamW state per group, {local name: (group, start, numel)})
        for r in range(W):
            sd = _load(files[r]).get("optimizer_state_dict")
            try:
                parts, maps = sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]
                base = sd["base_optimizer_state"]
                groups = [base["state"][g] for g in range(len(parts))] if isinstance(base, dict) else list(base)
            except (KeyError, TypeError, IndexError):
                raise UserError(f"{files[r]}: not a ZeRO 1/2 optimizer file of ours") from None
            index = {name: (g, int(a.start), int(a.numel)) for g, m in enumerate(maps) for name, a in m.items()}
            self._ranks.append((parts, groups, index))

    def names(self):
        return self._globals(self._shapes)

    def _ranks_of(self, name: str) -> tuple[range, str]:
        ep_rank, local = self._split(name)
        if expert_of(name) is None:
            return range(self.world), local
        return range(ep_rank, self.world, self.ep_size), local

    def meta(self, name):
        ranks, local = self._ranks_of(name)
        for r in ranks:
            parts, groups, index = self._ranks[r]
            if local in index:
                return self._shapes[local], True, _step(groups[index[local][0]].get("step", 0))
        raise UserError(f"{self.tag_dir}: no ZeRO optimizer file holds {local}")

    def step_of(self, name):
        return self.meta(name)[2] if self._ranks_of(name)[1] in self._shapes else None

    def get(self, name):
        ranks, local = self._ranks_of(name)
        if local not in self._shapes:
            return None
        shape = self._shapes[local]
        pieces: dict[str, list[torch.Tensor]] = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
        step = None
        for r in ranks:
            parts, groups, index = self._ranks[r]
            if local not in index:
                continue
            g, start, numel = index[local]
            pieces["fp32"].append(parts[g].narrow(0, start, numel))
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in groups[g]:
                    raise UserError(f"{self.tag_dir}: the ZeRO optimizer state has no {key} (not AdamW)")
                pieces[key].append(groups[g][key].narrow(0, start, numel))
            step = _step(groups[g].get("step", 0)) if step is None else step
        full = {k: join_fragments(self.tag_dir, v, shape, local) for k, v in pieces.items()}
        return ParamState(full["fp32"], full["exp_avg"], full["exp_avg_sq"], step or 0.0)


class _Zero0State(SavedOptimizer):
    """ZeRO 0: the optimizer state of each expert-parallel rank, replicated over its data-parallel ranks."""

    def __init__(self, tag_dir, states, run, per_ep_rank: list, param_names: list[list[str]]):
        super().__init__(tag_dir, states, run)
        self._opt = per_ep_rank  # per expert-parallel rank: the saved `optimizer` object
        bf16 = isinstance(per_ep_rank[0], dict) and "optimizer_state_dict" in per_ep_rank[0]
        self.kind = "zero0-bf16" if bf16 else "zero0-fp32"
        torch_sd = per_ep_rank[0]["optimizer_state_dict"] if bf16 else per_ep_rank[0]
        try:
            groups = torch_sd["param_groups"]
            if [len(g["params"]) for g in groups] != [len(n) for n in param_names]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{tag_dir}: the ZeRO-0 optimizer state does not match the parameter names recorded "
                            f"with it") from None
        # local name -> (group, position in group, state index)
        self._index = {name: (g, pos, int(idx)) for g, (group, names) in enumerate(zip(groups, param_names))
                       for pos, (idx, name) in enumerate(zip(group["params"], names))}
        self._moe_layers = sorted({expert_of(n)[0] for n in self._index if expert_of(n)})
        self._experts: tuple[Path, dict] | None = None

    def names(self):
        return self._globals(self._index)

    def _torch_sd(self, ep_rank: int) -> dict:
        o = self._opt[ep_rank]
        return o["optimizer_state_dict"] if self.kind == "zero0-bf16" else o

    def _master(self, name: str, ep_rank: int, local: str) -> torch.Tensor:
        g, pos, _ = self._index[local]
        if self.kind == "zero0-bf16":
            return self._opt[ep_rank]["fp32_groups"][g][pos]
        e = expert_of(name)
        if e is None:
            return self.states["module"][name]
        path = self.tag_dir / EXPERT_FILE.format(moe_layer=self._moe_layers.index(e[0]), expert=e[1])
        if self._experts is None or self._experts[0] != path:
            self._experts = (path, _load(path))
        if name not in self._experts[1]:
            raise UserError(f"{path}: has no {name}")
        return self._experts[1][name]

    def meta(self, name):
        ep_rank, local = self._split(name)
        _, _, idx = self._index[local]
        st = self._torch_sd(ep_rank)["state"].get(idx)
        has = bool(st and "exp_avg" in st)
        return tuple(self._master(name, ep_rank, local).shape), has, _step(st.get("step", 0)) if has else 0.0

    def step_of(self, name):
        return self.meta(name)[2] if self._split(name)[1] in self._index else None

    def get(self, name):
        ep_rank, local = self._split(name)
        if local not in self._index:
            return None
        _, _, idx = self._index[local]
        fp32 = self._master(name, ep_rank, local).float().clone()
        st = self._torch_sd(ep_rank)["state"].get(idx)
        if not st:
            return ParamState(fp32, None, None, 0.0)
        if "exp_avg" not in st or "exp_avg_sq" not in st:
            raise UserError(f"{self.tag_dir}: the optimizer state of {local} has no exp_avg/exp_avg_sq (not AdamW)")
        return ParamState(fp32, st["exp_avg"].float().clone(), st["exp_avg_sq"].float().clone(),
                          _step(st.get("step", 0)))


class _UniversalState(SavedOptimizer):
    kind = "universal"

    def __init__(self, tag_dir, states, universal: dict):
        if universal.get("format") != UNIVERSAL_FORMAT or not isinstance(universal.get("params"), dict):
            raise UserError(f"{Path(tag_dir) / UNIVERSAL}: not a universal optimizer state file of ours")
        super().__init__(tag_dir, states, universal.get("run") or {})
        self._params = universal["params"]
        self._expert_names = list(universal.get("expert_names") or [])
        self._moe_layers = sorted({expert_of(n)[0] for n in self._expert_names})
        self._cache: tuple[Path, dict] | None = None

    def names(self):
        return [*self._params, *self._expert_names]

    def _entry(self, name: str) -> dict | None:
        e = expert_of(name)
        if e is None:
            return self._params.get(name)
        if e[0] not in self._moe_layers:
            return None
        path = self.tag_dir / UNIVERSAL_EXPERT.format(moe_layer=self._moe_layers.index(e[0]), expert=e[1])
        if self._cache is None or self._cache[0] != path:
            self._cache = (path, _load(path))
        return self._cache[1].get(name)

    def meta(self, name):
        d = self._entry(name)
        return tuple(d["fp32"].shape), d.get("exp_avg") is not None, float(d.get("step", 0.0))

    def step_of(self, name):
        d = self._entry(name)
        return None if d is None else float(d.get("step", 0.0))

    def get(self, name):
        d = self._entry(name)
        if d is None:
            return None
        try:
            moments = [None if d.get(k) is None else d[k].float().clone() for k in ("exp_avg", "exp_avg_sq")]
            return ParamState(d["fp32"].float().clone(), moments[0], moments[1], float(d.get("step", 0.0)))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{self.tag_dir}: the universal optimizer state of {name} is malformed") from None


# ------------------------------------------------------------------------------------------------------ open
def run_state(states: dict) -> dict:
    """The run-level state a model file holds (RUN_KEYS)."""
    return {k: states.get(k) for k in RUN_KEYS if k in states}


def has_optimizer_state(tag_dir: Path) -> bool:
    """Whether the tag holds optimizer state: DeepSpeed's per-rank files, a dense ZeRO-0 model file's `optimizer`,
    or our universal files (a module-only checkpoint holds none)."""
    d = Path(tag_dir)
    if (d / UNIVERSAL).is_file() or _files(d, ZERO_FILE) or _files(d, EXPP_FILE):
        return True
    return (d / MODEL_STATES).is_file() and isinstance(_load(d / MODEL_STATES).get("optimizer"), dict)


def open_saved_optimizer(tag_dir: str | Path, *, param_names: list[list[str]] | None = None) -> SavedOptimizer:
    """The optimizer state of checkpoint tag `tag_dir`, whatever its layout.

    `param_names`: the ZeRO-0 optimizer's parameter names per group, for checkpoints saved before our save recorded
    them (only valid when the expert-parallel size is unchanged)."""
    tag_dir = Path(tag_dir)
    states = _load(tag_dir / MODEL_STATES)
    if not isinstance(states, dict):
        raise UserError(f"{tag_dir / MODEL_STATES}: not a DeepSpeed model file")
    if (tag_dir / UNIVERSAL).is_file():
        return _UniversalState(tag_dir, states, _load(tag_dir / UNIVERSAL))
    run = run_state(states)
    zero = _files(tag_dir, ZERO_FILE)
    if zero:
        return _ZeroState(tag_dir, states, run, zero)
    names = states.get("optimizer_param_names") or param_names
    expp = _files(tag_dir, EXPP_FILE)
    if expp:
        n = len(expp)
        if sorted(expp) != list(range(n)):
            raise UserError(f"{tag_dir}: optimizer files for expert-parallel ranks {sorted(expp)}; expected "
                            f"0..{n - 1}")
        per_rank = [_load(expp[e]).get("optimizer") for e in range(n)]
    elif isinstance(states.get("optimizer"), dict):
        per_rank = [states["optimizer"]]
    else:
        raise UserError(f"{tag_dir}: no optimizer state (a module-only checkpoint: continue from it with --model "
                        f"instead of --resume, or convert it with --with-optimizer from the checkpoint it came from)")
    if not names:
        raise UserError(f"{tag_dir}: a ZeRO-0 checkpoint saved without its optimizer's parameter names; resume it "
                        f"with the ep size it was saved with")
    state = _Zero0State(tag_dir, states, run, per_rank, names)
    if len(per_rank) != state.ep_size:
        raise UserError(f"{tag_dir}: {len(per_rank)} ZeRO-0 optimizer files for ep_size {state.ep_size}")
    return state


# ----------------------------------------------------------------------------------------------------- write
def write_universal(saved: SavedOptimizer, tag_dir: Path, moe_layers: list[int], *, progress=None) -> int:
    """Write `saved` as universal optimizer state files into `tag_dir` (next to the module files of the same
    checkpoint): the non-expert parameters streamed into one file, one file per MoE layer and global expert.
    Returns the bytes of tensor data."""
    from .ds import save_streaming

    names = saved.names()
    experts: dict[tuple[int, int], list[str]] = {}
    plain = []
    for n in names:
        e = expert_of(n)
        if e is None:
            plain.append(n)
        else:
            if e[0] not in moe_layers:
                raise UserError(f"{saved.tag_dir}: optimizer state for {n}, but layer {e[0]} is not an MoE layer")
            experts.setdefault((moe_layers.index(e[0]), e[1]), []).append(n)
    tensors, entries = [], {}
    for n in plain:
        shape, moments, step = saved.meta(n)
        keys = ("fp32", "exp_avg", "exp_avg_sq") if moments else ("fp32",)
        entries[n] = (keys, step)
        tensors += [(f"{n}/{k}", torch.float32, shape) for k in keys]
    current: dict[str, ParamState] = {}

    def fetch(key: str) -> torch.Tensor:  # one parameter's state in memory at a time
        name, part = key.rsplit("/", 1)
        if name not in current:
            current.clear()
            current[name] = saved.get(name)
        return getattr(current[name], part)

    def obj(ref):
        return {"format": UNIVERSAL_FORMAT, "run": saved.run,
                "expert_names": [n for group in experts.values() for n in group],
                "params": {n: {"fp32": ref(f"{n}/fp32"),
                               "exp_avg": ref(f"{n}/exp_avg") if "exp_avg" in keys else None,
                               "exp_avg_sq": ref(f"{n}/exp_avg_sq") if "exp_avg" in keys else None,
                               "step": step} for n, (keys, step) in entries.items()}}

    total = save_streaming(tag_dir / UNIVERSAL, obj, tensors, fetch, progress)
    for (L, G), group in sorted(experts.items()):
        out = {}
        for n in group:
            st = saved.get(n)
            out[n] = {"fp32": st.fp32, "exp_avg": st.exp_avg, "exp_avg_sq": st.exp_avg_sq, "step": st.step}
            total += sum(t.numel() * 4 for t in (st.fp32, st.exp_avg, st.exp_avg_sq) if t is not None)
        torch.save(out, tag_dir / UNIVERSAL_EXPERT.format(moe_layer=L, expert=G))
        if progress is not None:
            progress.update(len(group))
    return total
