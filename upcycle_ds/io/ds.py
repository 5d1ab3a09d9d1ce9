"""DeepSpeed partitioned MoE checkpoints (what `engine.save_checkpoint` writes for native DeepSpeed-MoE), read lazily
under HF MoE hub key names, and written (module weights only) so that `engine.load_checkpoint` reads them.

Layout of one tag dir (as DeepSpeed 0.19 writes it for native MoE; docs/design.md):
    mp_rank_00_model_states.pt                       {"module": non-expert params (our names), "num_experts": [E per
                                                      MoE layer], "param_shapes": [per optimizer group] (ZeRO), ...}
    layer_{L}_expert_{G}_mp_rank_00_model_states.pt  one per MoE layer number L (0.. counts MoE layers, not decoder
                                                      layers) and *global* expert id G: {our name with G: tensor}
    [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   ZeRO 1/2: rank r's flat fp32 partitions of each group
    expp_rank_{r}_mp_rank_00_optim_states.pt         ZeRO 0: the plain optimizer state
The trainer writes `config.json` (the HF MoE config the model was built from) and tokenizer files next to `latest`.

Every file is read with `torch.load(weights_only=True)` (ZeRO optimizer files need three DeepSpeed classes
allow-listed for that one call) and memory-mapped, so only the tensor asked for is copied into memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError
from .. import checks
from ..families import Family, family_for
from ..families.base import EMBEDDING, LM_HEAD, PROJS, is_tied, weight_key
from ..moe import names
from .hf import SIDE_FILES, read_json_object
from .paths import child
from .safe_load import load_dict
from .source import PlannedSource

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = "layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"
_EXPERT_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
"""ZeRO 1/2 optimizer file of data-parallel rank (group 1)."""
EXPP_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
"""ZeRO 0 optimizer file of expert-parallel rank (group 1)."""


def load_pt(path: Path, *, zero: bool = False) -> dict:
    """A DeepSpeed checkpoint file, loaded safely (`io.safe_load`: weights_only, DeepSpeed's data classes
    allow-listed), memory-mapped; a one-line UserError if it is missing or not such a file. (`zero` is accepted for
    callers that load ZeRO optimizer files; the allow-list applies to every file.)"""
    return load_dict(path)


def _check_zip(path: Path) -> None:
    """Cheap integrity check without reading tensors: the zip central directory (at the end) must be there."""
    try:
        torch._C.PyTorchFileReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: truncated or not a torch checkpoint file ({str(e).splitlines()[0][:160]})") from None


def is_ds_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "latest").is_file() or (p / MODEL_STATES).is_file()


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> tuple[Path, Path, str]:
    """(save dir holding config.json, tag dir, tag) for a save dir with `latest`, a save dir + tag, or a tag dir.

    The tag (from `latest` or `--tag`) must name a dir inside the save dir (`io.paths.child`)."""
    p = Path(path)
    if not p.is_dir():
        checks.existing(p)
    if (p / MODEL_STATES).is_file() and not (p / "latest").is_file():
        if tag is not None and tag != p.name:
            raise UserError(f"{p} is a tag dir ({p.name}); --tag {tag} does not apply (pass its parent dir)")
        return p.parent, p, p.name
    if tag is None:
        latest = p / "latest"
        if not latest.is_file():
            raise UserError(f"{p}: not a DeepSpeed checkpoint dir (no `latest` file and no {MODEL_STATES})")
        tag = read_latest(latest)
        tag_dir = child(p, tag, f"{latest} names tag")
    else:
        tag_dir = child(p, tag, "--tag")
    if not (tag_dir / MODEL_STATES).is_file():
        have = sorted(d.name for d in p.iterdir() if (d / MODEL_STATES).is_file())
        what = "does not exist" if not tag_dir.exists() else f"has no {MODEL_STATES}"
        raise UserError(f"{p}: tag {tag!r} {what} (tags here: {', '.join(have) or 'none'})")
    return p, tag_dir, tag


def read_latest(latest: Path) -> str:
    """The tag written in a `latest` file (stripped), or a one-line UserError for a file that is not a short text."""
    try:
        raw = latest.read_bytes()[:4097]
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{latest}: not a text file naming a checkpoint tag") from None
    except OSError as e:
        raise checks.unreadable_error(latest, e) from None
    if len(raw) > 4096 or not tag:
        raise UserError(f"{latest}: expected one checkpoint tag, got {len(raw)} bytes")
    return tag


def _read_config(save_dir: Path, tag_dir: Path) -> tuple[dict, Path]:
    for d in (save_dir, tag_dir):
        f = d / "config.json"
        if f.is_file():
            return read_json_object(f), d
    raise UserError(f"{save_dir}: no config.json next to `latest` (the HF MoE config the model was built from; "
                    f"the trainer writes it)")


class DSCheckpoint(PlannedSource):
    """A DeepSpeed MoE checkpoint as an HF MoE checkpoint (hub per-expert names): config, path, keys(), get(),
    shape(), dtype(), `in`. Expert files are opened one at a time, when one of their tensors is asked for.

    weights="module": the model weights as saved (the training dtype). weights="master": the fp32 master weights of
    the ZeRO 1/2 optimizer (flat partitions of every rank put back together per parameter); for a checkpoint without
    ZeRO optimizer files whose module weights are fp32, those are the master weights.
    """

    def __init__(self, path: str | Path, tag: str | None = None, weights: str = "module"):
        if weights not in ("module", "master"):
            raise UserError(f"--weights must be module or master (got {weights!r})")
        self.save_dir, self.tag_dir, self.tag = resolve_tag_dir(path, tag)
        self.path = self.save_dir  # side files (tokenizer, generation config) live next to `latest`
        self.config, self.side_dir = _read_config(self.save_dir, self.tag_dir)
        self.family: Family
        self.family, is_moe = family_for(self.config)
        if not is_moe:
            raise UserError(f"{self.save_dir}/config.json is a dense {self.config.get('model_type')} config; a "
                            f"DeepSpeed MoE checkpoint needs the HF MoE config it was built from")
        self.weights = weights
        fam = self.family
        fam.check_config(self.config, str(self.side_dir / "config.json"))
        self.moe_layers = fam.moe_layers(self.config)
        self.num_experts = fam.num_experts(self.config)
        self._states = load_pt(self.file(MODEL_STATES))
        module = self._states.get("module")
        if not isinstance(module, dict):
            raise UserError(f"{self.tag_dir / MODEL_STATES}: no `module` state dict (not a DeepSpeed model file)")
        self._check_expert_files()
        self._cached: tuple[int, int] | None = None
        self._cache: dict[str, torch.Tensor] = {}

        # plan: hub key -> (dtype, shape, source); source = ("module", our name) | ("expert", L, G, our name)
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]] = {}
        tied = is_tied(self.config)
        for name, t in module.items():
            if not isinstance(t, torch.Tensor):
                continue
            if tied and name == LM_HEAD and EMBEDDING in module:
                continue  # tied: transformers saves only the embedding
            if names.is_expert_param(name):
                raise UserError(f"{self.tag_dir / MODEL_STATES}: holds expert weight {name}; expected them in "
                                f"per-expert files (not a native DeepSpeed-MoE checkpoint of ours)")
            self._plan[fam.hf_key_for_ds_param(name, 0)] = (t.dtype, tuple(t.shape), ("module", name))
        want = fam.expected_shapes(self.config, str(self.side_dir / "config.json"))
        for key, (_, shape, src) in self._plan.items():
            if key in want and tuple(shape) != tuple(want[key]):
                raise UserError(f"{self.tag_dir / MODEL_STATES}: {src[1]} has shape {list(shape)}, but config.json "
                                f"implies {list(want[key])} (checkpoint and config.json do not match)")
        first = self._load_expert(0, 0)
        hidden = int(self.config["hidden_size"])
        inter = fam.expert_intermediate_size(self.config)
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        self._expert_dtype = next(iter(first.values())).dtype
        for L, layer in enumerate(self.moe_layers):
            if fam.router_key(layer) not in self._plan:
                raise UserError(f"{self.tag_dir / MODEL_STATES}: no router weight for MoE layer {layer} "
                                f"(config.json does not match this checkpoint)")
            for g in range(self.num_experts):
                for proj in PROJS:
                    ours = ds_expert_name(layer, g, proj)
                    self._plan[fam.expert_key(layer, g, proj)] = (self._expert_dtype, shapes[proj],
                                                                  ("expert", L, g, ours))
        self._master = _ZeroMaster(self) if weights == "master" else None

    # ------------------------------------------------------------------ validation
    def _check_expert_files(self) -> None:
        n_moe, E = len(self.moe_layers), self.num_experts
        saved = self._states.get("num_experts")
        if isinstance(saved, list) and saved and (len(saved) != n_moe or any(x != E for x in saved)):
            raise UserError(f"{self.tag_dir / MODEL_STATES}: saved with experts per MoE layer {saved}, but "
                            f"config.json says {n_moe} MoE layers x {E} experts")
        found: dict[int, set[int]] = {}
        for f in self.tag_dir.iterdir():
            m = _EXPERT_RE.match(f.name)
            if m:
                if m.group(3) != "00":
                    raise UserError(f"{f}: tensor-parallel expert files (mp_rank {m.group(3)}) are not supported")
                found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        extra_layers = sorted(set(found) - set(range(n_moe)))
        if extra_layers:
            raise UserError(f"{self.tag_dir}: expert files for MoE layer {extra_layers[0]}, but config.json has "
                            f"{n_moe} MoE layers")
        for L in range(n_moe):
            have = found.get(L, set())
            extra = sorted(have - set(range(E)))
            if extra:
                raise UserError(f"{self.tag_dir}: expert files from two different expert counts: MoE layer {L} has "
                                f"expert {extra[0]}, but config.json says {E} experts")
            missing = sorted(set(range(E)) - have)
            if missing:
                raise UserError(f"{self.tag_dir / EXPERT_FILE.format(moe_layer=L, expert=missing[0])}: missing "
                                f"(expert {missing[0]} of MoE layer {L})")
            for g in range(E):
                self._check_expert(L, g)

    def file(self, name: str) -> Path:
        """A file of the tag dir; a symlink leading outside it is refused."""
        return child(self.tag_dir, name, str(self.tag_dir))

    def _check_expert(self, L: int, g: int) -> None:
        """Expert file (L, g) holds the three weights of that expert, with the shapes config.json implies."""
        f = self.file(EXPERT_FILE.format(moe_layer=L, expert=g))
        _check_zip(f)
        hidden, inter = int(self.config["hidden_size"]), self.family.expert_intermediate_size(self.config)
        sd = load_pt(f)
        layer = self.moe_layers[L]
        for proj in PROJS:
            ours = ds_expert_name(layer, g, proj)
            t = sd.get(ours)
            want = (hidden, inter) if proj == "down" else (inter, hidden)
            if not isinstance(t, torch.Tensor):
                raise UserError(f"{f}: has no {ours} (expert file does not match config.json)")
            if tuple(t.shape) != want:
                raise UserError(f"{f}: {ours} has shape {list(t.shape)}, but config.json (hidden_size {hidden}, "
                                f"expert intermediate size {inter}) implies {list(want)}")

    # ------------------------------------------------------------------ read interface
    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if self._master is not None else self._plan[key][0]

    def source_name(self, key: str) -> tuple:
        """("module", our name) or ("expert", moe layer L, global expert G, our name with G)."""
        return self._plan[key][2]

    def get(self, key: str) -> torch.Tensor:
        if key not in self._plan:
            raise UserError(f"{self.tag_dir}: tensor {key} is not in this checkpoint")
        dtype, shape, src = self._plan[key]
        if self._master is not None and self._master.ranks is not None:
            return self._master.get(src[-1], src[2] if src[0] == "expert" else None, shape)
        return self._get_module(key).float() if self._master is not None else self._get_module(key)

    def _get_module(self, key: str) -> torch.Tensor:
        dtype, shape, src = self._plan[key]
        if src[0] == "module":
            return self._states["module"][src[1]].clone()
        _, L, g, ours = src
        t = self._load_expert(L, g).get(ours)
        f = self.tag_dir / EXPERT_FILE.format(moe_layer=L, expert=g)
        if t is None:
            raise UserError(f"{f}: has no {ours} (expert file does not match config.json)")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise UserError(f"{f}: {ours} is {t.dtype}{list(t.shape)}, config.json implies {dtype}{list(shape)}")
        return t.clone()

    def _load_expert(self, L: int, g: int) -> dict[str, torch.Tensor]:
        if self._cached != (L, g):
            self._cache = {}
            self._cache = load_pt(self.file(EXPERT_FILE.format(moe_layer=L, expert=g)))
            self._cached = (L, g)
        return self._cache

    def close(self) -> None:
        self._cache, self._cached = {}, None

    def side_files(self) -> list[Path]:
        return [self.side_dir / n for n in SIDE_FILES if (self.side_dir / n).is_file()]


def ds_expert_name(layer: int, expert: int, proj: str) -> str:
    """Our in-memory name of expert `expert` (global or local id) of decoder layer `layer`."""
    return names.expert_name(layer, expert, proj)


def check_rank_files(tag_dir: Path, files: dict[int, Path]) -> int:
    """The world size of a tag's ZeRO 1/2 optimizer files {rank: file}, which must be ranks 0..W-1."""
    world = len(files)
    if sorted(files) != list(range(world)):
        raise UserError(f"{tag_dir}: ZeRO optimizer files for ranks {sorted(files)}; expected 0..{world - 1}")
    return world


def join_fragments(tag_dir: Path, pieces: list[torch.Tensor], shape, name: str) -> torch.Tensor:
    """One parameter's value from its fragments in the ranks' flat ZeRO partitions (in partition order), fp32."""
    numel = 1
    for n in shape:
        numel *= n
    got = sum(p.numel() for p in pieces)
    if got != numel:
        raise UserError(f"{tag_dir}: the ZeRO optimizer files hold {got} of the {numel} values of {name} (missing "
                        f"or mismatched optimizer files)")
    return torch.cat(pieces).reshape(shape).float().clone()


class _ZeroMaster:
    """fp32 master weights from ZeRO 1/2 optimizer files.

    Each rank r's file holds, per optimizer param group, one flat fp32 partition and `param_slice_mappings`
    {param name: (start, numel) in that partition}. A parameter split over partitions is the concatenation of its
    fragments in partition order. Non-expert groups are partitioned over all data-parallel ranks 0..W-1; expert
    groups over the expert-data-parallel ranks of one expert-parallel rank (DeepSpeed's default layout: ep rank
    r % ep_size, edp rank r // ep_size), and their names carry *local* expert ids.
    """

    def __init__(self, ckpt: DSCheckpoint):
        files = {}
        for f in ckpt.tag_dir.iterdir():
            m = ZERO_FILE.match(f.name)
            if m:
                files[int(m.group(1))] = ckpt.file(f.name)
        module = ckpt._states["module"]
        if not files:
            if all(t.dtype == torch.float32 for t in module.values() if isinstance(t, torch.Tensor)):
                self.ranks = None  # fp32 without ZeRO: the module weights are the master weights
                self.ckpt = ckpt
                return
            raise UserError(f"{ckpt.tag_dir}: no ZeRO 1/2 optimizer files, so no fp32 master weights; "
                            f"use --weights module")
        world = check_rank_files(ckpt.tag_dir, files)
        saved_world = ckpt._states.get("dp_world_size")
        if isinstance(saved_world, int) and saved_world != world:
            raise UserError(f"{ckpt.tag_dir}: {world} ZeRO optimizer files, but the model was saved with "
                            f"{saved_world} data-parallel ranks (missing optimizer files?)")
        self.ckpt, self.world = ckpt, world
        self.ranks = []  # per rank: (fp32 partitions, {name: (group, start, numel)})
        n_local = 0
        for r in range(world):
            sd = load_pt(files[r], zero=True).get("optimizer_state_dict", {})
            try:
                parts, maps = sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]
            except (KeyError, TypeError):
                raise UserError(f"{files[r]}: not a ZeRO 1/2 optimizer file (no fp32 partitions)") from None
            index = {}
            for g, mapping in enumerate(maps):
                for name, addr in mapping.items():
                    index[name] = (g, int(addr.start), int(addr.numel))
                    e = names.expert_of(name)
                    if e is not None:
                        n_local = max(n_local, e[1] + 1)
            self.ranks.append((parts, index))
        if n_local == 0 or ckpt.num_experts % n_local:
            raise UserError(f"{ckpt.tag_dir}: cannot tell the expert-parallel size from the optimizer files")
        self.n_local = n_local
        self.ep_size = ckpt.num_experts // n_local
        if world % self.ep_size:
            raise UserError(f"{ckpt.tag_dir}: {world} ranks is not a multiple of expert-parallel size {self.ep_size}")

    def get(self, ours: str, global_expert: int | None, shape: tuple[int, ...]) -> torch.Tensor:
        if global_expert is None:
            ranks, name = range(self.world), ours
        else:
            ep_rank, local = divmod(global_expert, self.n_local)
            ranks = range(ep_rank, self.world, self.ep_size)
            name = names.with_expert(ours, local)
        pieces = []
        for r in ranks:
            parts, index = self.ranks[r]
            if name in index:
                g, start, numel = index[name]
                pieces.append(parts[g].narrow(0, start, numel))
        return join_fragments(self.ckpt.tag_dir, pieces, shape, name)


# ---------------------------------------------------------------------------------------------------------- writing
class _StorageRef:
    """Stands for one tensor's storage in the pickle; its bytes are written to the zip afterwards, one at a time."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LazyTensor:
    """Pickles exactly as a contiguous CPU tensor does under torch.save (`_rebuild_tensor_v2` of a storage)."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]):
        self.ref, self.shape = ref, tuple(shape)

    def __reduce_ex__(self, protocol):
        import collections

        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, torch.Size(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


def save_streaming(path: Path, obj_of_refs, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], fetch,
                   progress=None) -> int:
    """torch.save-compatible file (zip, pickle protocol 2) whose tensors are fetched and written one at a time.

    `obj_of_refs(ref)` builds the object to pickle, where `ref(name)` returns the placeholder of tensor `name`;
    `tensors` lists (name, dtype, shape) and `fetch(name)` returns the tensor. Returns the bytes of tensor data.
    """
    import io
    import pickle
    import sys

    refs: dict[str, _LazyTensor] = {}
    for i, (name, dtype, shape) in enumerate(tensors):
        numel = 1
        for s in shape:
            numel *= s
        refs[name] = _LazyTensor(_StorageRef(str(i), dtype, numel), shape)
    obj = obj_of_refs(lambda name: refs[name])
    storage_types = torch.storage._dtype_to_storage_type_map()

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _StorageRef):
                return ("storage", getattr(torch, storage_types[o.dtype]), o.key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    writer = torch._C.PyTorchFileWriter(str(path), torch.serialization.get_crc32_options(),
                                        torch.serialization._get_storage_alignment())
    total = 0
    try:
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        align = str(torch.serialization._get_storage_alignment())
        writer.write_record(".storage_alignment", align, len(align))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for name, dtype, shape in tensors:
            t = fetch(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal error: {name} is {t.dtype}{tuple(t.shape)}, planned {dtype}{shape}")
            t = t.detach().contiguous()
            if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            nbytes = t.numel() * t.element_size()
            writer.write_record(f"data/{refs[name].ref.key}", t.untyped_storage(), nbytes)
            total += nbytes
            if progress is not None:
                progress.update(1)
    finally:
        writer.write_end_of_file()
    return total


def module_layout(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(our name, shape) of every non-expert entry of our DeepSpeed model's state dict, in state-dict order: what
    `mp_rank_00_model_states.pt["module"]` must hold for `load_checkpoint` (strict)."""
    from ..surgery import build_meta_model

    model = build_meta_model(config)
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if names.is_expert_param(name):
            continue
        out.append((name, tuple(t.shape)))
    return out


def write_ds_checkpoint(source, out_dir: Path, *, ep_size: int, tag: str = "global_step0", progress=None,
                        dtype: torch.dtype | None = None) -> int:
    """Write `source` (HF MoE read interface: HFCheckpoint, DSCheckpoint, UpcycledView) as a module-only DeepSpeed
    MoE checkpoint in `out_dir` (`latest`, TAG/mp_rank_00_model_states.pt, TAG/layer_L_expert_G_...pt) that
    `engine.load_checkpoint(out_dir, load_module_only=True)` reads at any expert-parallel size dividing E.

    The expert files are per global expert, so the layout does not depend on the ep size; `ep_size` is checked
    (it must divide the number of experts) and recorded as `dp_world_size`. Returns the bytes of tensor data.
    """
    from ..surgery import read_moe_tensor

    config = dict(source.config)
    family, is_moe = family_for(config)
    if not is_moe:
        raise UserError(f"{source.path}: a DeepSpeed MoE checkpoint needs an MoE source")
    E = family.num_experts(config)
    if ep_size < 1 or E % ep_size:
        checks.ep_divides(ep_size, E)
    def module_key(name: str) -> str:
        return weight_key(config, family.hf_key_for_ds_param(name, 0), lambda k: k in source)

    def fetch(key: str) -> torch.Tensor:
        t = read_moe_tensor(source, family, key)
        return t if dtype is None else t.to(dtype)

    module = []
    for name, shape in module_layout(config):
        key = module_key(name)
        if key not in source and family.parse_moe_key(key) is None:
            raise checks.missing_tensor_error(source.path, key)
        t_dtype = dtype or (source.dtype(key) if key in source else None)
        module.append((name, key, shape, t_dtype))
    tag_dir = child(out_dir, tag, "--out-tag")
    tag_dir.mkdir(parents=True)
    by_name = {name: key for name, key, _, _ in module}
    plan = []
    for name, key, shape, t_dtype in module:
        if t_dtype is None:
            t_dtype = fetch(key).dtype
        got = source.shape(key) if key in source else shape
        if tuple(got) != tuple(shape):
            raise UserError(f"{source.path}: {key} has shape {tuple(got)}, the model expects {shape}")
        plan.append((name, t_dtype, shape))
    moe = family.moe_layers(config)

    def states(ref):
        import collections

        return {"module": collections.OrderedDict((n, ref(n)) for n, _, _ in plan),
                "buffer_names": [], "optimizer": None, "param_shapes": None, "frozen_param_shapes": None,
                "shared_params": None, "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None,
                "random_ltd": None, "sparse_tensor_module_names": [], "skipped_steps": 0, "global_steps": 0,
                "global_samples": 0, "dp_world_size": ep_size, "mp_world_size": 1, "num_experts": [E] * len(moe),
                "ds_autoep_layers": None, "ds_version": _ds_version()}

    total = save_streaming(tag_dir / MODEL_STATES, states, plan, lambda n: fetch(by_name[n]), progress)
    for L, layer in enumerate(moe):
        for g in range(E):
            eplan, keys = [], {}
            for proj in PROJS:
                ours = ds_expert_name(layer, g, proj)
                keys[ours] = family.expert_key(layer, g, proj)
                t = fetch(keys[ours])
                eplan.append((ours, t.dtype, tuple(t.shape)))
                keys[ours] = t  # one expert (3 tensors) in memory at a time
            total += save_streaming(tag_dir / EXPERT_FILE.format(moe_layer=L, expert=g),
                                    lambda ref: {n: ref(n) for n, _, _ in eplan}, eplan, keys.pop, progress)
    (out_dir / "latest").write_text(tag)
    return total


def _ds_version() -> str:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:
        return "unknown"
