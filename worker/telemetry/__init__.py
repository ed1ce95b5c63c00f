"""A run's telemetry: the emitter's batches, their delivery, the spool and its repair."""
