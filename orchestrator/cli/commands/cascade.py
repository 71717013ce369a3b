"""``smn cascade SPEC`` (and ``smn run`` of a spec with a ``cascade:`` section): the model cascade of paper
Sec. 3.4 (Table 3) on :mod:`orchestrator.engine.cascade`; prints Table 3 and what each stage did."""

from __future__ import annotations

import os
import sys
import time

import ray

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, runtime_error, usage_error
from orchestrator.cli.commands.validate import load_checked
from orchestrator.engine.cascade import plan_cascades, run_cascade
from orchestrator.engine.session import (ClusterUnreachable, check_auth_env, error_cause, parse_address,
                                         probe_address)
from orchestrator.reports import registry
from orchestrator.results import ledger
from orchestrator.results.layout import ExperimentLayout
from orchestrator.spec.cascade import cascade_spec
from orchestrator.spec.experiment import ExperimentSpec, SpecError

__all__ = ["cascade", "run_spec"]


def cascade(args) -> int:
    """``smn cascade``: load the spec once, check ``--results`` (as ``smn run`` does) and ``--address``
    (:func:`check_address`), then :func:`run_spec`."""
    spec = load_checked(args, None if args.dry_run else "run")  # --results as `smn run` checks it
    if spec is None:
        return EXIT_USAGE
    code = check_address(args)
    return run_spec(args, spec) if code is None else code


def check_address(args) -> int | None:
    """Before any work: ``--address`` / ``$RAY_ADDRESS`` is a Ray address (exit 2 otherwise, ``--dry-run``
    too), and, for a real run, something answers there within ``--connect-timeout`` (a TCP probe,
    :func:`orchestrator.engine.session.probe_address`; exit 1 otherwise). Returns None when all is well,
    else the exit code after printing the one-line reason."""
    try:
        check_auth_env()
    except ValueError as exc:
        return usage_error(exc)
    address, what = args.address, "--address"
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, what = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address is None:
        return None
    try:
        parse_address(address, what=what)
        if not args.dry_run and not ray.is_initialized():  # (a joined Ray is used as it is)
            probe_address(address, args.connect_timeout, what=what)
    except ValueError as exc:
        return usage_error(exc)
    except ClusterUnreachable as exc:
        return runtime_error(exc)
    return None


def run_spec(args, spec: ExperimentSpec) -> int:
    """Run (or, with ``--dry-run``, list) the cascades of a loaded spec; returns the exit code (0 ok, 1 a
    stage failed, 2 bad input)."""
    try:
        cs = cascade_spec(spec)
    except SpecError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    plans = plan_cascades(spec, cs)
    if args.dry_run:
        print(f"spec {spec.name}: valid; {len(plans)} cascade(s), {cs.router.clusters} experts each")
        for p in plans:
            print(f"  dispatcher {p.dispatcher.cell_id}  {p.dispatcher.label}")
            print(f"    router   {p.router_id}")
            for k, eid in enumerate(p.expert_ids):
                print(f"    expert {k} {eid}")
            for mode, cid in p.combination_ids.items():
                print(f"    {mode:13s} {cid}")
        return EXIT_OK
    t0 = time.time()
    try:
        layout = ExperimentLayout.of(args.results, spec.name)  # every location of the run, built once
        summary = run_cascade(spec, layout, address=args.address, cascade=cs,
                              connect_timeout_s=getattr(args, "connect_timeout", None))
    except ValueError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # too few CPUs / GPUs, storage unreachable, a stage that failed
        print(f"smn: {error_cause(exc) if 'Traceback' in str(exc) else exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(args, spec, summary, t0)
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def _print_summary(args, spec: ExperimentSpec, summary: dict, started: float) -> None:
    df = ledger.read_ledger(args.results, spec.name)
    layout = registry.tables().get("table3")
    print()
    if layout is not None:
        print(registry.render_frame(layout.build(df), args.format, title=layout.description))
    ex = summary["experts"]
    print(f"\nrouter: {summary['router']['ran']} ran, {summary['router']['skipped']} done before; experts: {ex['ran']} "
          f"ran, {ex['skipped']} done before; combinations: {summary['combinations']['ran']} ran, "
          f"{summary['combinations']['skipped']} done before; {time.time() - started:.0f}s in all")
    if ex["ran"]:
        print(f"expert stage: {summary['expert_stage_s']:.0f}s wall for {ex['ran']} experts whose own wall times "
              f"sum to {summary['expert_sum_s']:.0f}s")
    for cid, err in summary["failed"].items():
        print(f"smn: {cid} failed: {error_cause(err)}", file=sys.stderr)
