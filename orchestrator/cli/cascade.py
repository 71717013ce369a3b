"""``smn cascade SPEC.yaml``: the model cascade (paper Sec. 3.4, Table 3) as one command.

Registered through :data:`orchestrator.cli.app.CLI_PLUGINS`. The spec's ``cascade`` section (optional;
defaults are the paper's) configures the router, the experts and the combination; see
:mod:`orchestrator.engine.cascade` and ``experiments/table3_cascade_small.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_parser", "main"]

_DESCRIPTION = """\
Train (or take from the ledger) the self-masked dispatcher of every smn cell of SPEC, fit the router
(PCA + seeded Gaussian mixture on the dispatcher's train embeddings), train one expert per cluster
in parallel on Ray (each resumes from its last epoch checkpoint after a failure), build the
conditional and unconditional cascades, evaluate them, and print Table 3. Running the same
command again skips every finished stage."""

_EPILOG = """\
examples:
  smn cascade experiments/table3_cascade_small.yaml             # digits, 2 CPU cores, a few minutes
  smn cascade experiments/table3_cascade_small.yaml cascade.router.clusters=3
  smn cascade experiments/table3_cascade.yaml --address auto    # the paper's setting on a GPU cluster
  smn table results --layout table3 ; smn plot results --figure fig11
"""


def add_parser(subparsers) -> None:
    """Register the ``cascade`` subcommand on ``smn``'s subparsers."""
    p = subparsers.add_parser("cascade", help="run the model cascade (dispatcher, router, experts, combination)",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="experiment spec (YAML) with the smn method and an optional cascade section")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override spec keys with dotted paths, e.g. cascade.router.clusters=3 train.epochs=4")
    p.add_argument("--results", default="results", help="results folder or URI (s3://bucket/prefix) holding the ledger (default: ./results)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cascade's cells; run nothing")
    p.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"),
                   help="format of Table 3 printed at the end")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``smn cascade``; returns the exit code (0 ok, 1 a stage failed, 2 bad input)."""
    from orchestrator.spec.experiment import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        from orchestrator.spec.cascade import cascade_spec
        from orchestrator.engine.cascade import plan_cascades

        cs = cascade_spec(spec)
    except SpecError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return 2
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
        return 0
    from orchestrator.results import ledger
    from orchestrator.reports import registry as reports
    from orchestrator.engine.cascade import run_cascade

    t0 = time.time()
    from orchestrator.engine.session import error_cause

    try:
        summary = run_cascade(spec, args.results, address=args.address, cascade=cs)
    except ValueError as exc:
        print(f"smn: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # too few CPUs / GPUs, storage unreachable, a stage that failed
        print(f"smn: {error_cause(exc) if 'Traceback' in str(exc) else exc}", file=sys.stderr)
        return 1
    df = ledger.read_ledger(args.results, spec.name)
    layout = reports.tables().get("table3")
    print()
    if layout is not None:
        print(reports.render_frame(layout.build(df), args.format, title=layout.description))
    ex = summary["experts"]
    print(f"\nrouter: {summary['router']['ran']} ran, {summary['router']['skipped']} done before; experts: {ex['ran']} "
          f"ran, {ex['skipped']} done before; combinations: {summary['combinations']['ran']} ran, "
          f"{summary['combinations']['skipped']} done before; {time.time() - t0:.0f}s in all")
    if ex["ran"]:
        print(f"expert stage: {summary['expert_stage_s']:.0f}s wall for {ex['ran']} experts whose own wall times "
              f"sum to {summary['expert_sum_s']:.0f}s")
    for cid, err in summary["failed"].items():
        print(f"smn: {cid} failed: {error_cause(err)}", file=sys.stderr)
    return 1 if summary["failed"] else 0
