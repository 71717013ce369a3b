"""orchestrator: the Ray layer of smn (specs, cells on Ray, the Parquet ledger, tables, CLI)."""
