"""One flushing echo: every progress function's default output reaches a pipe when it is said."""

from __future__ import annotations

import inspect
import io
import sys

import pytest

import orchestrator

pytestmark = pytest.mark.unit


def test_echo_flushes_each_line(monkeypatch):
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", line_buffering=False, write_through=False)  # a pipe's buffering
    monkeypatch.setattr(sys, "stdout", out)
    orchestrator.echo("[1/9 cells done, 4s] abc")
    assert raw.getvalue() == b"[1/9 cells done, 4s] abc\n"  # no flush of ours: echo's own


def test_every_progress_function_defaults_to_it():
    from orchestrator.cli import report
    from orchestrator.engine import cascade, plain, prepare, sweep
    from orchestrator.reports import tracking
    from orchestrator.results import compact

    functions = [plain.run_experiment, plain.ensure_ray, sweep.run_sweep, cascade.run_cascade,
                 prepare.prepare_pipeline_weights, compact.compact_all, tracking.sync, report.track]
    for fn in functions:
        assert inspect.signature(fn).parameters["echo"].default is orchestrator.echo, fn.__qualname__
