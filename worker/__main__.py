"""`python -m gymbus.worker`: the worker daemon (settings from GYMBUS_* variables)."""

from __future__ import annotations

from gymbus.shared.service import run_service, run_until_stopped
from gymbus.worker.daemon import Worker


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop every run cleanly; the exit code
    (shared/service.py) says what stopped it."""
    return run_until_stopped("worker", "Execute gymbus runs, each in its own process.", argv,
                             Worker, Worker.serve, module="gymbus.worker")


if __name__ == "__main__":
    run_service(main)
