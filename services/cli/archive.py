"""The `gymbus archive` and `gymbus restore` commands: finished runs' step rows to Parquet files
under the gymbus home and back, through the ingest (services/ingest/archive.py).

Registered in main.py. Queries see archived rows as before. The runs are moved one request at a
time, with a line of progress on stderr for each.
"""

from __future__ import annotations

import re
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.shared.protocol import Command

#: seconds one run's archive or restore may take before the command gives up waiting
RUN_TIMEOUT = 900.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds of `7d`, `12h`, `30m`, `90s`, `2w`; click.BadParameter otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration such as 7d, 12h, 30m or 90s",
                                 param_hint="--older-than")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _each(obj: Context, cmd: Command, run_ids: list[str], verb: str) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    for i, run_id in enumerate(run_ids, 1):
        reply = obj.ingest.request(cmd, {"run_ids": [run_id]}, timeout=RUN_TIMEOUT)
        result = reply["runs"][0]
        done.append(result)
        click.echo(f"{verb} {i}/{len(run_ids)}: {run_id} ({result['rows']} step rows)", err=True)
    return done


@click.command()
@click.argument("run_ids", nargs=-1)
@click.option("--older-than", "older_than", metavar="DURATION",
              help="Every run that ended this long ago or more (7d, 12h, 30m, 90s).")
@click.option("--dry-run", is_flag=True, help="Only list the runs that would be archived.")
@json_option
@click.pass_obj
def archive(obj: Context, run_ids: tuple[str, ...], older_than: str | None, dry_run: bool,
            as_json: bool) -> None:
    """Move finished runs' step rows out of the DuckDB file into Parquet files under the
    gymbus home (archive/steps/run_id=RUN/). Every query still sees them; `gymbus restore`
    brings them back. Give RUN ids or --older-than."""
    if bool(run_ids) == (older_than is not None):
        raise click.UsageError("give RUN ids or --older-than DURATION (one of the two)")
    body: dict[str, Any] = ({"run_ids": list(run_ids)} if run_ids
                            else {"older_than_s": parse_duration(older_than or "")})
    plan = obj.ingest.request(Command.ARCHIVE, {**body, "dry_run": True})
    todo = [r["run_id"] for r in plan["runs"]]
    if not todo:
        click.echo("no finished run to archive", err=True)
    runs = plan["runs"] if dry_run else _each(obj, Command.ARCHIVE, todo, "archived")
    if as_json:
        out.emit_json({"runs": runs, "dry_run": dry_run})
        return
    if dry_run:
        click.echo("\n".join(todo))
        return
    click.echo(out.table(["RUN", "ROWS", "MB"], [
        [r["run_id"], r["rows"], f"{r['bytes'] / 1e6:.1f}"] for r in runs]))


@click.command()
@click.argument("run_ids", nargs=-1, required=True)
@json_option
@click.pass_obj
def restore(obj: Context, run_ids: tuple[str, ...], as_json: bool) -> None:
    """Bring archived runs' step rows back from Parquet into the DuckDB file."""
    runs = _each(obj, Command.RESTORE, list(dict.fromkeys(run_ids)), "restored")
    if as_json:
        out.emit_json({"runs": runs})
        return
    click.echo(out.table(["RUN", "ROWS"], [[r["run_id"], r["rows"]] for r in runs]))
