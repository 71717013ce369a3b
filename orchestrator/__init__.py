"""orchestrator: the Ray layer of smn (specs, cells on Ray, the Parquet ledger, tables, CLI).

:func:`echo` is the one default output of every function that reports progress (``echo=`` arguments of the
engine, the compaction, the trackers and the CLI's reports).
"""

from __future__ import annotations

import sys

__all__ = ["echo"]


def echo(line: str) -> None:
    """Print ``line`` to stdout and flush it, so each progress line reaches a pipe (``smn run ... | tee``) or a
    ``ray job logs`` stream when it is said, not when a block buffer fills or the process ends."""
    print(line, file=sys.stdout, flush=True)
