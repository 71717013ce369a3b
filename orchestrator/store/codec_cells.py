"""Codec measurements as ledger cells (``smn store bench-codecs``; paper App. C, Tables 6-7).

:func:`record_codec_measurements` lands each row of
:func:`orchestrator.reports.codec_costs.measure_task_codecs` as a ledger cell of its own through
:func:`orchestrator.engine.cell.land` (the one writer of ledger rows), so the ``table6`` / ``table7``
layouts of :mod:`orchestrator.reports.codec_costs` read them from the ledger alone.
"""

from __future__ import annotations

from typing import Any

from smn_core.mask_file import TaskMask

from orchestrator.engine.cell import CellJob, Record, land
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.spec.experiment import config_hash

__all__ = ["record_codec_measurements", "STORAGE_EXPERIMENT"]

STORAGE_EXPERIMENT = "storage"
"""The experiment codec cells land in by default."""

_METRICS = ("bytes", "raw_bytes", "weights", "bits_per_weight", "reduction_pct", "ratio_vs_fp32", "encode_MBps",
            "decode_MBps", "encode_s", "decode_s", "density", "order0_bits_per_weight")


def record_codec_measurements(results: str, task_name: str, mask: TaskMask, rows: list[dict[str, Any]], *,
                              experiment: str = STORAGE_EXPERIMENT, fp32_source: str = "pretrained backbone",
                              skip_existing: bool = True) -> list[str]:
    """Land one ledger cell per measurement row (``method = "codec:<name>"``); returns the ledger files written.

    A cell's id is :func:`orchestrator.spec.experiment.config_hash` of the payload's content digest, the
    payload kind, the codec and the task, so measuring the same masks again is a resume: cells already in
    the ledger are skipped (``skip_existing``). Backbone and dataset come from the task (its spec's cell
    config when it has one). A measurement has no duration of its own: no ``wall_s``, and
    ``started_at = finished_at``.

    Args:
        rows: :func:`orchestrator.reports.codec_costs.measure_task_codecs` rows.

    Raises:
        ValueError: if ``rows`` is empty.
    """
    if not rows:
        raise ValueError("no codec measurements to record")
    cfg = mask.spec.get("config", {}) if isinstance(mask.spec, dict) else {}
    dataset = (cfg.get("dataset") or {}).get("source", "unknown")
    seed = int(cfg.get("seed", 0) or 0)
    method = cfg.get("method", "unknown")
    layout = ExperimentLayout.of(results, experiment)
    done = ledger.completed_cells(layout.results, experiment) if skip_existing else set()
    written = []
    for r in rows:
        config = {"kind": "codec", "payload": r["payload"], "codec": r["codec"], "digest": r["digest"],
                  "task": task_name, "task_method": method, "backbone_hash": mask.backbone_hash,
                  "fp32_source": fp32_source if r["payload"] == "fp32" else None}
        cell_id = config_hash(config)
        if cell_id in done:
            continue
        job = CellJob(None, cell_id, f"codec {r['codec']} ({r['payload']})",
                      {"payload": r["payload"], "task": task_name, "task_method": method}, layout,
                      record=Record(f"codec:{r['codec']}", mask.arch or "unknown", dataset, seed, config))
        land(job, {k: float(r[k]) for k in _METRICS}, None)
        written.append(layout.ledger_file(cell_id))
    return written
