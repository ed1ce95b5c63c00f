"""`python -m gymbus.worker`: the worker daemon (settings from GYMBUS_* variables)."""

from __future__ import annotations

from gymbus.shared import logs
from gymbus.shared import settings as settings_mod
from gymbus.shared.transport import StopFlag, run_service
from gymbus.worker.daemon import Worker


def main() -> int:
    """Serve until SIGTERM or SIGINT; exits 0 after stopping every run cleanly."""
    stop = StopFlag().install()
    logs.setup("worker")
    return Worker(settings_mod.load(), stop).serve()


if __name__ == "__main__":
    run_service(main)
