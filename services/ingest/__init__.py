"""The ingest process: the only writer of the DuckDB store, and its read-only query API."""
