"""What each ``smn`` subcommand does, one module per command family, each importing what it needs at top
level: :mod:`~orchestrator.cli.commands.read` (``table``, ``plot``), :mod:`~orchestrator.cli.commands.validate`
(``validate``), :mod:`~orchestrator.cli.commands.run` (``run``), :mod:`~orchestrator.cli.commands.cascade`
(``cascade``), :mod:`~orchestrator.cli.commands.store` (``store``); ``report`` and ``ls`` are in
:mod:`orchestrator.cli.report`. :data:`orchestrator.cli.app.COMMANDS` names the function of each subcommand,
imported only when that subcommand runs, so ``smn table`` never loads torch or ray.

Each handler takes the parsed ``argparse.Namespace`` and returns the exit code
(:data:`orchestrator.cli.common.EXIT_CODES`).
"""
