"""loradex hub: the DuckDB catalog, the content-addressed store, base models and the adapter registry."""
