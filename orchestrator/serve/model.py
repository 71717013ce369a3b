"""One backbone, many tasks: a masked forward that never changes the shared weights.

A mask store (:mod:`orchestrator.store.mask_store`) keeps one backbone and a binary mask per task (paper
Sec. 3.1, Table 1 "Size"). :class:`TaskBank` loads and hash-checks the backbone once; :meth:`TaskBank.load`
reads, verifies and decodes one task and keeps it *bit-packed* (1 bit per masked weight, about 1/32 of an
fp32 copy) with its BN statistics and head. A forward for a task builds the masked tensors on demand,
``W * M / alpha`` with ``alpha = sqrt(mean(M))`` (the arithmetic of :func:`smn_core.mask_file.apply_task_mask`,
so the answers equal ``smn store apply`` + a plain forward), and runs the backbone with them through
:func:`torch.func.functional_call`. The backbone's own tensors are never written, so a task switch cannot
corrupt a request in flight; ``functional_call`` swaps module attributes for the duration of one call, so
calls on one bank are serialised by a lock (each call is one batched forward).

Batch inference in a script, without Ray::

    model = MaskedModel.for_task("stores/c10", "cifar10-smn")
    x = model.preprocess([Image.open(p) for p in paths])     # (B, 3, 32, 32)
    feats, labels = model.embed(x), model.classify(x)

Plain PyTorch + the store; never imports ray.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.func import functional_call

from smn_core.augment import eval_transform
from smn_core.mask_file import backbone_shapes, check_against_backbone, mask_alphas

from orchestrator.serve.images import ImageError, decode_image
from orchestrator.store.mask_store import MaskStore

__all__ = ["TaskBank", "MaskedModel", "ResidentTask", "NoHeadError", "ImageError", "decode_image"]


class NoHeadError(LookupError):
    """``classify`` on a task stored without a classification head."""


@dataclass
class ResidentTask:
    """One task held in memory: bit-packed masks plus what the forward needs.

    Attributes:
        name: the task name in the store.
        packed: ``{tensor name: (uint8 packed bits, shape, alpha)}``; ``alpha`` the 0-d rescaling tensor.
        buffers: the task's BN statistics (float tensors), may be empty.
        head: ``(weight (C, F), bias (C,))`` of the task's linear head, or None.
        classes: class names of the head's outputs (length C), or None.
    """

    name: str
    packed: dict[str, tuple[np.ndarray, tuple[int, ...], torch.Tensor]]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    classes: list[str] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this task holds in memory (packed bits, alphas, BN statistics, head)."""
        n = sum(p.nbytes + a.element_size() for p, _, a in self.packed.values())
        n += sum(b.numel() * b.element_size() for b in self.buffers.values())
        if self.head is not None:
            n += sum(t.numel() * t.element_size() for t in self.head)
        return n


def _class_names(spec: dict[str, Any], num_classes: int) -> list[str]:
    """The head's class names recorded in the task's spec (``spec["head"]["classes"]`` or ``spec["classes"]``),
    else ``["0", ..., "C-1"]``."""
    names = (spec.get("head") or {}).get("classes") if isinstance(spec.get("head"), dict) else None
    names = names or spec.get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


class TaskBank:
    """The store's backbone, loaded and hash-checked once, and the masked forward of any task.

    Args:
        store: a :class:`MaskStore` or its location (folder or ``pyarrow.fs`` URI).

    Raises:
        StoreError: no store there. BackboneMismatchError: the store's backbone file does not hash to the
            hash recorded in ``store.json``.
    """

    def __init__(self, store: MaskStore | str) -> None:
        # a MaskStore of its own: another user's MaskStore.apply bakes masks into that store's shared backbone
        self.store = MaskStore(store.location if isinstance(store, MaskStore) else str(store))
        self.backbone = self.store.switcher().reset().backbone.eval()  # hash-checked here, once
        self.input_size, self.mean, self.std = self.store.input_facts()
        self._base = {k: v.detach() for k, v in self.backbone.named_parameters()}
        self._shapes = backbone_shapes(self.backbone)  # what each task is checked against, taken once
        self._lock = threading.Lock()
        self.transform = eval_transform(self.input_size, self.mean, self.std)

    def load(self, task: str) -> "MaskedModel":
        """Read, verify and decode ``task`` and keep it bit-packed (the cold task switch).

        The masks are never unpacked here (:meth:`MaskStore.load_packed`: a ``zstd`` or ``none`` file's bytes are
        the packed masks), the backbone's hash and shapes were taken once at construction, and ``alpha`` comes
        from the file's kept-weight counts (:func:`smn_core.mask_file.mask_alpha`).

        Raises:
            StoreError: unknown task. MaskFileError: truncated or corrupted file. BackboneMismatchError: the
                task belongs to another backbone (hash, names or shapes).
        """
        mask = self.store.load_packed(task)
        check_against_backbone(mask, self._shapes, self.store.backbone_hash)
        names = list(mask.packed)
        alphas = mask_alphas([mask.ones[n] for n in names], [math.prod(mask.shapes[n]) for n in names])
        packed = {n: (mask.packed[n], mask.shapes[n], alphas[i]) for i, n in enumerate(names)}
        head, classes = None, None
        if mask.head:
            head = (mask.head["weight"].float().contiguous(), mask.head["bias"].float().contiguous())
            classes = _class_names(mask.spec, head[0].shape[0])
        return MaskedModel(self, ResidentTask(task, packed, dict(mask.buffers), head, classes))

    def masked_state(self, task: ResidentTask) -> dict[str, torch.Tensor]:
        """The task's tensors for :func:`torch.func.functional_call`: masked weights ``W * M / alpha`` (new
        tensors, the arithmetic of :func:`smn_core.mask_file.apply_task_mask`; the bits are unpacked as uint8
        and multiplied into one new tensor, divided in place) and BN statistics; the backbone's own tensors are
        not touched."""
        out: dict[str, torch.Tensor] = {}
        for name, (bits, shape, alpha) in task.packed.items():
            w = self._base[name]
            m = torch.from_numpy(np.unpackbits(bits, count=w.numel())).view(shape)
            out[name] = torch.mul(w, m).div_(alpha)
        out.update(task.buffers)
        return out

    @torch.no_grad()
    def features(self, task: ResidentTask, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, s, s)`` normalised images -> ``(B, F)`` features of the backbone under ``task``'s masks."""
        return self.forward_with(self.masked_state(task), x)

    @torch.no_grad()
    def forward_with(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The backbone's forward with ``state`` (:meth:`masked_state`, possibly kept by a caller that caches
        materialised weights) in place of its own tensors: ``(B, 3, s, s)`` -> ``(B, F)``."""
        with self._lock:
            return functional_call(self.backbone, state, (x,), strict=False)

    def preprocess(self, images: Sequence[Image.Image | bytes]) -> torch.Tensor:
        """PIL images or JPEG/PNG bytes -> ``(B, 3, s, s)`` float32 batch (the evaluation transform of the
        store's arch: resize to its input size, normalise).

        Raises:
            ImageError: bytes that are not a JPEG or PNG image.
        """
        imgs = [decode_image(i) if isinstance(i, (bytes, bytearray)) else i.convert("RGB") for i in images]
        return torch.stack([self.transform(i) for i in imgs])


class MaskedModel:
    """One task of a :class:`TaskBank`: embed and classify images with the task's masks and head.

    Build it with :meth:`for_task` (a script) or :meth:`TaskBank.load` (many tasks on one backbone). Calls
    from several threads, on one task or many, are safe.
    """

    def __init__(self, bank: TaskBank, task: ResidentTask) -> None:
        self.bank, self.task = bank, task

    @classmethod
    def for_task(cls, store: MaskStore | str, task: str) -> "MaskedModel":
        """The model of ``task`` in ``store`` (backbone loaded and hash-checked, task decoded).

        Raises:
            StoreError, MaskFileError, BackboneMismatchError: as :class:`TaskBank` and :meth:`TaskBank.load`.
        """
        return TaskBank(store).load(task)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def has_head(self) -> bool:
        return self.task.head is not None

    @property
    def classes(self) -> list[str] | None:
        return self.task.classes

    def preprocess(self, images: Sequence[Image.Image | bytes]) -> torch.Tensor:
        """See :meth:`TaskBank.preprocess`."""
        return self.bank.preprocess(images)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, s, s)`` -> ``(B, F)`` features."""
        return self.bank.features(self.task, x)

    @torch.no_grad()
    def logits_of(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` features -> ``(B, C)`` logits of the task's head.

        Raises:
            NoHeadError: the task has no head.
        """
        if self.task.head is None:
            raise NoHeadError(f"task {self.task.name!r} has no classification head (it was stored without one); "
                              "use /embed, or add the task from a cell that has a head")
        w, b = self.task.head
        return torch.nn.functional.linear(feats.to(w.dtype), w, b)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, s, s)`` -> ``(B, C)`` logits. Raises :class:`NoHeadError` without a head."""
        if self.task.head is None:
            self.logits_of(x)  # raises
        return self.logits_of(self.embed(x))

    def classify(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """``(B, 3, s, s)`` -> one ``{"label", "index", "score"}`` per image (softmax probability of the
        argmax class). Raises :class:`NoHeadError` without a head."""
        return self.answers(self.logits(x))

    def answers(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """``(B, C)`` logits -> ``[{"label": class name, "index": int, "score": float}]``."""
        probs = torch.softmax(logits.double(), dim=1)
        score, idx = probs.max(dim=1)
        names = self.task.classes or [str(i) for i in range(logits.shape[1])]
        return [{"label": names[int(i)], "index": int(i), "score": float(s)} for i, s in zip(idx, score)]
