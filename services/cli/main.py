"""The `gymbus` command: its group, `workers` and `config`; the other commands, one module per
group beside this one (runs.py, query.py, view.py, tensorboard.py, keys.py).

Errors are one line on stderr with an exit code from `ExitCode`, or JSON on stdout under
`--json` (context.py's `fail`); `--json` output is for scripts.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.archive import archive, restore
from gymbus.services.cli.compare import compare
from gymbus.services.cli.context import Context, fail, json_option
from gymbus.services.cli.export import export
from gymbus.services.cli.keys import keys
from gymbus.services.cli.manage import du, gc, rm
from gymbus.services.cli.query import query
from gymbus.services.cli.run_list import runs
from gymbus.services.cli.runs import cancel, status, submit
from gymbus.services.cli.sweep import sweep
from gymbus.services.cli.sync import sync
from gymbus.services.cli.tensorboard import import_tb, tensorboard
from gymbus.services.cli.view import replay, viewer, watch
from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import Command


class GymbusGroup(click.Group):
    """Turns every GymbusError into one line on stderr (JSON on stdout under --json) and its exit
    code, and refuses an option that takes one value given twice (click would keep the last)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not ctx.resilient_parsing:
            refuse_repeated_options(ctx, name or "", command, rest)
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GymbusError as exc:
            fail(exc, wants_json(ctx))
        except click.ClickException as exc:
            if not wants_json(ctx):
                raise  # click prints it with the command's usage
            fail(exc, True)


#: ctx.meta key of the command line after `gymbus`, as given
_ARGS = "gymbus.args"


def wants_json(ctx: click.Context) -> bool:
    """Whether errors go out as JSON: --json as the command read it, else (it failed before its
    options were read) whether --json is on the command line."""
    obj = ctx.obj
    if isinstance(obj, Context) and obj.json is not None:
        return obj.json
    args: list[str] = ctx.meta.get(_ARGS, [])
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def refuse_repeated_options(ctx: click.Context, name: str, command: click.Command,
                            args: list[str]) -> None:
    """A UsageError (exit 2) for an option of one value given more than once."""
    sub = click.Context(command, info_name=name, parent=ctx, resilient_parsing=True)
    try:
        _, _, order = command.make_parser(sub).parse_args(list(args))
    except click.UsageError:
        return  # the command's own parsing reports it
    seen: set[str] = set()
    for param in order:
        if not isinstance(param, click.Option) or param.multiple or param.count or param.is_flag:
            continue
        if param.name in seen:
            raise click.UsageError(f"{param.opts[-1]} is given more than once: give it once",
                                   ctx=click.Context(command, info_name=name, parent=ctx))
        seen.add(param.name or "")


@click.group(cls=GymbusGroup)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """gymbus: launch reinforcement-learning runs, watch them, query every step afterwards.

    Exit codes: 0 ok, 1 run did not complete (submit/sweep --wait), 2 bad input, 3 a service did
    not answer, 4 no such run (or episode), 5 refused, 6 timed out (--wait with --wait-timeout).
    With --json, an error is printed as JSON on stdout:
    {"error": {"code": ..., "message": ..., "exit_code": ...}}.
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

for command in (submit, sweep, runs, status, cancel, query, watch, viewer, replay, compare,
                export, archive, restore, du, rm, gc, tensorboard, import_tb, sync, keys):
    cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except GymbusError as exc:  # raised while building the Context, before a command runs
        fail(exc, "--json" in sys.argv[1:])


if __name__ == "__main__":
    main()
