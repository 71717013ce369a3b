"""Paper App. C, Tables 6-7: what masks and fine-tuned fp32 weights cost under each codec, from the ledger.

Codec measurements are ledger cells of their own, so the tables come from the ledger alone:
:func:`measure_task_codecs` (``smn store bench-codecs``) measures every codec of
:mod:`smn_core.mask_codecs` on one stored task's masks (payload ``mask``) and, for comparison, the
byte codecs on fp32 weights of the same tensors (payload ``fp32``: a fully fine-tuned copy when
given, else the store's pretrained backbone weights as a stand-in, recorded as ``fp32_source``), and
:func:`orchestrator.store.codec_cells.record_codec_measurements` lands one cell per (payload, codec) with
``method = "codec:<name>"``. Metrics per cell:
``bytes``, ``raw_bytes``, ``weights``, ``bits_per_weight``, ``reduction_pct`` (against the
uncompressed payload, the paper's "Reduction (%)"), ``ratio_vs_fp32`` (fp32 bytes of the same weights
over the coded bytes), ``encode_MBps`` / ``decode_MBps`` (MB of uncompressed payload per second),
``density`` and ``order0_bits_per_weight`` (``H(density)``, the order-0 entropy bound).

Tables (``smn table DIR --layout NAME``): ``table6`` shows the masks per codec (bytes, reduction %,
bits per weight, ratio against fp32, speeds) with the entropy bound as its own row; ``table7`` the
fp32 weights per codec. (In the paper, Tables 6 and 7 are CIFAR-100 and SUN397, each with a masks
half (a) and a weights half (b); here table6 is every (a) and table7 every (b) in the ledger, one
block per backbone, dataset and task.)
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from smn_core.mask_codecs import (
    LIBRARY_CODECS,
    available_codecs,
    measure_byte_codec,
    measure_mask_codec,
    order0_entropy_bits,
)

from orchestrator.reports.registry import register_table

if TYPE_CHECKING:  # types only: `smn table` loads this module's layouts and must not load torch
    import torch

    from smn_core.mask_file import TaskMask

__all__ = ["measure_task_codecs", "codec_table"]

_BYTE_CODECS = ("none", *LIBRARY_CODECS)


def _digest(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def measure_task_codecs(mask: TaskMask, weights: dict[str, torch.Tensor], *, fp32: dict[str, torch.Tensor] | None = None,
                        codecs: Sequence[str] | None = None, repeats: int = 3) -> list[dict[str, Any]]:
    """Measure codecs on one task's masks and on fp32 weights of the same tensors.

    Args:
        mask: the task.
        weights: the backbone tensors by name (context for ``smn-ctx``; fp32 stand-in when ``fp32`` is None).
        fp32: fine-tuned tensors by name (e.g. an FFT cell's weights) for the fp32 rows.
        codecs: which codecs (default: all of :func:`smn_core.mask_codecs.available_codecs`); ``smn-ctx``
            is measured on masks only.
        repeats: timings are the best of this many runs.

    Returns:
        One dict per (payload, codec): ``payload``, ``codec``, ``weights``, ``raw_bytes``, ``bytes``,
        ``encode_s``, ``decode_s``, ``bits_per_weight``, ``reduction_pct``, ``ratio_vs_fp32``,
        ``encode_MBps``, ``decode_MBps``, ``density``, ``order0_bits_per_weight``, ``digest``.

    Raises:
        ValueError: an unknown codec; ``weights`` or ``fp32`` lacking a masked tensor or with another shape.
    """
    codecs = list(codecs or available_codecs())
    unknown = [c for c in codecs if c not in available_codecs()]
    if unknown:
        raise ValueError(f"codecs {unknown} are not known; allowed: {', '.join(available_codecs())}")
    names = list(mask.masks)
    for label, source in (("backbone weights", weights), ("fp32 weights", fp32)):
        if source is None:
            continue
        bad = [n for n in names if n not in source or tuple(source[n].shape) != tuple(mask.masks[n].shape)]
        if bad:
            raise ValueError(f"{label} lack or mis-shape the masked tensors {bad[:5]}")
    masks = [mask.masks[n].numpy() for n in names]
    ctx = [weights[n].detach().cpu().float().numpy() for n in names]
    fp = [(fp32 or weights)[n].detach().cpu().float().numpy() for n in names]
    n = sum(m.size for m in masks)
    density = sum(int(m.sum()) for m in masks) / n
    h0 = order0_entropy_bits(masks) / n
    rows = []
    digest_mask, digest_fp = _digest(masks), _digest(fp)
    for c in codecs:
        m = measure_mask_codec(c, masks, ctx if c == "smn-ctx" else None, repeats=repeats)
        rows.append({"payload": "mask", "digest": digest_mask, **_row(m), "density": density,
                     "order0_bits_per_weight": h0})
    for c in codecs:
        if c in _BYTE_CODECS:
            m = measure_byte_codec(c, fp, repeats=repeats)
            rows.append({"payload": "fp32", "digest": digest_fp, **_row(m), "density": density,
                         "order0_bits_per_weight": h0})
    return rows


def _row(m) -> dict[str, Any]:
    return {"codec": m.codec, "weights": m.weights, "raw_bytes": m.raw_bytes, "bytes": m.compressed_bytes,
            "encode_s": m.encode_s, "decode_s": m.decode_s, "bits_per_weight": m.bits_per_weight,
            "reduction_pct": m.reduction_pct, "ratio_vs_fp32": m.ratio_vs_fp32,
            "encode_MBps": m.encode_mb_s, "decode_MBps": m.decode_mb_s}


def codec_table(df: pd.DataFrame, payload: str) -> pd.DataFrame:
    """Rows of the codec cells of one payload (``"mask"`` or ``"fp32"``) as display strings.

    Index: (backbone, dataset, task, codec); columns: bytes, reduction %, bits/weight, x vs fp32,
    encode MB/s, decode MB/s (means over repeated measurements of the same cell group; no speeds for
    ``none``, which only copies bytes). For masks,
    an ``H(density)`` row per block gives the order-0 entropy bound.
    """
    sub = df[df["method"].astype(str).str.startswith("codec:")]
    if sub.empty:
        return pd.DataFrame()
    grid = sub["grid_json"].map(json.loads)
    sub = sub.assign(payload=grid.map(lambda g: g.get("payload")), task=grid.map(lambda g: g.get("task")),
                     codec=sub["method"].str[len("codec:"):])
    sub = sub[sub["payload"] == payload]
    if sub.empty:
        return pd.DataFrame()
    wide = sub.pivot_table(index=["backbone", "dataset", "task", "codec"], columns="metric", values="value",
                           aggfunc="mean")
    order = {c: i for i, c in enumerate(available_codecs())}
    out_rows, index = [], []
    for (bb, ds, task), block in wide.groupby(level=[0, 1, 2], sort=True):
        block = block.iloc[sorted(range(len(block)), key=lambda i: order.get(block.index[i][3], 99))]
        for key, r in block.iterrows():
            index.append(key)
            speeds = ["-", "-"] if key[3] == "none" else [f"{r['encode_MBps']:.2f}", f"{r['decode_MBps']:.2f}"]
            out_rows.append([f"{int(r['bytes']):,}", f"{r['reduction_pct']:.2f}", f"{r['bits_per_weight']:.4f}",
                             f"{r['ratio_vs_fp32']:.1f}", *speeds])
        if payload == "mask":
            r = block.iloc[0]
            bound_bytes = r["order0_bits_per_weight"] * r["weights"] / 8
            index.append((bb, ds, task, f"H(density={r['density']:.4f}) bound"))
            out_rows.append([f"{bound_bytes:,.0f}", f"{100 * (1 - bound_bytes / r['raw_bytes']):.2f}",
                             f"{r['order0_bits_per_weight']:.4f}", f"{32 / max(r['order0_bits_per_weight'], 1e-12):.1f}",
                             "-", "-"])
    cols = ["bytes", "reduction %", "bits/weight", "x vs fp32", "encode MB/s", "decode MB/s"]
    return pd.DataFrame(out_rows, index=pd.MultiIndex.from_tuples(index, names=["backbone", "dataset", "task", "codec"]),
                        columns=cols)


@register_table("table6", "App. C Table 6 (a): learned masks per codec (bytes, reduction %, bits/weight, vs fp32, "
                          "speed) and the H(density) bound")
def table6(df: pd.DataFrame) -> pd.DataFrame:
    """Masks per codec, from the ``codec:*`` cells of the ledger (see module docstring)."""
    return codec_table(df, "mask")


@register_table("table7", "App. C Table 7 (b): fp32 weights of the same tensors per codec (bytes, reduction %, speed)")
def table7(df: pd.DataFrame) -> pd.DataFrame:
    """fp32 weights per codec, from the ``codec:*`` cells of the ledger (see module docstring)."""
    return codec_table(df, "fp32")
