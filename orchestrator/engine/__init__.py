"""The engine: where cells run on Ray, and the schedulers that hand cells to it.

* :mod:`~orchestrator.engine.cell`: :class:`~orchestrator.engine.cell.CellJob` (a plain cell, a Tune trial, a
  cascade router, expert or combination, a codec measurement), epoch checkpoints, a job run in-process or as
  DDP in a ``TorchTrainer``, and :func:`~orchestrator.engine.cell.land`, the one writer of ledger rows, curves,
  failure records and final state.
* :mod:`~orchestrator.engine.pool`: warm worker actors and bounded submission.
* :mod:`~orchestrator.engine.session`: the Ray session smn starts or joins (token auth, resource checks).
* :mod:`~orchestrator.engine.preflight`: every node reaches the results storage, before any work.
* :mod:`~orchestrator.engine.prepare`: what every scheduler does first (ledger lookup, pretraining artifacts).
* Schedulers: :mod:`~orchestrator.engine.plain` (a spec's cells), :mod:`~orchestrator.engine.sweep`
  (Ray Tune grids and Optuna searches), :mod:`~orchestrator.engine.cascade` (the stages of the cascade: router,
  experts, combinations, each a ``CellJob``).
"""
