"""The mask store: one frozen backbone and many task masks in one folder (local or any pyarrow URI).

The paper's practical promise (Table 1 "Size", App. C) is that a deployment keeps one copy of the
backbone and a cheap mask per task. A store is that deployment::

    <store>/store.json              {"format": "smn-store/1", "arch", "backbone_hash", "weights_source", ...}
    <store>/backbone.safetensors    the backbone's state_dict (fp32), hashed by smn_core.mask_file.backbone_hash
    <store>/tasks/<task>.smnmask    one smn-mask/1 file per task (smn_core.mask_file)

``<store>`` is a local path or any URI ``pyarrow.fs`` understands (``s3://bucket/prefix``,
``file:///...``); :class:`StoreLayout` names these files, and every one is written through
:func:`smn_core.checkpoint.atomic_write`. An existing task or store is never overwritten. :meth:`MaskStore.apply` builds the backbone once (checking it against the
recorded hash) and then switches tasks by swapping masks (:class:`smn_core.mask_file.MaskSwitcher`),
without reloading it. A mask whose backbone hash differs from the store's is refused on ``add``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from smn_core.backbones import build_backbone
from smn_core.checkpoint import atomic_write, location_join
from smn_core.mask_codecs import DEFAULT_CODEC, available_codecs
from smn_core.mask_file import (
    BackboneMismatchError,
    MaskFileError,
    MaskSwitcher,
    PackedTaskMask,
    TaskMask,
    TaskModel,
    backbone_hash,
    backbone_state,
    check_names_shapes,
    decode_mask_file,
    decode_packed_mask_file,
    encode_mask_file,
    masks_file_identity,
    read_mask_header,
    task_mask_from_state,
    verify_mask_file,
)

from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout, filesystem, pretrain_artifact_path
from orchestrator.store.layout import STORE_FORMAT, TASK_SUFFIX, StoreError, StoreLayout, validate_task_name
from orchestrator.store.layout import exists as _exists

__all__ = ["MaskStore", "StoreLayout", "StoreError", "TaskInfo", "STORE_FORMAT", "TASK_SUFFIX", "validate_task_name",
           "task_from_masks_file", "task_from_cell", "load_fp32_weights", "HEAD_PREFIX",
           "read_probe_head", "with_probe_head"]

#: Name of the classification head in each backbone family's checkpoints (for exported weights).
HEAD_PREFIX = {"cifar_resnet": "linear", "resnet18": "fc", "resnet50": "fc"}


@dataclass(frozen=True)
class TaskInfo:
    """One stored task as :meth:`MaskStore.list` shows it (read from the file's header only).

    ``file_bytes``: the whole file; ``num_weights``: masked weights; ``bits_per_weight``: file bits
    over masked weights (head and BN statistics included).
    """

    task: str
    codec: str
    file_bytes: int
    num_weights: int
    density: float
    has_head: bool
    num_buffers: int
    arch: str

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.file_bytes / max(1, self.num_weights)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _read_file(location: str, what: str) -> bytes:
    """The bytes of the file at ``location`` (local or any ``pyarrow.fs`` URI).

    Raises:
        FileNotFoundError: ``"no <what> at <location>"``.
    """
    fs, path = filesystem(location)
    if not _exists(fs, path):
        raise FileNotFoundError(f"no {what} at {location!r}")
    return _read(fs, path)


class MaskStore:
    """A store at ``location`` (see module docstring). Open an existing one with ``MaskStore(location)``,
    make a new one with :meth:`create`.

    Raises:
        StoreError: if there is no store at ``location`` or its ``store.json`` is unreadable.
    """

    def __init__(self, location: str) -> None:
        self.location = str(location)
        self.files = StoreLayout.of(self.location)
        self.fs, self.root = self.files.fs, self.files.root
        path = self.files.meta
        if not _exists(self.fs, path):
            raise StoreError(f"no mask store at {self.location!r} (no store.json); create one with `smn store init`")
        try:
            self.meta: dict[str, Any] = json.loads(_read(self.fs, path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path} is not valid JSON ({exc})") from None
        if self.meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: format {self.meta.get('format')!r} is not {STORE_FORMAT!r}")
        self._switcher: MaskSwitcher | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self._facts: tuple[int, tuple[float, ...], tuple[float, ...]] | None = None

    # ------------------------------------------------------------------ creation and backbone
    @classmethod
    def create(cls, location: str, backbone: nn.Module, arch: str, weights_source: str = "") -> MaskStore:
        """Make a new store holding ``backbone`` (a plain model, e.g. ``build_backbone(...).model``).

        Args:
            arch: the backbone's registry name, used by :meth:`backbone` to rebuild it.
            weights_source: where the weights came from (informative).

        Raises:
            StoreError: if a store (or anything at ``store.json``) already exists at ``location``.
            ValueError: if the backbone carries score masks.
        """
        files = StoreLayout.of(str(location))
        if _exists(files.fs, files.meta):
            raise StoreError(f"a mask store already exists at {location!r}; nothing was changed")
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        if any(".parametrizations." in k for k in state):
            raise ValueError("store the plain backbone, not one with score masks attached")
        files.fs.create_dir(files.tasks, recursive=True)
        h = backbone_hash(backbone)
        atomic_write(files.backbone, st_save(state, metadata={"arch": arch, "backbone_hash": h}), fs=files.fs)
        meta = {"format": STORE_FORMAT, "arch": arch, "backbone_hash": h, "weights_source": weights_source,
                "backbone_params": int(sum(v.numel() for k, v in state.items() if v.is_floating_point())),
                "created_at": time.time()}
        atomic_write(files.meta, json.dumps(meta, indent=1, sort_keys=True).encode(), fs=files.fs)
        return cls(location)

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def backbone_hash(self) -> str:
        return self.meta["backbone_hash"]

    def _load_backbone(self) -> nn.Module:
        data = _read(self.fs, self.files.backbone)
        try:
            state = st_load(data)
        except Exception as exc:  # safetensors' own error types
            raise StoreError(f"{self.files.backbone} is not readable ({exc})") from None
        with torch.random.fork_rng(devices=[]):
            built = build_backbone(self.arch, "random")
        model = built.model
        self._facts = (built.input_size, tuple(built.mean), tuple(built.std))
        model.load_state_dict(state, strict=True)
        h = backbone_hash(model)
        if h != self.backbone_hash:
            raise BackboneMismatchError(f"{self.files.backbone} hashes to {h}, store.json records "
                                        f"{self.backbone_hash}: the store's backbone file is corrupted")
        return model.eval()

    def switcher(self) -> MaskSwitcher:
        """The store's loaded backbone (built and hash-checked on first use, then kept)."""
        if self._switcher is None:
            model = self._load_backbone()
            self._switcher = MaskSwitcher(model, model_hash=self.backbone_hash)
        return self._switcher

    def input_facts(self) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
        """``(input size in pixels, RGB mean, RGB std)`` that the store's backbone expects (its arch's
        evaluation transform, :func:`smn_core.augment.eval_transform`); loads the backbone on first use."""
        if self._facts is None:
            self.switcher()
        return self._facts  # type: ignore[return-value]

    def backbone_weights(self) -> dict[str, torch.Tensor]:
        """The pristine backbone tensors by name (codec context for ``smn-ctx``)."""
        if self._weights is None:
            sw = self.switcher()
            model = sw.reset().backbone
            self._weights = {k: v.detach().clone() for k, v in backbone_state(model).items()}
        return self._weights

    # ------------------------------------------------------------------ tasks
    def _task_path(self, task: str) -> str:
        return self.files.task(task)

    def add(self, task: str, mask: TaskMask, codec: str = DEFAULT_CODEC) -> TaskInfo:
        """Encode ``mask`` with ``codec`` and store it as ``task``.

        Raises:
            StoreError: bad or existing task name (nothing is overwritten).
            ValueError: unknown codec.
            BackboneMismatchError: the mask's backbone hash, names or shapes differ from the store's.
        """
        path = self._task_path(task)
        if codec not in available_codecs():
            raise ValueError(f"codec {codec!r} is not known; allowed: {', '.join(available_codecs())}")
        if _exists(self.fs, path):
            raise StoreError(f"task {task!r} already exists in {self.location!r}; nothing was changed")
        if mask.backbone_hash != self.backbone_hash:
            raise BackboneMismatchError(f"mask belongs to backbone {mask.backbone_hash} ({mask.arch or 'arch unknown'}), "
                                        f"the store's backbone is {self.backbone_hash} ({self.arch}); refusing to add it")
        sw = self.switcher()
        check_names_shapes(mask.masks, sw.model.backbone, mask.buffers)
        data = encode_mask_file(mask, codec, weights=self.backbone_weights())
        atomic_write(path, data, fs=self.fs)
        return self._info(task, read_mask_header(data, path))

    def has(self, task: str) -> bool:
        return _exists(self.fs, self._task_path(task))

    @staticmethod
    def _info(task: str, h: dict[str, Any]) -> TaskInfo:
        return TaskInfo(task=task, codec=h["codec"], file_bytes=h["file_bytes"], num_weights=h["num_weights"],
                        density=h["density"], has_head=any(k.startswith("head.") for k in h["tensors"]),
                        num_buffers=sum(k.startswith("buffer.") for k in h["tensors"]), arch=h["arch"])

    def _header_bytes(self, path: str) -> bytes:
        with self.fs.open_input_file(path) as f:
            first = f.read(8)
            if len(first) < 8:
                return first
            n = int.from_bytes(first, "little")
            return first + f.read(min(n, 100_000_000))

    def list(self) -> list[TaskInfo]:
        """Every task, sorted by name, from the files' headers (nothing decoded).

        Raises:
            MaskFileError: if a task file's header is unreadable (names the file).
        """
        infos = self.fs.get_file_info(pafs.FileSelector(self.files.tasks, allow_not_found=True))
        out = []
        for fi in sorted(infos, key=lambda f: f.path):
            name = fi.path.rsplit("/", 1)[-1]
            if fi.type != pafs.FileType.File or not name.endswith(TASK_SUFFIX) or name.startswith("."):
                continue
            head = read_mask_header(self._header_bytes(fi.path), fi.path)
            out.append(self._info(name[: -len(TASK_SUFFIX)], head | {"file_bytes": fi.size}))
        return out

    def show(self, task: str) -> dict[str, Any]:
        """Header facts of one task: codec, sizes, density per tensor, spec, backbone hash, head, buffers.

        Raises:
            StoreError: unknown task. MaskFileError: a truncated or corrupted file (checksum checked).
        """
        path = self._require(task)
        h = verify_mask_file(_read(self.fs, path), path)
        size = self.fs.get_file_info(path).size
        info = self._info(task, h | {"file_bytes": size})
        return {"task": task, "codec": h["codec"], "file_bytes": size, "num_weights": h["num_weights"],
                "density": h["density"], "bits_per_weight": info.bits_per_weight,
                "ratio_vs_fp32": 32.0 * h["num_weights"] / (8.0 * size), "backbone_hash": h["backbone_hash"],
                "arch": h["arch"], "has_head": info.has_head, "num_buffers": info.num_buffers,
                "tensors": [{"name": n, "shape": list(s), "density": k / max(1, math.prod(s))}
                            for n, s, k in h["entries"]],
                "spec": h["spec"]}

    def _require(self, task: str) -> str:
        path = self._task_path(task)
        if not _exists(self.fs, path):
            known = [t.task for t in self.list()]
            raise StoreError(f"task {task!r} is not in {self.location!r}; stored tasks: "
                             f"{', '.join(known[:20]) or '(none)'}{' ...' if len(known) > 20 else ''}")
        return path

    def load(self, task: str) -> TaskMask:
        """Read, verify (checksum) and decode one task.

        Raises:
            StoreError: unknown task. MaskFileError: truncated or corrupted file.
        """
        path = self._require(task)
        return decode_mask_file(_read(self.fs, path), weights=self.backbone_weights(), source=path)

    def load_packed(self, task: str) -> PackedTaskMask:
        """:meth:`load` with the masks left bit-packed (:func:`smn_core.mask_file.decode_packed_mask_file`): a
        serving replica's cold task switch, which keeps the bits packed anyway. Same checks and errors."""
        path = self._require(task)
        return decode_packed_mask_file(_read(self.fs, path), weights=self.backbone_weights(), source=path)

    def apply(self, task: str) -> TaskModel:
        """A ready model for ``task``: the store's backbone (loaded once) with the task's masks, BN
        statistics and head applied. Switching tasks swaps masks on the same model object, so a
        model returned earlier now computes the new task.

        Raises:
            StoreError, MaskFileError, BackboneMismatchError: as for :meth:`load` and the hash check.
        """
        return self.switcher().apply(self.load(task), name=task)

    def export(self, task: str, out: str, fmt: str = "masks", codec: str | None = None) -> str:
        """Write one task out of the store; returns the path written.

        Formats: ``"masks"``: ``{name: bool tensor}`` safetensors (the runner's masks format; re-importable
        with :func:`task_from_masks_file`); ``"weights"``: the ready model's state_dict with the masks
        baked in (``W * M / alpha``) and the head under the family's name (``linear.*`` for CIFAR ResNets,
        ``fc.*`` for timm ResNets), loadable with ``build_backbone(arch, "checkpoint", checkpoint=out)``;
        ``"mask-file"``: the ``smn-mask/1`` file, re-encoded with ``codec`` if given.

        Raises:
            StoreError: unknown task, ``out`` exists already, or an unknown format.
        """
        formats = ("masks", "weights", "mask-file")
        if fmt not in formats:
            raise StoreError(f"export format {fmt!r} is not known; allowed: {', '.join(formats)}")
        if codec is not None and codec not in available_codecs():
            raise ValueError(f"codec {codec!r} is not known; allowed: {', '.join(available_codecs())}")
        fs, path = filesystem(out)
        if _exists(fs, path):
            raise StoreError(f"{out!r} exists already; nothing was written")
        mask = self.load(task)
        meta = {"task": task, "arch": self.arch, "backbone_hash": self.backbone_hash}
        if fmt == "masks":
            data = st_save({k: v.contiguous() for k, v in mask.masks.items()}, metadata=meta)
        elif fmt == "mask-file":
            data = encode_mask_file(mask, codec or read_mask_header(self._header_bytes(self._task_path(task)))["codec"],
                                    weights=self.backbone_weights())
        else:
            model = self.apply(task)
            state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
            prefix = next((v for k, v in HEAD_PREFIX.items() if self.arch.startswith(k)), None)
            if mask.head and prefix:
                state[f"{prefix}.weight"] = mask.head["weight"].contiguous()
                state[f"{prefix}.bias"] = mask.head["bias"].contiguous()
            data = st_save(state, metadata=meta | {"head": "yes" if mask.head and prefix else "no"})
        return atomic_write(path, data, fs=fs)


# ---------------------------------------------------------------------- reading tasks from outside


def task_from_masks_file(path: str, backbone: nn.Module, *, arch: str = "", state_dir: str | None = None,
                         spec: dict[str, Any] | None = None) -> TaskMask:
    """A task from a plain ``{name: bool tensor}`` masks ``.safetensors`` (e.g. a runner's
    ``masks/<cell_id>.safetensors`` or :meth:`MaskStore.export` ``"masks"``).

    The file carries no backbone identity: the masks are bound to ``backbone`` (names and shapes are
    checked, its hash recorded). ``state_dir`` (a ``smn_core.checkpoint`` folder with the run's final
    trainable state) adds the head and BN statistics.

    Raises:
        FileNotFoundError: missing file. MaskFileError: unreadable file or non-boolean tensors.
        BackboneMismatchError: names or shapes do not fit ``backbone``.
    """
    data = _read_file(path, "masks file")
    try:
        masks = st_load(data)
        file_arch, file_hash = masks_file_identity(data)
    except Exception as exc:  # safetensors' own error types
        raise MaskFileError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    if arch:
        if not file_arch:
            raise BackboneMismatchError(f"{path} records no backbone arch or hash, so it cannot be checked against "
                                        f"the store's {arch}; allowed: a masks file from `smn run` (masks/<cell>."
                                        "safetensors) or `smn store export`, or add the cell with --results/"
                                        "--experiment/--cell")
        if file_arch != arch:
            raise BackboneMismatchError(f"{path} holds masks of a {file_arch} backbone; the store's backbone is {arch}; "
                                        "allowed: masks learned on the store's backbone")
    if file_hash and file_hash != backbone_hash(backbone):
        raise BackboneMismatchError(f"{path} was learned on backbone {file_hash}, the store's is "
                                    f"{backbone_hash(backbone)}; allowed: masks learned on the store's backbone")
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad or not masks:
        raise MaskFileError(f"{path}: expected bool mask tensors, got {[(k, str(masks[k].dtype)) for k in bad[:5]] or 'none'}")
    state = _read_state(state_dir) if state_dir else None
    return task_mask_from_state(masks, backbone, state=state, arch=arch, spec=spec)


def _read_state(folder: str) -> dict[str, torch.Tensor]:
    fs, path = filesystem(location_join(folder, "tensors.safetensors"))
    if not _exists(fs, path):
        raise FileNotFoundError(f"no final state in {folder!r} (missing tensors.safetensors)")
    try:
        return st_load(_read(fs, path))
    except Exception as exc:  # safetensors' own error types
        raise MaskFileError(f"{path}: not a readable safetensors file ({exc})") from None


def task_from_cell(results: str, experiment: str, cell_id: str, store: MaskStore) -> TaskMask:
    """A task from a finished cell of ``smn run``: ``<results>/<experiment>/masks/<cell_id>.safetensors``,
    its final state ``states/<cell_id>/`` (head, BN statistics) and its config from the ledger.

    The cell's own backbone is rebuilt from its config and hashed; a cell learned on other weights
    than the store's backbone is refused.

    Raises:
        StoreError: no such cell in the ledger, or a cell without masks (e.g. ``pretrained``, ``fft``).
        BackboneMismatchError: the cell's backbone hash (or arch) differs from the store's.
    """
    from pydantic import TypeAdapter

    from smn_core.pipeline import prepare_backbone
    from smn_core.config import CellConfig

    df = ledger.read_ledger(results, experiment)
    rows = df[df["cell_id"] == cell_id]
    if rows.empty:
        known = sorted(df["cell_id"].unique())
        raise StoreError(f"cell {cell_id!r} is not in the ledger of {experiment!r} under {results!r}; "
                         f"cells there: {', '.join(known[:10]) or '(none)'}")
    config = json.loads(rows["config_json"].iloc[0])
    lay = ExperimentLayout.of(results, experiment)
    masks_path = lay.inner("masks", f"{cell_id}.safetensors")
    if not _exists(lay.fs, masks_path):
        raise StoreError(f"cell {cell_id!r} ({rows['method'].iloc[0]}) has no masks at {masks_path}")
    cfg = TypeAdapter(CellConfig).validate_python(config)
    if cfg.backbone.arch != store.arch:
        raise BackboneMismatchError(f"cell {cell_id} used backbone {cfg.backbone.arch!r}, the store holds {store.arch!r}")
    pipeline_weights = None
    if cfg.backbone.weights == "pipeline":
        pipeline_weights = pretrain_artifact_path(results, experiment, cfg)
    backbone = prepare_backbone(cfg.backbone, pipeline_weights=pipeline_weights).model
    h = backbone_hash(backbone)
    if h != store.backbone_hash:
        raise BackboneMismatchError(f"cell {cell_id} was learned on backbone {h}, the store's is {store.backbone_hash}; "
                                    "refusing to add it")
    has_state = _exists(lay.fs, lay.inner("states", cell_id, "tensors.safetensors"))
    masks_uri = lay.mask(cell_id)
    state_uri = lay.state(cell_id) if has_state else None
    spec = {"cell_id": cell_id, "experiment": experiment, "config": config}
    task = task_from_masks_file(masks_uri, backbone, arch=cfg.backbone.arch, state_dir=state_uri, spec=spec)
    if _exists(lay.fs, lay.inner("probes", f"{cell_id}.safetensors")):
        task = with_probe_head(task, read_probe_head(lay.probe(cell_id)))
    return task


def read_probe_head(location: str) -> dict[str, Any]:
    """A cell's linear-probe head file (``probes/<cell_id>.safetensors``, written when the cell lands):
    ``{"weight" (C, F), "bias" (C,), "mean" (F,), "scale" (F,), "labels" (C,), "classes": [names in label
    order]}``.

    Raises:
        FileNotFoundError: nothing at ``location``. MaskFileError: not a probe head file.
    """
    data = _read_file(location, "probe head file")
    try:
        tensors = st_load(data)
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        classes = json.loads(meta.get("classes", "[]"))
    except Exception as exc:  # safetensors' and json's own error types
        raise MaskFileError(f"{location}: not a readable probe head file ({' '.join(str(exc).split())})") from None
    need = {"weight", "bias", "mean", "scale", "labels"}
    if not need <= set(tensors):
        raise MaskFileError(f"{location}: a probe head file holds {sorted(need)}, this one {sorted(tensors)}")
    return {**tensors, "classes": [str(c) for c in classes]}


def with_probe_head(task: TaskMask, probe: dict[str, Any]) -> TaskMask:
    """``task`` with the head a ``/classify`` answers with, and its class names in ``spec["head"]``.

    A task with a trained head (supervised masking) keeps it and only gains the class names. Otherwise the
    cell's linear probe becomes the head, its standardisation folded in: ``weight / scale`` and
    ``bias - (weight / scale) @ mean`` (float64, stored as float32), so ``head(features)`` gives the probe's
    logits ``((features - mean) / scale) @ weight.T + bias``.
    """
    names = probe["classes"]
    labels = [int(v) for v in probe["labels"].tolist()]
    per_output = [names[v] if 0 <= v < len(names) else str(v) for v in labels]
    spec = dict(task.spec)
    if task.head:
        rows = task.head["weight"].shape[0]
        spec["head"] = {"source": "trained classifier", "classes": names if len(names) == rows else
                        [str(i) for i in range(rows)]}
        return TaskMask(task.masks, task.backbone_hash, task.arch, spec, task.head, task.buffers)
    w = probe["weight"].double() / probe["scale"].double()
    b = probe["bias"].double() - w @ probe["mean"].double()
    spec["head"] = {"source": "linear probe", "classes": per_output,
                    "standardisation": "folded into weight and bias"}
    return TaskMask(task.masks, task.backbone_hash, task.arch, spec, {"weight": w.float(), "bias": b.float()},
                    task.buffers)


def load_fp32_weights(location: str) -> dict[str, torch.Tensor]:
    """Floating-point weights by backbone tensor name, for the fp32 rows of the codec measurements
    (``smn store bench-codecs --fp32``): a safetensors ``state_dict``, or a cell's final state folder
    (its ``tensors.safetensors``, names under ``param.backbone.``).

    Raises:
        FileNotFoundError: nothing at ``location``.
    """
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs, path = filesystem(location_join(location, "tensors.safetensors"))
    elif info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--fp32 {location!r} does not exist")
    state = st_load(_read(fs, path))
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("param.backbone.", ""):
            if k.startswith(prefix) and v.is_floating_point():
                out.setdefault(k[len(prefix):], v)
    return out
