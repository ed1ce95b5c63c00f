"""What every `gymbus` command shares: settings, lazily opened clients, error output, --json.

The command modules (main.py and the modules beside it, one per command group) take a `Context`
with `@click.pass_obj`. An error is one line on stderr, or, once `--json` was given (the
option's callback sets `Context.json`), `{"error": {"code", "message", "exit_code"[, "field"]}}`
on stdout, so that a script reads it where it reads the answer; the exit code is the same.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import click

from gymbus.services.ingest.client import StoreClient
from gymbus.shared import queries
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import GymbusError, NotFound, RemoteError, ServiceUnavailable
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
        #: whether --json was given: None until the command's options are read (a command
        #: without --json leaves it so)
        self.json: bool | None = None

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

    def steps_taken(self, run_ids: Iterable[str]) -> dict[str, int]:
        """The steps of each run's finished episodes, from its stored episode rows (what a run
        still running has taken so far); {} when the store cannot say."""
        wanted = list(run_ids)
        if not wanted:
            return {}
        try:
            rows = self.store.rows(queries.steps_taken(wanted))
        except (ServiceUnavailable, RemoteError):
            return {}
        return {r["run_id"]: int(r["steps"]) for r in rows}


#: the `code` of a JSON error for the errors whose code is not one a service answers with
_CLI_CODES: tuple[tuple[type[Exception], str], ...] = (
    (ServiceUnavailable, "unavailable"), (NotFound, "not_found"), (click.ClickException, "usage"))


def error_body(exc: GymbusError | click.ClickException) -> dict[str, Any]:
    """An error as `--json` prints it: code, message, exit code, and the field it names."""
    code = next((c for kind, c in _CLI_CODES if isinstance(exc, kind)), None)
    if isinstance(exc, click.ClickException):
        return {"code": code, "message": exc.format_message(), "exit_code": exc.exit_code}
    body: dict[str, Any] = {"code": code or exc.code.value, "message": str(exc),
                            "exit_code": exc.exit_code}
    field = getattr(exc, "field", None)
    if field:
        body["field"] = field
    return body


def fail(exc: GymbusError | click.ClickException, as_json: bool | None = None) -> NoReturn:
    """Report `exc` and exit with its code: one line on stderr, or JSON on stdout when `as_json`
    (None: whether the running command was given --json)."""
    if as_json is None:
        ctx = click.get_current_context(silent=True)
        obj = ctx.find_object(Context) if ctx is not None else None
        as_json = bool(obj is not None and obj.json)
    if as_json:
        click.echo(json.dumps({"error": error_body(exc)}))
    elif isinstance(exc, click.ClickException):
        exc.show()
    else:
        click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _note_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    obj = ctx.find_object(Context)
    if obj is not None:
        obj.json = value
    return value


def json_flag(help_text: str) -> Callable[[F], F]:
    """The --json option with its own help; eager, so that errors in the options read after it
    are reported as JSON too."""
    option: Callable[[F], F] = click.option(
        "--json", "as_json", is_flag=True, is_eager=True, callback=_note_json, help=help_text)
    return option


def json_option(f: F) -> F:
    return json_flag("Machine-readable output (and errors as JSON on stdout).")(f)


