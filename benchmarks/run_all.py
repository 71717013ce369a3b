"""Run every benchmark area and write ``benchmarks.parquet`` and ``REPORT.md`` to ``--out``.

    .venv/bin/python -m benchmarks.run_all --out benchmarks/results            # full, CPU (< 15 min, 2 cores)
    .venv/bin/python -m benchmarks.run_all --out benchmarks/results --quick    # smallest sizes
    .venv/bin/python -m benchmarks.run_all --out DIR --device cuda             # the same on a GPU node
    .venv/bin/python -m benchmarks.run_all --out DIR --only train_step,eval    # some areas

Areas: train_step, ray, sweep, cascade, eval, storage, data, engine, serve (see ``benchmarks/bench_*.py``). An area that
fails becomes an ``error`` row with the reason; the others still run. Areas left out by ``--only`` are
listed as ``not run`` in the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import shlex
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import AREAS, Row, Settings, note_row
from .report import render_markdown, write_parquet

KEYS = [k for k, _, _ in AREAS]


def auto_threads() -> tuple[int, str]:
    """Threads for torch and the BLAS/OpenMP pools: every core, or 1 when the machine is already busier
    than its cores (then OpenMP threads spin-wait on each other: on a 2-core machine at load 12, two
    threads made a CIFAR ResNet-20 step 6x and a scikit-learn probe 60x slower than one)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > cores:
        return 1, f"auto: 1-min load average {load:.1f} exceeds {cores} cores"
    return cores, f"auto: {cores} cores, load average {load:.1f}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for benchmarks.parquet and REPORT.md")
    p.add_argument("--quick", action="store_true", help="smallest sizes and fewest repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--only", default="", help=f"comma-separated areas out of {','.join(KEYS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / BLAS threads in this process (default: auto, see auto_threads)")
    p.add_argument("--knn-full", action="store_true",
                   help="k-NN at the full 50,000 x 2,048 bank with 10,000 queries on the CPU too (minutes)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (Ray results, checkpoints)")
    args = p.parse_args(argv)
    only = [a.strip() for a in args.only.split(",") if a.strip()]
    bad = [a for a in only if a not in KEYS]
    if bad:
        p.error(f"unknown area(s) {', '.join(bad)}; allowed: {', '.join(KEYS)}")
    args.only = only or KEYS
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device here")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def run_areas(settings: Settings, only: list[str], echo=print) -> tuple[list[Row], dict[str, float]]:
    """Run the selected areas in report order; returns the rows and each area's wall seconds."""
    rows: list[Row] = []
    walls: dict[str, float] = {}
    for key, module, title in AREAS:
        if key not in only:
            rows.append(note_row(key, title, "not run", "not selected with --only", settings))
            continue
        echo(f"[bench] {key}: {title} ...")
        t0 = time.perf_counter()
        try:
            area_rows = importlib.import_module(f"benchmarks.{module}").run(settings)
        except Exception as exc:  # noqa: BLE001 - one area failing must not lose the others
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            echo(traceback.format_exc())
            area_rows = [note_row(key, title, "error", last, settings)]
        walls[key] = time.perf_counter() - t0
        echo(f"[bench] {key}: {len(area_rows)} rows in {walls[key]:.0f} s")
        rows += area_rows
    return rows, walls


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray (orchestrator.engine.plain)
    threads, reason = (args.threads, "--threads") if args.threads else auto_threads()
    settings = Settings(quick=args.quick, device=args.device, threads=threads, knn_full=args.knn_full)
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import ray
    import threadpoolctl

    meta = {"command": " ".join(["python -m benchmarks.run_all", *map(shlex.quote, argv or sys.argv[1:])]),
            "mode": "quick" if args.quick else "full", "device": settings.device_label(), "threads": threads,
            "threads_reason": reason, "host": socket.gethostname(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()), "areas": args.only}
    t0 = time.perf_counter()
    try:
        with threadpoolctl.threadpool_limits(threads):
            rows, walls = run_areas(settings, args.only)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep_work:
            shutil.rmtree(settings.work, ignore_errors=True)
    meta.update(loadavg_end=list(os.getloadavg()), total_s=time.perf_counter() - t0, area_s=walls)
    write_parquet(rows, meta, out / "benchmarks.parquet")
    report = render_markdown(rows, meta)
    (out / "REPORT.md").write_text(report)
    print(report)
    print(f"[bench] wrote {out / 'benchmarks.parquet'} and {out / 'REPORT.md'}")
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
