"""The broker process: routes runs to workers, tracks their liveness, fans telemetry out."""
