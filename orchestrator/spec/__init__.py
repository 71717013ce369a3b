"""Experiment specs: the pydantic models (the cascade section included), YAML loading and overrides,
checks before any work, cell expansion (methods x grid x seeds) and the one config hash (``cell_id``).

Modules: :mod:`~orchestrator.spec.experiment` (models, loading, expansion, hash), :mod:`~orchestrator.spec.base`
(``SpecError``, ``Resources``, the one-line validation message), :mod:`~orchestrator.spec.cascade` (the ``cascade:``
section), :mod:`~orchestrator.spec.tracking` (the ``tracking:`` section), :mod:`~orchestrator.spec.keys` (dotted
keys: the one ``flatten``), :mod:`~orchestrator.spec.estimate` (the dry-run cost estimate).
"""
