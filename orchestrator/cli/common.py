"""What every ``smn`` command shares: exit codes, the usage error, and the one check of a ``--results`` location.

Imports nothing heavy (pyarrow only, to recognise a URI's filesystem), so the parser and every command
handler may import it.
"""

from __future__ import annotations

import os
import sys

from orchestrator.results.layout import check_results_uri

__all__ = ["seconds", "check_output_path", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_CODES", "INTERRUPTED", "ResultsError", "runtime_error",
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
    parser.add_argument("--connect-timeout", type=seconds, default=30.0, metavar="SECONDS",
                        help="give up joining the cluster at --address / $RAY_ADDRESS after this long (exit 1)")
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--format", default="markdown", choices=("markdown", "latex", "csv"), help=table_format)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds in (0, 3600].

    Raises:
        argparse.ArgumentTypeError: naming the value and what is allowed.
    """
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; allowed: 0 < SECONDS <= 3600")
    return value


def usage_error(exc: BaseException) -> int:
    """Print ``exc`` as one ``smn: <message>`` line on stderr (its whitespace runs folded to single spaces)
    and return :data:`EXIT_USAGE`."""
    print(f"smn: {' '.join(str(exc).split())}", file=sys.stderr)
    return EXIT_USAGE


def runtime_error(exc: BaseException) -> int:
    """Print ``exc`` as one ``smn: <message>`` line on stderr and return :data:`EXIT_FAILED` (the run could not
    be done: an unreachable cluster or storage, a cluster too small)."""
    print(f"smn: {exc}", file=sys.stderr)
    return EXIT_FAILED


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
        return _check_writable_folder(results)
    if not os.path.exists(results):
        raise ResultsError(f"results folder {results!r} does not exist; allowed: the --results folder of a "
                           "`smn run` (default ./results) or a URI")
    if not os.path.isdir(results):
        raise ResultsError(f"results location {results!r} is a file; allowed: a results folder or a URI")
    return results


def _writable(path: str) -> bool:
    """This user may write ``path`` (``os.access``) and its filesystem is not mounted read-only (which
    ``os.access`` does not see for root)."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.access(path, os.W_OK | (os.X_OK if os.path.isdir(path) else 0)) and not read_only


def _nearest_folder(path: str, option: str, value: str, allowed: str) -> str:
    """``path`` or the nearest existing path above it, which must be a folder (what a missing output would be
    created in).

    Raises:
        ResultsError: that path is a file (names the option, its value and the file).
    """
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ResultsError(f"{option} {value!r}: {probe!r} is a file, not a folder; {allowed}")
    return probe


def _check_writable_folder(results: str) -> str:
    """A local ``--results`` of ``smn run``: not empty, not a file, and creatable / writable by this user
    (the nearest existing folder above a missing one must be writable). Nothing is created here."""
    allowed = "allowed: a results folder this user can write (created if missing) or a URI"
    if not str(results).strip():
        raise ResultsError(f"--results {results!r} is empty; {allowed}")
    path = os.path.abspath(os.path.expanduser(results))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ResultsError(f"--results {results!r} is a file; {allowed}")
    probe = _nearest_folder(path, "--results", results, allowed)
    if not _writable(probe):
        what = "is not writable" if probe == path else f"cannot be created ({probe!r} is not writable)"
        raise ResultsError(f"--results {results!r} {what}; {allowed}")
    return results


def _ledger_folder_above(path: str) -> str | None:
    """The ledger folder (``<results>/<experiment>/ledger``: named ``ledger``, holding ``.parquet`` files) that
    ``path`` is or lies in, else None."""
    here = path
    while True:
        if os.path.basename(here) == "ledger" and os.path.isdir(here) and \
                any(name.endswith(".parquet") for name in os.listdir(here)):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def check_output_path(out: str, *, option: str = "--out", folder: bool = False) -> str:
    """An output location (``--out`` of ``table`` / ``report`` / ``plot``), checked before any work: not empty;
    for a file, not a folder; its folder (or the nearest existing one above it) writable. A URI is left to
    the writer.

    Raises:
        ResultsError: naming the option, the path and what is allowed.
    """
    allowed = ("allowed: a folder this user can write (created if missing)" if folder else
               "allowed: a file in a folder this user can write")
    if "://" in str(out):
        return out
    if not str(out).strip():
        raise ResultsError(f"{option} {out!r} is empty; {allowed}")
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(path) and not folder:
        raise ResultsError(f"{option} {out!r} is a folder; {allowed}")
    ledger_dir = _ledger_folder_above(path)
    if ledger_dir:
        raise ResultsError(f"{option} {out!r} is inside the ledger folder {ledger_dir!r}, where every file is read as "
                           f"ledger rows; {allowed}, outside <results>/<experiment>/ledger")
    if os.path.exists(path) and folder and not os.path.isdir(path):
        raise ResultsError(f"{option} {out!r} is a file; {allowed}")
    if os.path.exists(path) and not _writable(path):
        raise ResultsError(f"{option} {out!r} is not writable; {allowed}")
    probe = _nearest_folder(path if (folder and os.path.isdir(path)) else os.path.dirname(path), option, out, allowed)
    if not _writable(probe):
        raise ResultsError(f"{option} {out!r} cannot be written: {probe!r} is not writable; {allowed}")
    return out
