"""What every ``smn`` command shares: exit codes, the usage error, and the one check of a ``--results`` location.

Imports nothing heavy (pyarrow only, to recognise a URI's filesystem), so the parser and every command
handler may import it.
"""

from __future__ import annotations

import os
import sys

from orchestrator.results.layout import check_results_uri

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_CODES", "INTERRUPTED", "ResultsError",
           "add_spec_arguments", "check_results_dir", "usage_error"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = {EXIT_OK: "success", EXIT_FAILED: "runtime failure (cells failed, no GPU or too few CPUs, storage "
              "unreachable)", EXIT_USAGE: "usage or spec error (refused before any work)",
              EXIT_INTERRUPTED: "interrupted (Ctrl-C); run the same command again to resume"}
INTERRUPTED = "interrupted: run the same command again to resume"


def add_spec_arguments(parser, *, spec: str, overrides: str, results: str, address: str, dry_run: str,
                       table_format: str, overrides_default: list | None = None) -> None:
    """Add the arguments of a command that runs a spec (``smn run``, ``smn cascade``) to ``parser``, each with
    the given help text: ``spec``, ``overrides`` (``key=value`` words; default ``overrides_default``),
    ``--results`` (default ``results``), ``--address``, ``--dry-run`` and ``--format`` of the table printed at the
    end (markdown, latex or csv)."""
    parser.add_argument("spec", help=spec)
    parser.add_argument("overrides", nargs="*", metavar="key=value", default=overrides_default, help=overrides)
    parser.add_argument("--results", default="results", help=results)
    parser.add_argument("--address", default=None, help=address)
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"), help=table_format)


def usage_error(exc: BaseException) -> int:
    """Print ``exc`` as one ``smn: <message>`` line on stderr (its whitespace runs folded to single spaces)
    and return :data:`EXIT_USAGE`."""
    print(f"smn: {' '.join(str(exc).split())}", file=sys.stderr)
    return EXIT_USAGE


class ResultsError(ValueError):
    """A results location that a command cannot use (missing, a file, an unsupported URI)."""


def check_results_dir(results: str | None, command: str) -> str:
    """The ``--results`` location of ``smn <command>``, checked before any work: a URI pyarrow supports
    (an unreachable one is found when it is used: exit 1), or a local folder. ``run`` creates a missing
    folder; the read commands (``table``, ``plot``) need it to exist.

    Raises:
        ResultsError: naming the location and what is allowed.
    """
    if results is None:
        raise ResultsError(f"smn {command} needs the results folder DIR (e.g. smn {command} results)")
    if "://" in str(results):
        try:
            return check_results_uri(results)
        except ValueError as exc:
            raise ResultsError(str(exc)) from None
    if command == "run":
        if os.path.exists(results) and not os.path.isdir(results):
            raise ResultsError(f"--results {results!r} is a file; allowed: a results folder (created if missing) "
                               "or a URI")
        return results
    if not os.path.exists(results):
        raise ResultsError(f"results folder {results!r} does not exist; allowed: the --results folder of a "
                           "`smn run` (default ./results) or a URI")
    if not os.path.isdir(results):
        raise ResultsError(f"results location {results!r} is a file; allowed: a results folder or a URI")
    return results
