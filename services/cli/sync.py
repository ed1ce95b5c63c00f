"""`gymbus sync [RUN | PATH ...]`: store the spools of runs recorded offline (`gymbus.run()`
with no stack, `GYMBUS_MODE=offline`, or a stack that went away), idempotently."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import zmq

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.shared.errors import ExitCode, GymbusError
from gymbus.worker.telemetry import spool


def _targets(obj: Context, names: tuple[str, ...]) -> list[Path]:
    """Run folders: those named (run ids or paths), else every unconfirmed spool."""
    runs_dir = obj.settings.runs_dir
    if not names:
        if not runs_dir.is_dir():
            return []
        return [d for d in sorted(runs_dir.iterdir())
                if spool.spool_path(d).exists() and not spool.is_confirmed(d)]
    folders = []
    for name in names:
        path = Path(name)
        folders.append(path if path.is_dir() else runs_dir / name)
    return folders


@click.command()
@click.argument("runs", nargs=-1, metavar="[RUN | PATH]...")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait per run for the ingest to hold all of it.")
@json_option
@click.pass_obj
def sync(obj: Context, runs: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Store runs recorded offline: register each with the controller and replay its spool
    until the ingest holds every frame. Syncing twice stores nothing twice."""
    from gymbus.sync import SyncError, read_spool, register, store_spool

    folders = _targets(obj, runs)
    results: list[dict[str, Any]] = []
    ctx: zmq.Context[Any] = zmq.Context()
    failed = False
    try:
        for folder in folders:
            entry: dict[str, Any] = {"path": str(folder)}
            try:
                spooled = read_spool(folder)
                entry["run_id"] = spooled.run_id
                if spooled.confirmed:
                    entry.update(stored=True, frames=None, status="already stored")
                else:
                    if not as_json:
                        click.echo(f"{spooled.run_id}: {spooled.frames} frames ...", err=True)
                    record = register(obj.settings, spooled, ctx)
                    ok = store_spool(obj.settings, spooled.run_id, folder, ctx, timeout=timeout)
                    entry.update(stored=ok, frames=spooled.frames, status=record["state"])
                    failed = failed or not ok
            except (SyncError, GymbusError) as exc:
                entry.update(stored=False, error=str(exc))
                failed = True
            results.append(entry)
    finally:
        ctx.destroy(linger=0)
    if as_json:
        out.emit_json(results)
    else:
        if not results:
            click.echo("nothing to sync: no unconfirmed spool under " f"{obj.settings.runs_dir}")
        for r in results:
            if "error" in r:
                click.echo(f"error: {r['path']}: {r['error']}", err=True)
            else:
                click.echo(f"{r['run_id']}  {r['status']:<14} "
                           f"{'stored' if r['stored'] else 'NOT all stored (run sync again)'}")
    if failed:
        sys.exit(int(ExitCode.UNAVAILABLE) if any("error" not in r for r in results)
                 else int(ExitCode.BAD_INPUT))
