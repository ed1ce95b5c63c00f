"""What every long-running service's `main` does around its own loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol, TypeVar

from gymbus.shared import settings as settings_mod
from gymbus.shared.logs import setup
from gymbus.shared.settings import Settings
from gymbus.shared.transport import StopFlag


class Service(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Service)


def run_until_stopped(role: str, description: str, argv: list[str] | None,
                      build: Callable[[Settings], S], serve: Callable[[S, StopFlag], None]) -> int:
    """Parse the (option-less) command line, set up logging as `role`, load the settings, build
    the service and serve it until SIGTERM or SIGINT; close it whatever happens. Returns 0."""
    argparse.ArgumentParser(
        prog=f"python -m gymbus.services.{role}",
        description=f"{description} Configured by GYMBUS_* variables.",
    ).parse_args(argv)
    setup(role)
    settings = settings_mod.load()
    stop = StopFlag().install()
    service = build(settings)
    try:
        serve(service, stop)
    finally:
        service.close()
    return 0
