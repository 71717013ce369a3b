"""Everything generated from the ledger alone: the registry of table and figure layouts
(:mod:`~orchestrator.reports.registry`), the generic results table, the paper's tables and figures
(ablations, baselines, cascade, codec costs, vs-frozen), the one-page report and the experiment trackers.
"""
