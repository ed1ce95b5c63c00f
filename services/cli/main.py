"""The `gymbus` command: its group, `workers` and `config`; the other commands, one module per
group beside this one (runs.py, query.py, view.py, tensorboard.py, keys.py).

Errors are one line on stderr with an exit code from `ExitCode`; `--json` output is for scripts.
"""

from __future__ import annotations

import time
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, fail, json_option
from gymbus.services.cli.keys import keys
from gymbus.services.cli.query import query
from gymbus.services.cli.runs import cancel, runs, status, submit
from gymbus.services.cli.sync import sync
from gymbus.services.cli.tensorboard import import_tb, tensorboard
from gymbus.services.cli.view import replay, viewer, watch
from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import Command


class GymbusGroup(click.Group):
    """Turns every GymbusError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GymbusError as exc:
            fail(exc)


@click.group(cls=GymbusGroup)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """gymbus: launch reinforcement-learning runs, watch them, query every step afterwards.

    Exit codes: 0 ok, 1 run did not complete (submit --wait), 2 bad input, 3 a service did not
    answer, 4 no such run, 5 refused.
    """
    ctx.obj = Context()


# --- workers, config ------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_obj
def workers(obj: Context, as_json: bool) -> None:
    """Connected workers, with slots, busy slots and last heartbeat."""
    records = obj.controller.request(Command.LIST_WORKERS)["workers"]
    if as_json:
        out.emit_json(records)
        return
    now = time.time_ns()
    click.echo(out.table(
        ["WORKER", "HOST", "PID", "SLOTS", "BUSY", "LAST HEARTBEAT"],
        [[w["worker_id"], w["host"], w["pid"], w["slots"], w["busy"],
          f"{(now - w['last_heartbeat_ns']) / 1e9:.1f} s ago"] for w in records],
    ))


@cli.command()
@json_option
@click.pass_obj
def config(obj: Context, as_json: bool) -> None:
    """The resolved settings: data directory, endpoints, heartbeats (from GYMBUS_* variables)."""
    values = obj.settings.to_json()
    if as_json:
        out.emit_json(values)
        return
    for key, value in values.items():
        click.echo(f"{key:>20}  {value}")


# --- the commands of the modules beside this one ------------------------------------------------

for command in (submit, runs, status, cancel, query, watch, viewer, replay, tensorboard, import_tb,
                sync, keys):
    cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except GymbusError as exc:  # raised while building the Context, before a command runs
        fail(exc)


if __name__ == "__main__":
    main()
