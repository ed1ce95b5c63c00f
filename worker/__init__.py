"""gymbus worker: the worker daemon, the run child, the telemetry emitter, agents."""
