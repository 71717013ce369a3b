"""Where results live and how they are written and read: :mod:`~orchestrator.results.layout`
(:class:`~orchestrator.results.layout.ExperimentLayout`, every location of an experiment, and the one
experiment-name rule), :mod:`~orchestrator.results.ledger` (the Parquet ledger: one file per finished cell,
one row per metric, failure records, quarantine) and :mod:`~orchestrator.results.curves` (per-epoch curves).

Every file goes through :func:`smn_core.checkpoint.atomic_write`, the one atomic write (in ``smn_core``
because the workers write checkpoints through it and ``smn_core`` never imports ``orchestrator``).
"""
