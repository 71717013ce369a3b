"""What every benchmark area shares: the run settings, the result row, interleaved timing, peak memory.

A benchmark area is a module with ``run(settings: Settings) -> list[Row]``. Rules the helpers enforce:

* Variants that are compared are timed in the same process, interleaved (A B B A ..., see
  :func:`interleave`), several times; the row reports the median.
* Every row carries what its value is set against (``compare_to`` / ``compare_value``), the ratio, and
  the ratio a perfect implementation would reach (``ideal``), so the report can rank gaps to the floor.
* On CUDA every timing is bracketed by ``torch.cuda.synchronize()``; peak memory is
  ``torch.cuda.max_memory_allocated()``. On the CPU peak memory comes from ``torch.profiler``'s memory
  timeline (every tensor allocation and free, by category: parameters, gradients, optimizer state,
  activations, temporaries).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Settings", "Row", "compared", "note_row", "sync", "interleave", "median", "peak_memory_bytes",
           "AREAS", "MB"]

#: Benchmark areas in report order: (key, module name, section title).
AREAS: tuple[tuple[str, str, str], ...] = (
    ("train_step", "bench_train_step", "Training step: masked vs full fine-tuning"),
    ("ray", "bench_ray", "Ray overhead"),
    ("sweep", "bench_sweep", "Sweep efficiency"),
    ("cascade", "bench_cascade", "Cascade expert stage"),
    ("eval", "bench_eval", "Evaluation: k-NN and linear probe"),
    ("storage", "bench_storage", "Mask storage"),
    ("data", "bench_data", "Data loading: multi-crop pipeline vs training-step demand"),
    ("engine", "bench_engine", "Cell engine: imports, warm workers, sweep and cascade efficiency (issue 16)"),
    ("serve", "bench_serve", "Serving many tasks from one backbone (issue 29)"),
)

MB = 1e6  # bytes per MB in every figure of the report


@dataclass
class Settings:
    """How a harness run is set up.

    Attributes:
        quick: smallest sizes and fewest repeats (smoke test, minutes); otherwise the full sizes.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` accepted).
        threads: torch intra-op threads in this process (Ray workers get ``OMP_NUM_THREADS`` from their
            ``num_cpus`` instead).
        work: scratch folder (Ray results folders, checkpoints); deleted by the caller.
        knn_full: run k-NN at the issue's full shape (50,000 x 2,048 bank, 10,000 queries) on the CPU too
            (it always runs at that shape on CUDA).
    """

    quick: bool = False
    device: str = "cpu"
    threads: int = 1
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="smn-bench-")))
    knn_full: bool = False

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def device_label(self) -> str:
        """``"cuda (NVIDIA H100 ...)"`` or ``"cpu (N cores, T threads)"``."""
        if self.cuda:
            return f"cuda ({torch.cuda.get_device_name(torch.device(self.device))})"
        return f"cpu ({os.cpu_count()} cores, {self.threads} thread{'s' if self.threads != 1 else ''})"


@dataclass
class Row:
    """One figure of the report.

    Attributes:
        area: benchmark area key (see :data:`AREAS`).
        name: what was measured, with its shapes.
        value: the figure, in ``unit``.
        unit: ``s``, ``MB`` (1e6 bytes), ``bits/weight``, ``images/s``, ``MB/s``, ``x`` (a ratio).
        compare_to: what ``value`` is set against: a floor (``"floor: ..."``) or a variant measured in
            the same run.
        compare_value: that reference, in the same ``unit``.
        ratio: ``value / compare_value``.
        ideal: the ratio a perfect implementation would reach (e.g. 1.0 when the floor is the reference).
        better: ``"lower"`` or ``"higher"``: which way a better implementation moves ``ratio``.
        notes: how it was measured, shapes, caveats.
        device: where it ran (:meth:`Settings.device_label`).
        repeats: how many interleaved measurements the median is over.
        status: ``ok``, ``skipped`` (with the reason in ``notes``), ``error`` or ``not run``.
    """

    area: str
    name: str
    value: float
    unit: str
    compare_to: str = ""
    compare_value: float = math.nan
    ratio: float = math.nan
    ideal: float = math.nan
    better: str = "lower"
    notes: str = ""
    device: str = ""
    repeats: int = 1
    status: str = "ok"

    @property
    def gap(self) -> float:
        """How far ``ratio`` is from ``ideal`` (>= 1 means worse than ideal by that factor); NaN without both."""
        if not (math.isfinite(self.ratio) and math.isfinite(self.ideal)) or self.ratio <= 0 or self.ideal <= 0:
            return math.nan
        return self.ratio / self.ideal if self.better == "lower" else self.ideal / self.ratio

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gap"] = self.gap
        return d


def compared(area: str, name: str, value: float, unit: str, compare_to: str, compare_value: float, *,
             ideal: float = math.nan, better: str = "lower", notes: str = "", settings: Settings | None = None,
             repeats: int = 1) -> Row:
    """A :class:`Row` with ``ratio = value / compare_value`` filled in."""
    ratio = value / compare_value if compare_value and math.isfinite(compare_value) else math.nan
    return Row(area, name, float(value), unit, compare_to, float(compare_value), float(ratio), float(ideal), better,
               notes, settings.device_label() if settings else "", repeats)


def note_row(area: str, name: str, status: str, notes: str, settings: Settings | None = None) -> Row:
    """A row without a figure: ``skipped`` / ``error`` / ``not run``, the reason in ``notes``."""
    return Row(area, name, math.nan, "", notes=notes, status=status,
               device=settings.device_label() if settings else "")


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work (no-op on the CPU), so a timer read after it covers the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def interleave(variants: dict[str, Callable[[], object]], rounds: int, device: str = "cpu") -> dict[str, list[float]]:
    """Time each variant ``rounds`` times, interleaved: A B, then B A, then A B, ... (alternating order
    cancels a steady drift of the machine's load between the variants).

    Returns:
        ``{name: [wall seconds of each call]}``; each call is bracketed by :func:`sync`.
    """
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            variants[n]()
            sync(device)
            out[n].append(time.perf_counter() - t0)
    return out


def median(values: list[float]) -> float:
    """Median (NaN for an empty list)."""
    return statistics.median(values) if values else math.nan


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device) -> int:
    """Peak bytes of live tensors while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated()`` after a reset, i.e. everything allocated on the device
    (the caller makes sure only what belongs to the measured variant lives there). CPU: the peak of the
    total of ``torch.profiler``'s memory timeline, which follows every tensor ``fn`` allocates, frees or
    uses (inputs and parameters included, from their first use); oneDNN's internal scratch buffers and
    Python objects are not tensors and are not counted. The profiler slows ``fn`` down: never time a
    call measured here.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # torch 2.13 marks export_memory_timeline deprecated in favour of a CUDA-only recorder; it is the
        # profiler's only CPU timeline
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return int(max((sum(s) for s in sizes), default=0))
