"""The ``smn`` command line: argument parsing and dispatch only.

Each subcommand parses its arguments here and calls one function of the packages below it:
``run`` / ``validate`` / ``cascade`` -> :mod:`orchestrator.engine`, ``table`` / ``plot`` / ``report`` / ``ls`` ->
:mod:`orchestrator.reports`, ``store`` -> :mod:`orchestrator.store`. Progress bars and quiet / JSON output
live in :mod:`orchestrator.cli.progress` and :mod:`orchestrator.cli.report`.
"""

from orchestrator.cli.app import main

__all__ = ["main"]
