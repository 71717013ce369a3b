"""Everything generated from the ledger alone: the registry of table and figure layouts
(:mod:`~orchestrator.reports.registry`), the generic results table, the paper's tables and figures
(ablations, baselines, cascade, codec costs, vs-frozen), the one-page report and the experiment trackers.

The layout modules are imported here, by name, so that importing anything of this package registers every
table and figure (``@register_table`` / ``@register_figure``) before :func:`registry.tables` is asked.
"""

from orchestrator.reports import ablations, baselines, cascade, codec_costs, tables, vs_frozen  # noqa: F401 - registers

__all__ = ["ablations", "baselines", "cascade", "codec_costs", "tables", "vs_frozen"]
