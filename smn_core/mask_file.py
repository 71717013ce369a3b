"""The task mask file: one learned mask set, bound to the backbone it belongs to, safe to load.

A self-masking network adapts a frozen backbone to a task by a binary mask (paper Sec. 3.1), so a
task costs 1 bit per masked weight instead of a 32-bit fine-tuned copy (paper Table 1 "Size",
App. C). This module defines the file that carries one task:

* the masks, bit-packed (1 bit per weight) and coded by a codec of :mod:`smn_core.mask_codecs`
  (``"zstd"`` by default, ``"smn-ctx"`` the smallest; ``"none"`` keeps plain ``numpy.packbits``), with
  each tensor's name, shape and count of kept weights;
* the learned linear head if the task has one (supervised masking), and the task's BatchNorm
  statistics when adaptation changed them (``bn_mode="adapt"``), so the applied model computes
  exactly what the trained masked model computed;
* the spec that produced it (JSON) and :func:`backbone_hash` of the backbone weights it belongs to.

Format (``smn-mask/1``): a safetensors file (no pickle). Tensors: ``payload`` (uint8, the codec's
bytes), ``head.weight`` / ``head.bias`` (optional), ``buffer.<name>`` (optional). Header metadata
(all strings): ``format``, ``codec``, ``backbone_hash``, ``arch``, ``entries`` (JSON list of
``[name, shape, ones]``), ``spec`` (JSON), ``checksum`` (SHA-256 over the other metadata and every
tensor's name, dtype, shape and bytes). A truncated or corrupted file, a checksum mismatch, or
entries that do not decode are refused with :class:`MaskFileError`; a mask applied to a backbone
whose hash differs is refused with :class:`BackboneMismatchError`.

Plain PyTorch + numpy + safetensors; never imports ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save
from torch import nn

from .mask_codecs import DEFAULT_CODEC, CodecError, get_codec, pack_bits
from .masking import mask_modules

__all__ = [
    "FORMAT",
    "TaskMask",
    "MaskFileError",
    "BackboneMismatchError",
    "pack_mask",
    "unpack_mask",
    "backbone_hash",
    "backbone_state",
    "encode_mask_file",
    "decode_mask_file",
    "decode_packed_mask_file",
    "PackedTaskMask",
    "mask_alpha",
    "mask_alphas",
    "backbone_shapes",
    "read_mask_header",
    "check_names_shapes",
    "verify_mask_file",
    "masks_file_identity",
    "check_against_backbone",
    "apply_task_mask",
    "task_mask_from_state",
    "MaskSwitcher",
    "TaskModel",
]

FORMAT = "smn-mask/1"
_HEADER_LIMIT = 100_000_000  # bytes; safetensors' own limit on the JSON header


class MaskFileError(ValueError):
    """A mask file that cannot be trusted: not a mask file, truncated, corrupted, or inconsistent."""


class BackboneMismatchError(ValueError):
    """A mask applied to a backbone it does not belong to (different weights hash, names or shapes)."""


# --------------------------------------------------------------------------------------------------
# packing and hashing
# --------------------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """One mask tensor, bit-packed: uint8 array of ``ceil(numel / 8)`` bytes (row-major, MSB first).

    Raises:
        ValueError: if the mask holds values other than 0/1.
    """
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.frombuffer(pack_bits([arr]), dtype=np.uint8).copy()


def unpack_mask(packed: np.ndarray | bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``.

    Raises:
        ValueError: if ``packed`` has not exactly ``ceil(prod(shape) / 8)`` bytes.
    """
    buf = np.frombuffer(bytes(packed), dtype=np.uint8) if isinstance(packed, (bytes, bytearray)) else np.asarray(packed, dtype=np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    if buf.size != (n + 7) // 8:
        raise ValueError(f"a packed mask of shape {tuple(shape)} needs {(n + 7) // 8} bytes, got {buf.size}")
    return torch.from_numpy(np.unpackbits(buf, count=n).astype(np.bool_).reshape(shape))


_PARAM_RE = re.compile(r"^(.*?)(?:\.)?parametrizations\.([^.]+)\.original$")


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own tensors by canonical name: parameters and floating-point buffers, with any
    mask parametrization removed (``conv1.parametrizations.weight.original`` -> ``conv1.weight``;
    scores dropped) and ``num_batches_tracked`` counters left out (they change with BN adaptation and
    are absent from old checkpoints). Tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if ".parametrizations." in f".{name}" or name.startswith("parametrizations."):
            m = _PARAM_RE.match(name)
            if m is None:
                continue  # a parametrization's own state (scores)
            prefix, pname = m.group(1), m.group(2)
            name = f"{prefix}.{pname}" if prefix else pname
        if name.endswith("num_batches_tracked") or not t.is_floating_point():
            continue
        out[name] = t
    return out


def backbone_hash(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over the backbone's weights in a canonical order.

    Hashes, for each tensor of :func:`backbone_state` (or of the given mapping) in sorted name
    order: the name, dtype, shape and the raw bytes of the values (on CPU; little-endian on every
    platform torch supports). Two backbones
    with the same hash compute the same function; a mask file records the hash of the backbone it
    was learned on.

    Raises:
        ValueError: if there is no floating-point tensor to hash.
    """
    state = backbone_state(model) if isinstance(model, nn.Module) else {
        k: v for k, v in model.items() if v.is_floating_point() and not k.endswith("num_batches_tracked")}
    if not state:
        raise ValueError("backbone has no floating-point tensors to hash")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bf16 included)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the in-memory task mask and its file
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskMask:
    """One task: masks + optional head and BN statistics, bound to a backbone hash.

    Attributes:
        masks: ``{parameter name: bool tensor of the parameter's shape}`` (as from
            :func:`smn_core.masking.export_masks`).
        backbone_hash: :func:`backbone_hash` of the backbone the masks were learned on.
        arch: backbone registry name (``smn_core.backbones``), informative.
        spec: the configuration that produced the masks (JSON-serialisable), e.g. a cell's config.
        head: learned linear head ``{"weight": (C, F), "bias": (C,)}`` or empty.
        buffers: task BatchNorm statistics ``{buffer name: tensor}`` that differ from the backbone's
            (``bn_mode="adapt"``), or empty.
    """

    masks: dict[str, torch.Tensor]
    backbone_hash: str
    arch: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.masks:
            raise ValueError("a task mask needs at least one mask tensor")
        for name, m in self.masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)}")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", str(self.backbone_hash)):
            raise ValueError(f"backbone_hash {self.backbone_hash!r} is not of the form 'sha256:<64 hex digits>'")
        _check_head(self.head)

    @property
    def num_weights(self) -> int:
        """Number of masked weights (bits of the uncompressed mask)."""
        return sum(m.numel() for m in self.masks.values())

    @property
    def density(self) -> float:
        """Fraction of masked weights kept, in [0, 1]."""
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, self.num_weights)


def _check_head(head: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``head`` is empty or ``{"weight": (C, F), "bias": (C,)}``."""
    if head:
        w, b = head.get("weight"), head.get("bias")
        if set(head) != {"weight", "bias"} or w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError("head must be {'weight': (C, F), 'bias': (C,)} of a linear classifier, got "
                             f"{ {k: tuple(v.shape) for k, v in head.items()} }")


def _checksum(meta: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        # the text of json.dumps([name, dtype, shape]), built without the list encoder (a dtype string needs no
        # escaping; tested equal), then the raw bytes without a copy
        h.update(f'[{json.dumps(name)}, "{a.dtype.str}", [{", ".join(map(str, a.shape))}]]'.encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


def _weight_context(weights: Mapping[str, torch.Tensor], names: list[str],
                    missing_error: Callable[[list[str]], Exception]) -> list[np.ndarray]:
    """The float32 backbone tensors ``names`` (the ``smn-ctx`` codec's context); ``missing_error(first 5
    missing names)`` is raised when ``weights`` lacks some."""
    missing = [n for n in names if n not in weights]
    if missing:
        raise missing_error(missing[:5])
    return [_np(weights[n]).astype(np.float32) for n in names]


def encode_mask_file(task: TaskMask, codec: str = DEFAULT_CODEC,
                     weights: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialise a task to the bytes of an ``smn-mask/1`` file.

    Args:
        task: the task.
        codec: a name from :func:`smn_core.mask_codecs.available_codecs`.
        weights: the backbone tensors by name (e.g. :func:`backbone_state`); ``smn-ctx`` uses the
            masked tensors as context (then decoding needs them too). Ignored by the other codecs.

    Raises:
        ValueError: unknown codec; ``weights`` lacking a masked tensor or with another shape.
    """
    c = get_codec(codec)
    names = list(task.masks)
    arrays = [_np(task.masks[n]) for n in names]
    ctx = None
    if weights is not None and codec == "smn-ctx":
        ctx = _weight_context(weights, names, lambda m: ValueError(f"backbone weights lack the masked tensors {m}"))
    payload = c.encode(arrays, ctx)
    tensors: dict[str, np.ndarray] = {"payload": np.frombuffer(payload, dtype=np.uint8).copy()}
    for k, v in task.head.items():
        tensors[f"head.{k}"] = _np(v)
    for k, v in task.buffers.items():
        tensors[f"buffer.{k}"] = _np(v)
    meta = {
        "format": FORMAT,
        "codec": codec,
        "backbone_hash": task.backbone_hash,
        "arch": task.arch,
        "entries": json.dumps([[n, list(a.shape), int(a.sum())] for n, a in zip(names, arrays)]),
        "spec": json.dumps(task.spec, sort_keys=True, default=str),
    }
    meta["checksum"] = _checksum(meta, tensors)
    return _st_save(tensors, metadata=meta)


def read_mask_header(data: bytes, source: str = "mask file") -> dict[str, Any]:
    """Parse only the header of an ``smn-mask/1`` file (no decoding, no checksum): ``format``,
    ``codec``, ``backbone_hash``, ``arch``, ``entries`` (list of ``(name, shape, ones)``), ``spec``
    (dict), ``tensors`` (``{name: {"dtype", "shape", "bytes"}}``), ``num_weights``, ``density``.

    ``data`` may be just the first bytes of the file, as long as the header is complete.

    Raises:
        MaskFileError: if ``data`` does not start with a complete safetensors header of an
            ``smn-mask/1`` file.
    """
    header = _read_header(data, source)
    header.pop("_meta")
    return header


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    """:func:`read_mask_header` plus ``"_meta"``, the raw safetensors metadata (for the checksum)."""
    if len(data) < 8:
        raise MaskFileError(f"{source}: {len(data)} bytes, too short for a mask file (truncated?)")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > _HEADER_LIMIT:
        raise MaskFileError(f"{source}: header length {n} is implausible; not an {FORMAT} file")
    if len(data) < 8 + n:
        raise MaskFileError(f"{source}: header needs {8 + n} bytes, only {len(data)} present (truncated)")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        meta = header.pop("__metadata__", None) or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise MaskFileError(f"{source}: header is not valid JSON ({exc}); corrupted or not a mask file") from None
    if meta.get("format") != FORMAT:
        raise MaskFileError(f"{source}: format {meta.get('format')!r} is not {FORMAT!r}; not a mask file")
    try:
        entries = [(str(e[0]), tuple(int(x) for x in e[1]), int(e[2])) for e in json.loads(meta["entries"])]
        spec = json.loads(meta.get("spec", "{}"))
        tensors = {k: {"dtype": v["dtype"], "shape": v["shape"], "bytes": v["data_offsets"][1] - v["data_offsets"][0]}
                   for k, v in header.items()}
        for key in ("codec", "backbone_hash", "checksum"):
            meta[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError) as exc:
        raise MaskFileError(f"{source}: header metadata is incomplete or malformed ({type(exc).__name__}: {exc})") from None
    total = sum(math.prod(s) for _, s, _ in entries)
    ones = sum(k for _, _, k in entries)
    return {"format": meta["format"], "codec": meta["codec"], "backbone_hash": meta["backbone_hash"],
            "arch": meta.get("arch", ""), "entries": entries, "spec": spec, "tensors": tensors,
            "checksum": meta["checksum"], "num_weights": total, "density": ones / total if total else float("nan"),
            "file_bytes": 8 + n + sum(t["bytes"] for t in tensors.values()), "_meta": meta}


def _verified(data: bytes, source: str) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """``(header, safetensors metadata, tensors)`` of a whole ``smn-mask/1`` file whose length and checksum
    hold; :class:`MaskFileError` otherwise."""
    header = _read_header(data, source)
    meta = header.pop("_meta")
    if len(data) != header["file_bytes"]:
        raise MaskFileError(f"{source}: {len(data)} bytes, the header describes {header['file_bytes']} (truncated or "
                            "trailing data): the file is corrupted")
    try:
        tensors = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise MaskFileError(f"{source}: not a readable safetensors file ({exc}): the file is corrupted") from None
    if _checksum(meta, tensors) != header["checksum"]:
        raise MaskFileError(f"{source}: checksum mismatch: the file is corrupted")
    return header, meta, tensors


def verify_mask_file(data: bytes, source: str = "mask file") -> dict[str, Any]:
    """Check a whole ``smn-mask/1`` file without decoding it: a complete header, the described length and
    the checksum. Returns the header (:func:`read_mask_header`).

    Raises:
        MaskFileError: truncated or corrupted file, checksum mismatch.
    """
    header, _, _ = _verified(data, source)
    return header


def masks_file_identity(data: bytes) -> tuple[str, str]:
    """``(arch, backbone_hash)`` recorded in a plain masks ``.safetensors``' metadata (``""`` where absent);
    the runner records ``arch``, :meth:`orchestrator.store.mask_store.MaskStore.export` both.

    Raises:
        ValueError: ``data`` does not start with a safetensors header.
    """
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > _HEADER_LIMIT or len(data) < 8 + n:
        raise ValueError("no complete safetensors header")
    meta = json.loads(bytes(data[8:8 + n]).decode("utf-8")).get("__metadata__") or {}
    return str(meta.get("arch", "")), str(meta.get("backbone_hash", ""))


_BIT_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(packed: np.ndarray) -> int:
    """Set bits in a uint8 array (``numpy.bitwise_count`` where numpy has it, numpy < 2 a byte table)."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(packed).sum())
    return int(_BIT_COUNTS[packed].sum(dtype=np.int64))


def _decoded(data: bytes, weights: Mapping[str, torch.Tensor] | None, source: str, packed: bool):
    """``(header, tensors, arrays)`` of a verified file: ``arrays`` the masks in the header's order, bool arrays
    (``packed=False``) or bit-packed uint8 ones (``packed=True``, :meth:`MaskCodec.decode_packed`); every
    mask's count of kept weights checked against the header."""
    header, _, tensors = _verified(data, source)
    if "payload" not in tensors:
        raise MaskFileError(f"{source}: no payload tensor")
    names = [e[0] for e in header["entries"]]
    shapes = [e[1] for e in header["entries"]]
    ctx = None
    codec = get_codec(header["codec"])
    payload = tensors["payload"].tobytes()
    try:
        if codec.uses_weights(payload):
            if weights is None:
                raise ValueError(f"{source}: its masks were coded with the backbone's weights as context "
                                 f"({header['codec']}); pass the backbone (hash {header['backbone_hash']}) to decode")
            ctx = _weight_context(weights, names,
                                  lambda m: BackboneMismatchError(f"{source}: the backbone has no tensors {m}"))
        arrays = (codec.decode_packed if packed else codec.decode)(payload, shapes, ctx)
    except CodecError as exc:
        raise MaskFileError(f"{source}: {exc}") from None
    for (name, shape, ones), arr in zip(header["entries"], arrays):
        kept = _popcount(arr) if packed else int(arr.sum())
        if kept != ones:
            raise MaskFileError(f"{source}: mask {name!r} decodes to {kept} kept weights, the header says {ones}")
    return header, tensors, arrays


def _extras(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    head = {k[5:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("head.")}
    buffers = {k[7:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("buffer.")}
    return head, buffers


def decode_mask_file(data: bytes, weights: Mapping[str, torch.Tensor] | None = None,
                     source: str = "mask file") -> TaskMask:
    """Parse, verify and decode the bytes of an ``smn-mask/1`` file.

    Args:
        data: the whole file.
        weights: backbone tensors by name; needed when the file's ``smn-ctx`` payload was coded with
            weight contexts (a store passes its backbone's).
        source: name used in error messages (e.g. the path).

    Raises:
        MaskFileError: truncated or corrupted file, checksum mismatch, a payload that does not decode
            to the listed masks.
        ValueError: the payload needs backbone ``weights`` and none (or wrong ones) were given.
    """
    header, tensors, arrays = _decoded(data, weights, source, packed=False)
    head, buffers = _extras(tensors)
    try:
        return TaskMask(masks={e[0]: torch.from_numpy(a) for e, a in zip(header["entries"], arrays)},
                        backbone_hash=header["backbone_hash"], arch=header["arch"], spec=header["spec"],
                        head=head, buffers=buffers)
    except ValueError as exc:
        raise MaskFileError(f"{source}: {exc}") from None


def mask_alpha(ones: int, numel: int) -> torch.Tensor:
    """The float32 rescaling ``alpha = sqrt(max(ones / numel, 1 / numel))`` of a mask with ``ones`` kept weights
    out of ``numel``, as a 0-d tensor, bit for bit the value :func:`apply_task_mask` computes from the mask
    itself (``sqrt(clamp(mean(M), min=1/numel))``, :class:`smn_core.masking.ScoreMask`'s arithmetic): torch's
    CPU mean of a float32 0/1 tensor is its sum (exact below 2**24 ones) divided by ``numel`` in float32.

    Raises:
        ValueError: ``numel`` < 1 or ``ones`` outside ``[0, numel]``.
    """
    return mask_alphas([ones], [numel])[0]


def mask_alphas(ones: Sequence[int], numels: Sequence[int]) -> torch.Tensor:
    """:func:`mask_alpha` of many masks at once: a float32 tensor of one alpha per ``(ones, numel)`` pair, each
    bit for bit :func:`mask_alpha`'s (the same three IEEE float32 operations, in numpy, vectorised).

    Raises:
        ValueError: a ``numel`` < 1 or ``ones`` outside ``[0, numel]``.
    """
    k = np.asarray(ones, dtype=np.int64)
    n = np.asarray(numels, dtype=np.int64)
    bad = np.flatnonzero((n < 1) | (k < 0) | (k > n))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"a mask of {int(n[i])} weights cannot keep {int(k[i])}; allowed: 0 <= ones <= numel, numel >= 1")
    mean = k.astype(np.float32) / n.astype(np.float32)
    return torch.from_numpy(np.sqrt(np.maximum(mean, (1.0 / n).astype(np.float32))))


@dataclass
class PackedTaskMask:
    """One task as a serving replica keeps it: the masks bit-packed (1 bit per weight), never unpacked.

    Attributes:
        packed: ``{parameter name: uint8 array of ceil(numel / 8) bytes}`` (:func:`pack_mask`'s layout); may be
            read-only views of the decoded payload.
        shapes: ``{parameter name: shape}``; ones: ``{parameter name: kept weights}`` (checked at decoding).
        backbone_hash, arch, spec, head, buffers: as :class:`TaskMask`.
    """

    packed: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    ones: dict[str, int]
    backbone_hash: str
    arch: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_head(self.head)

    def alpha(self, name: str) -> torch.Tensor:
        """:func:`mask_alpha` of mask ``name`` (0-d float32)."""
        return mask_alpha(self.ones[name], math.prod(self.shapes[name]))

    def unpacked(self) -> TaskMask:
        """The :class:`TaskMask` (bool masks) of the same task."""
        return TaskMask({n: unpack_mask(p, self.shapes[n]) for n, p in self.packed.items()}, self.backbone_hash,
                        self.arch, self.spec, self.head, self.buffers)


def decode_packed_mask_file(data: bytes, weights: Mapping[str, torch.Tensor] | None = None,
                            source: str = "mask file") -> PackedTaskMask:
    """:func:`decode_mask_file` without unpacking: the masks stay bit-packed, the cheap path of a serving replica's
    cold task switch. Byte codecs (``zstd``, ``none``, ...) hand over their decompressed bytes as they are
    (:func:`smn_core.mask_codecs.split_packed`); ``smn-ctx`` decodes and packs. Same checks (length, checksum,
    kept-weight counts) and the same errors as :func:`decode_mask_file`.
    """
    header, tensors, arrays = _decoded(data, weights, source, packed=True)
    head, buffers = _extras(tensors)
    entries = header["entries"]
    if not entries:
        raise MaskFileError(f"{source}: a task mask needs at least one mask tensor")
    try:
        return PackedTaskMask(packed={e[0]: a for e, a in zip(entries, arrays)}, shapes={e[0]: e[1] for e in entries},
                              ones={e[0]: e[2] for e in entries}, backbone_hash=header["backbone_hash"],
                              arch=header["arch"], spec=header["spec"], head=head, buffers=buffers)
    except ValueError as exc:
        raise MaskFileError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# building a task from a finished cell, checking and applying it
# --------------------------------------------------------------------------------------------------


def task_mask_from_state(masks: Mapping[str, torch.Tensor], backbone: nn.Module, *,
                         state: Mapping[str, torch.Tensor] | None = None, arch: str = "",
                         spec: dict[str, Any] | None = None) -> TaskMask:
    """A :class:`TaskMask` from exported masks and, optionally, a finished run's trainable state.

    Args:
        masks: ``{name: bool tensor}`` (``smn_core.masking.export_masks``).
        backbone: the *unadapted* backbone the masks were learned on (hashed here).
        state: :func:`smn_core.training.trainable_state` of the run: ``param.classifier.*`` becomes the
            head, ``buffer.backbone.<name>`` BN statistics that differ from ``backbone``'s are kept.
        arch, spec: recorded in the file.

    Raises:
        BackboneMismatchError: if a mask's name or shape does not fit ``backbone``.
    """
    masks = {k: v.to(torch.bool).cpu() for k, v in masks.items()}
    check_names_shapes(masks, backbone)
    head: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if state:
        if "param.classifier.weight" in state and "param.classifier.bias" in state:
            head = {"weight": state["param.classifier.weight"].float().cpu(),
                    "bias": state["param.classifier.bias"].float().cpu()}
        own = dict(backbone.named_buffers())
        for key, value in state.items():
            if not key.startswith("buffer.backbone."):
                continue
            name = key[len("buffer.backbone."):]
            if name in own and not name.endswith("num_batches_tracked") and not torch.equal(own[name].cpu(), value.cpu()):
                buffers[name] = value.cpu().clone()
    return TaskMask(masks=masks, backbone_hash=backbone_hash(backbone), arch=arch, spec=dict(spec or {}),
                    head=head, buffers=buffers)


def backbone_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``({name: shape} of :func:`backbone_state`, {name: shape} of the model's buffers)``: what
    :func:`check_names_shapes` compares a task with. A replica that checks many tasks against one backbone
    computes it once."""
    return ({n: tuple(t.shape) for n, t in backbone_state(model).items()},
            {n: tuple(b.shape) for n, b in model.named_buffers()})


def check_names_shapes(masks: Mapping[str, torch.Tensor | tuple[int, ...]],
                       model: nn.Module | tuple[Mapping[str, tuple[int, ...]], Mapping[str, tuple[int, ...]]],
                       buffers: Mapping[str, torch.Tensor] | None = None) -> None:
    """Check every mask (and buffer) names a tensor of ``model`` with the same shape.

    Args:
        masks: ``{name: mask tensor or its shape}``.
        model: the backbone, or its :func:`backbone_shapes` computed once.
        buffers: the task's BN statistics, or None.

    Raises:
        BackboneMismatchError: naming the first offending tensors and what the model has.
    """
    state, own = backbone_shapes(model) if isinstance(model, nn.Module) else model
    missing = [n for n in masks if n not in state]
    if missing:
        raise BackboneMismatchError(f"masks name tensors the backbone does not have: {missing[:5]} "
                                    f"(backbone has e.g. {list(state)[:5]})")
    shape_of = {n: tuple(m.shape) if isinstance(m, torch.Tensor) else tuple(m) for n, m in masks.items()}
    bad = [f"{n}: mask {s} vs backbone {tuple(state[n])}" for n, s in shape_of.items() if s != tuple(state[n])]
    if bad:
        raise BackboneMismatchError(f"mask shapes differ from the backbone's: {bad[:5]}")
    if buffers:
        bad = [n for n, b in buffers.items() if n not in own or tuple(own[n]) != tuple(b.shape)]
        if bad:
            raise BackboneMismatchError(f"task BN statistics do not fit the backbone's buffers: {bad[:5]}")


def check_against_backbone(task: "TaskMask | PackedTaskMask",
                           model: nn.Module | tuple[Mapping[str, tuple[int, ...]], Mapping[str, tuple[int, ...]]],
                           model_hash: str | None = None) -> None:
    """Refuse a task whose backbone is not ``model``: hash first, then names and shapes.

    Args:
        task: a :class:`TaskMask` or a :class:`PackedTaskMask`.
        model: the backbone, or its :func:`backbone_shapes` (then ``model_hash`` is required).
        model_hash: the model's :func:`backbone_hash` if already known (hashing is skipped).

    Raises:
        BackboneMismatchError: hash, names or shapes differ (the message gives both hashes).
        ValueError: shapes given without ``model_hash``.
    """
    if model_hash is None and not isinstance(model, nn.Module):
        raise ValueError("check_against_backbone: pass model_hash with the backbone's shapes")
    h = model_hash or backbone_hash(model)
    if h != task.backbone_hash:
        raise BackboneMismatchError(
            f"mask belongs to backbone {task.backbone_hash} ({task.arch or 'arch unknown'}), "
            f"but this backbone hashes to {h}; refusing to apply it")
    masks = task.shapes if isinstance(task, PackedTaskMask) else task.masks
    check_names_shapes(masks, model, task.buffers)


@torch.no_grad()
def _bake(model: nn.Module, task: TaskMask) -> None:
    params = dict(model.named_parameters())
    for name, mask in task.masks.items():
        p = params[name]
        m = mask.to(device=p.device, dtype=p.dtype)
        alpha = torch.sqrt(torch.clamp(m.mean(), min=1.0 / m.numel()))  # as in masking.ScoreMask
        p.copy_(p * m / alpha)
    own = dict(model.named_buffers())
    for name, value in task.buffers.items():
        own[name].copy_(value.to(device=own[name].device, dtype=own[name].dtype))


def apply_task_mask(model: nn.Module, task: TaskMask, model_hash: str | None = None) -> nn.Module:
    """Bake a task into a plain backbone in place: ``W <- W * M / alpha`` and the task's BN statistics.

    The model then computes exactly what the trained masked model computed (same arithmetic as
    :class:`smn_core.masking.ScoreMask`). Use :class:`MaskSwitcher` to switch tasks on one model.

    Raises:
        ValueError: if the model carries score masks.
        BackboneMismatchError: if the task belongs to another backbone (checked before any change).
    """
    if mask_modules(model):
        raise ValueError("apply_task_mask expects a backbone without attached score masks")
    check_against_backbone(task, model, model_hash)
    _bake(model, task)
    return model


class TaskModel(nn.Module):
    """A backbone with a task applied, plus the task's linear head when it has one.

    ``forward(x)``: ``(B, 3, H, W)`` normalised images -> ``(B, C)`` logits with a head, else the
    backbone's ``(B, F)`` features. ``features(x)`` always returns the features.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head: nn.Linear | None = None
        self.task: str | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return self.head(f) if self.head is not None else f


class MaskSwitcher:
    """Switch tasks on one loaded backbone: restore the tensors the last task changed, apply the next.

    The backbone is loaded and hashed once; each :meth:`apply` costs a copy of the masked tensors
    (and BN statistics), no reload. Originals of every tensor a task touches are kept (at most one
    copy of the masked weights).

    Args:
        model: a plain backbone (no score masks), e.g. ``build_backbone(...).model``; it is put in
            eval mode.
        model_hash: its :func:`backbone_hash` if already verified (else computed here).

    Raises:
        ValueError: if the model carries score masks.
    """

    def __init__(self, model: nn.Module, model_hash: str | None = None) -> None:
        if mask_modules(model):
            raise ValueError("MaskSwitcher expects a backbone without attached score masks")
        self.model = TaskModel(model.eval())
        self.backbone_hash = model_hash or backbone_hash(model)
        self._originals: dict[str, torch.Tensor] = {}
        self._touched: list[str] = []

    @torch.no_grad()
    def reset(self) -> TaskModel:
        """Restore the pristine backbone (no task) and return the model."""
        state = dict(self.model.backbone.named_parameters()) | dict(self.model.backbone.named_buffers())
        for name in self._touched:
            state[name].copy_(self._originals[name])
        self._touched = []
        self.model.head = None
        self.model.task = None
        return self.model

    @torch.no_grad()
    def apply(self, task: TaskMask, name: str | None = None) -> TaskModel:
        """Apply ``task`` (after checking hash, names and shapes) and return the shared model.

        The returned :class:`TaskModel` is the same object at every call: a later ``apply`` changes it.

        Raises:
            BackboneMismatchError: the task belongs to another backbone; the model is left unchanged.
        """
        backbone = self.model.backbone
        check_against_backbone(task, backbone, self.backbone_hash)
        self.reset()
        state = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
        for n in list(task.masks) + list(task.buffers):
            if n not in self._originals:
                self._originals[n] = state[n].detach().clone()
        self._touched = list(task.masks) + list(task.buffers)
        _bake(backbone, task)
        if task.head:
            w = task.head["weight"]
            ref = next(iter(state.values()))
            head = nn.Linear(w.shape[1], w.shape[0]).to(device=ref.device, dtype=w.dtype)
            head.weight.copy_(w)
            head.bias.copy_(task.head["bias"])
            self.model.head = head.eval()
        self.model.task = name
        return self.model
