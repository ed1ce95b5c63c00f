"""What every `gymbus` command shares: settings, lazily opened clients, error output, --json.

The command modules (main.py and the modules beside it, one per command group) take a `Context`
with `@click.pass_obj`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from gymbus.services.ingest.client import StoreClient
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import GymbusError, RemoteError, ServiceUnavailable
from gymbus.shared.protocol import ErrorCode
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every command needs: settings and lazily opened clients."""

    def __init__(self) -> None:
        self.settings: Settings = settings_mod.load()
        self._controller: Client | None = None
        self._ingest: Client | None = None
        self._store: StoreClient | None = None

    @property
    def controller(self) -> Client:
        if self._controller is None:
            s = self.settings
            self._controller = Client(s.controller, "controller", s.request_timeout)
        return self._controller

    @property
    def ingest(self) -> Client:
        """The ingest's API itself, for commands that need the running ingest (import-tb)."""
        if self._ingest is None:
            s = self.settings
            self._ingest = Client(s.ingest, "ingest", s.request_timeout)
        return self._ingest

    @property
    def store(self) -> StoreClient:
        """Stored telemetry: the ingest's query API, or the DuckDB file when no ingest answers."""
        if self._store is None:
            self._store = StoreClient(self.settings)
        return self._store

    def run_stats(self, run_id: str | None = None) -> dict[str, dict[str, Any]] | None:
        """The ingest's accounting per run id, or None when the ingest does not answer."""
        try:
            return self.store.run_stats(run_id, timeout=2.0)
        except ServiceUnavailable:
            return None
        except RemoteError as exc:
            if exc.code is ErrorCode.UNKNOWN_RUN:
                return {}  # no frame of the run stored yet
            raise


def fail(exc: GymbusError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


