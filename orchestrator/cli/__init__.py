"""The ``smn`` command line: argument parsing and dispatch only.

:mod:`~orchestrator.cli.app` builds the parser (with the parsers of :mod:`~orchestrator.cli.store`,
:mod:`~orchestrator.cli.cascade` and :mod:`~orchestrator.cli.report`) and dispatches each subcommand through
:data:`~orchestrator.cli.app.COMMANDS` to one function: ``run`` / ``validate`` / ``cascade`` ->
:mod:`orchestrator.cli.commands` on :mod:`orchestrator.engine`, ``table`` / ``plot`` / ``report`` / ``ls`` ->
:mod:`orchestrator.reports`, ``store`` -> :mod:`orchestrator.store`. :mod:`~orchestrator.cli.common` holds the exit
codes and the one ``--results`` check; progress bars and quiet / JSON output live in
:mod:`~orchestrator.cli.progress` and :mod:`~orchestrator.cli.report`.
"""

from orchestrator.cli.app import main

__all__ = ["main"]
