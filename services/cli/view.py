"""The viewer commands of `gymbus`: `watch` (terminal dashboard), `viewer` (Qt), `replay`.

Registered in main.py; each takes the shared `Context` with `@click.pass_obj`.
"""

from __future__ import annotations

import io
import os
import sys

import click
from rich.console import Console

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.shared.errors import ExitCode
from gymbus.shared.protocol import Command

#: the columns `watch` draws in off a terminal (a pipe, a file), unless COLUMNS says otherwise
OFF_TERMINAL_WIDTH = 120
#: the exit code of a watch ended by Ctrl-C (SIGINT), as a shell reports it
INTERRUPTED = 128 + 2


def _console(width: int | None) -> Console:
    """Where `watch` draws: `--width` columns, else the terminal's width (COLUMNS honoured), else
    OFF_TERMINAL_WIDTH (rich's own default off a terminal is 80)."""
    if width:
        return Console(width=width)
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        return Console(width=OFF_TERMINAL_WIDTH)
    return console


def _check_runs(obj: Context, run_ids: tuple[str, ...]) -> None:
    """Every named run exists (else the controller's unknown_run error: exit 4)."""
    for run_id in run_ids:
        obj.controller.request(Command.GET_RUN, {"run_id": run_id})


@click.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN]...")
@click.option("--once", is_flag=True, help="Print one frame of the dashboard and exit.")
@click.option("--until-done", is_flag=True,
              help="Exit once every shown run has ended (and print its last frame).")
@click.option("--width", type=int,
              help="Columns to draw in (default: the terminal's; 120 off a terminal).")
@json_option
@click.pass_obj
def watch(obj: Context, run_ids: tuple[str, ...], once: bool, until_done: bool,
          width: int | None, as_json: bool) -> None:
    """Watch runs live: state, episodes, steps/s, returns, telemetry accounting, and the board of
    grid worlds. Shows the RUNs named, else every active run and the last finished ones.

    Keys: n / p select the next / previous run, q quits (Ctrl-C too, with exit code 130). With
    --json, prints the numbers instead of drawing: once, at the end with --until-done, or where
    it stood at Ctrl-C."""
    try:
        _check_runs(obj, run_ids)
    except KeyboardInterrupt:  # before anything is drawn: nothing to print
        sys.exit(INTERRUPTED)
    from gymbus.services.viewers.live import VIEWER_TIMEOUT, Live
    from gymbus.services.viewers.watch import Dashboard
    from gymbus.services.viewers.watch import watch as follow

    console = _console(width)
    # a viewer's requests wait VIEWER_TIMEOUT at most, GYMBUS_REQUEST_TIMEOUT if it is shorter
    live = Live(obj.settings, run_ids,
                timeout=min(VIEWER_TIMEOUT, obj.settings.request_timeout))
    dash = Dashboard(live, run_ids[0] if run_ids else None)
    interrupted = False
    try:
        follow(dash, console if not as_json else Console(file=io.StringIO()),
               once=once or (as_json and not until_done), until_done=until_done,
               draw=not as_json)
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C ends a watch (with --json: the numbers where it stood)
    finally:
        live.close()
    if as_json:
        out.emit_json(dash.to_json())
    if interrupted:
        sys.exit(INTERRUPTED)


@click.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN]...")
@click.pass_obj
def viewer(obj: Context, run_ids: tuple[str, ...]) -> None:
    """Open the desktop viewer: a tab per agent with its grid world, curves and episodes, replay
    of stored episodes, and a runs panel to submit and cancel (needs `pip install 'gymbus[qt]'`
    and a display; without one, `gymbus watch` shows the runs in the terminal)."""
    try:
        from gymbus.services.viewers.qt import window as viewer_qt
    except ImportError as exc:
        click.echo(f"error: the Qt viewer needs the qt extra (pip install 'gymbus[qt]'): {exc}",
                   err=True)
        sys.exit(ExitCode.BAD_INPUT)
    sys.exit(viewer_qt.main(obj.settings, list(run_ids)))


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--episode", "-e", type=int, required=True, help="The episode to replay (0-based).")
@click.option("--delay", type=float, default=0.0, show_default=True,
              help="Seconds between steps, to watch it unfold.")
@json_option
@click.pass_obj
def replay(obj: Context, run_id: str, episode: int, delay: float, as_json: bool) -> None:
    """Replay a stored episode step by step: the board of grid worlds, the action, the reward and
    what chose it (the BDI agent's intention). A fast-mode run stored no steps: shows the
    episode's return and length and the run's metric curves instead."""
    from gymbus.services.viewers import replay as rp

    store = obj.store
    episode_replay = rp.load_episode(store, run_id, episode)
    metrics = None if episode_replay.steps else rp.fallback_metrics(store, run_id)
    if as_json:
        out.emit_json(rp.to_json(episode_replay, metrics))
    elif episode_replay.steps:
        rp.print_replay(episode_replay, Console(), delay)
    else:
        rp.print_fallback(episode_replay, metrics or [], Console())
