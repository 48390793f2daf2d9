"""Data: JSON-lines records, per-task sampling, batching and collation."""
