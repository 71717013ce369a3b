"""``smn cascade SPEC.yaml``: the model cascade (paper Sec. 3.4, Table 3) as one command.

The parser only; :mod:`orchestrator.cli.commands.cascade` does the work. The spec's ``cascade`` section
(optional; defaults are the paper's) configures the router, the experts and the combination; see
:mod:`orchestrator.engine.cascade` and ``experiments/table3_cascade_small.yaml``.
"""

from __future__ import annotations

import argparse

from orchestrator.cli.common import add_spec_arguments

__all__ = ["add_parser"]

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
    add_spec_arguments(
        p, spec="experiment spec (YAML) with the smn method and an optional cascade section",
        overrides="override spec keys with dotted paths, e.g. cascade.router.clusters=3 train.epochs=4",
        results="results folder or URI (s3://bucket/prefix) holding the ledger (default: ./results)",
        address="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)",
        dry_run="validate and list the cascade's cells; run nothing", table_format="format of Table 3 printed at the end")
