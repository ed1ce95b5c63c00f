"""`gymbus rm`, `gymbus du`, `gymbus gc`: removing runs, and the disk they use.

`rm` goes through the services that own what it removes: the ingest (the DuckDB file's only
writer) deletes the run's rows, the controller its record and run folder. It needs both running:
it never opens the file itself. `du` reads (the store through the ingest, or the file read-only
when no ingest answers). `gc` removes what no run needs: spools the ingest has confirmed, and run
folders that belong to no run.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.services.controller.removal import folder_bytes
from gymbus.shared.errors import (
    ExitCode,
    GymbusError,
    NotFound,
    RemoteError,
    ServiceUnavailable,
)
from gymbus.shared.protocol import TERMINAL_STATES, Command, ErrorCode
from gymbus.worker.telemetry import spool

#: seconds `rm` waits for a just-ended run's spool to be confirmed by the ingest
SPOOL_WAIT_S = 10.0
_DATA_TABLES = ("steps", "episodes", "metrics", "lifecycle", "frames", "gaps")


class ServicesRequired(GymbusError):
    """The command changes what the ingest or the controller owns, and one of them does not
    answer. Start the stack (`honcho start`) and run it again; nothing was changed."""

    exit_code = ExitCode.UNAVAILABLE


class RunActive(GymbusError):
    """A run named is still queued or running: cancel it (`gymbus cancel RUN`) first, and wait
    for it to end. Nothing was removed."""


class SpoolUnconfirmed(GymbusError):
    """A run's spool still holds frames that the ingest has not confirmed: its worker may
    replay them, and the run would come back. Wait, or store them (`gymbus sync RUN`), and
    run the command again. Nothing was removed."""


def require_service(obj: Context, name: str) -> None:
    """ServicesRequired unless the controller or the ingest (`name`) answers a ping."""
    client = obj.controller if name == "controller" else obj.ingest
    try:
        client.request(Command.PING, timeout=min(obj.settings.request_timeout, 3.0))
    except ServiceUnavailable as exc:
        raise ServicesRequired(
            f"the {name} does not answer at {exc.endpoint}: this command needs the running "
            f"{name} (it never opens the DuckDB file or the registry itself); start the stack "
            "with `honcho start`. Nothing was changed") from None


def stored_run_ids(obj: Context) -> set[str]:
    return {r["run_id"] for r in obj.store.rows("SELECT run_id FROM runs")}


def human(size: int) -> str:
    """Bytes as at most 8 characters: 512 B, 12.3 KiB, 1.0 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# --- rm -------------------------------------------------------------------------------------------


def _wait_for_spool(folder: Path, run_id: str) -> None:
    """Wait for the worker to confirm the run's spool; SpoolUnconfirmed when it does not."""
    deadline = time.monotonic() + SPOOL_WAIT_S
    while spool.spool_path(folder).exists() and not spool.is_confirmed(folder):
        if time.monotonic() > deadline:
            raise SpoolUnconfirmed(
                f"the spool of run {run_id} ({spool.spool_path(folder)}) is not confirmed by the "
                "ingest yet: its worker may still replay it. Wait, or `gymbus sync "
                f"{run_id}`, then run rm again. Nothing was removed")
        time.sleep(0.1)  # polls the spool's marker until the deadline above


@click.command("rm")
@click.argument("run_ids", nargs=-1, metavar="RUN...")
@click.option("--group", "groups", multiple=True, metavar="GROUP",
              help="Remove every run of this group (repeatable).")
@click.option("--yes", is_flag=True, help="Remove without asking.")
@json_option
@click.pass_obj
def rm(obj: Context, run_ids: tuple[str, ...], groups: tuple[str, ...], yes: bool,
       as_json: bool) -> None:
    """Remove ended runs: their rows from every table (through the ingest), their run folders
    and their records (through the controller). A queued or running run is refused: cancel it
    first. Every other run's rows stay as they were."""
    if not run_ids and not groups:
        raise click.UsageError("name the runs to remove: RUN... or --group GROUP")
    require_service(obj, "ingest")
    require_service(obj, "controller")
    records = {r["run_id"]: r for r in obj.controller.request(Command.LIST_RUNS)["runs"]}
    stored = stored_run_ids(obj)
    chosen: list[str] = []
    for run_id in run_ids:
        if run_id not in records and run_id not in stored:
            raise NotFound(f"no run {run_id!r}: neither the controller nor the ingest knows it")
        chosen.append(run_id)
    for group in groups:
        members = [r for r, rec in records.items() if group and rec.get("group") == group]
        if not members:
            raise NotFound(f"no run belongs to group {group!r}")
        chosen.extend(members)
    chosen = list(dict.fromkeys(chosen))
    active = [f"{r} ({records[r]['state']})" for r in chosen
              if r in records and records[r]["state"] not in TERMINAL_STATES]
    if active:
        raise RunActive(f"{len(active)} run(s) have not ended: {', '.join(active)}; cancel "
                        "them first (`gymbus cancel RUN`). Nothing was removed")
    for run_id in chosen:
        _wait_for_spool(obj.settings.run_dir(run_id), run_id)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("rm asks before removing, and there is no terminal to ask: "
                                   "give --yes")
        click.confirm(f"remove {len(chosen)} run(s) ({', '.join(chosen)}) with all their rows "
                      "and files?", abort=True, err=True)
    results = [remove_run(obj, run_id) for run_id in chosen]
    if as_json:
        out.emit_json(results)
        return
    click.echo(out.table(["RUN", "ROWS", "FOLDER", "RECORD"], [
        [r["run_id"], r["rows_deleted"], human(r["folder_bytes"]),
         "removed" if r["record"] else "-"] for r in results]))


def remove_run(obj: Context, run_id: str) -> dict[str, Any]:
    """One run removed: rows (ingest) first, then record and folder (controller)."""
    try:
        rows = obj.ingest.request(Command.DELETE_RUN, {"run_id": run_id})["rows"]
    except RemoteError as exc:
        if exc.code is not ErrorCode.UNKNOWN_RUN:
            raise
        rows = {}  # no frame of it was stored
    reply = obj.controller.request(Command.DELETE_RUN, {"run_id": run_id, "missing_ok": True})
    return {"run_id": run_id, "rows": rows, "rows_deleted": sum(rows.values()),
            "record": reply["record"], "folder": reply["folder"],
            "folder_bytes": reply["folder_bytes"]}


# --- du -------------------------------------------------------------------------------------------


def rows_per_run(obj: Context) -> dict[str, int]:
    """Stored rows of each run, over every table that holds rows of runs."""
    union = " UNION ALL ".join(f"SELECT run_id FROM {t}" for t in _DATA_TABLES)
    sql = f"SELECT run_id, count(*) AS n FROM ({union}) GROUP BY run_id"
    return {r["run_id"]: int(r["n"]) for r in obj.store.rows(sql)}


def disk_usage(obj: Context) -> dict[str, Any]:
    """Per run: its rows, its share of the DuckDB file by rows, its folder, its spool."""
    db = obj.settings.db_path
    wal = db.with_name(db.name + ".wal")
    file_bytes = sum(p.stat().st_size for p in (db, wal) if p.exists())
    rows = rows_per_run(obj) if db.exists() else {}
    total_rows = sum(rows.values())
    runs_dir = obj.settings.runs_dir
    folders = {d.name: d for d in sorted(runs_dir.iterdir())} if runs_dir.is_dir() else {}
    runs: list[dict[str, Any]] = []
    for run_id in sorted(set(rows) | set(folders)):
        folder = folders.get(run_id)
        spool_bytes = folder_bytes(spool.spool_dir(folder)) if folder else 0
        folder_total = folder_bytes(folder) if folder else 0
        share = round(file_bytes * rows.get(run_id, 0) / total_rows) if total_rows else 0
        runs.append({"run_id": run_id, "rows": rows.get(run_id, 0), "db_bytes": share,
                     "folder_bytes": folder_total - spool_bytes, "spool_bytes": spool_bytes,
                     "total_bytes": share + folder_total})
    return {"db_path": str(db), "db_file_bytes": file_bytes, "rows": total_rows,
            "folder_bytes": sum(r["folder_bytes"] for r in runs),
            "spool_bytes": sum(r["spool_bytes"] for r in runs),
            "total_bytes": file_bytes + sum(r["folder_bytes"] + r["spool_bytes"] for r in runs),
            "runs": runs}


@click.command()
@json_option
@click.pass_obj
def du(obj: Context, as_json: bool) -> None:
    """Disk used per run and in total: the DuckDB file's share by rows, the run folder, the
    spool."""
    usage = disk_usage(obj)
    if as_json:
        out.emit_json(usage)
        return
    body = [[r["run_id"], r["rows"], human(r["db_bytes"]), human(r["folder_bytes"]),
             human(r["spool_bytes"]), human(r["total_bytes"])] for r in usage["runs"]]
    body.append(["total", usage["rows"], human(usage["db_file_bytes"]),
                 human(usage["folder_bytes"]), human(usage["spool_bytes"]),
                 human(usage["total_bytes"])])
    click.echo(out.table(["RUN", "ROWS", "DB", "FOLDER", "SPOOL", "TOTAL"], body))


# --- gc -------------------------------------------------------------------------------------------


def collectable(obj: Context) -> list[dict[str, Any]]:
    """What gc removes: each confirmed run's spool, and each run folder of no run."""
    from gymbus.sync import SyncError, read_spool

    runs_dir = obj.settings.runs_dir
    if not runs_dir.is_dir():
        return []
    known = {r["run_id"] for r in obj.controller.request(Command.LIST_RUNS)["runs"]}
    stored = stored_run_ids(obj)
    stats = obj.store.run_stats()
    found = []
    for folder in sorted(d for d in runs_dir.iterdir() if d.is_dir()):
        run_id, path = folder.name, spool.spool_path(folder)
        unconfirmed = path.exists() and not spool.is_confirmed(folder)
        if unconfirmed and not spool.writer_alive(path) and stats.get(run_id, {}).get("complete"):
            try:
                frames = read_spool(folder).frames
            except SyncError:
                continue
            answer = obj.ingest.request(Command.SPOOL_STATUS,
                                        {"run_id": run_id, "frames": frames, "final": True})
            if answer["complete"]:  # stored, and checkpointed into the file
                found.append({"kind": "spool", "run_id": run_id, "path": str(path),
                              "frames": frames, "bytes": folder_bytes(spool.spool_dir(folder))})
        elif not unconfirmed and run_id not in known and run_id not in stored:
            found.append({"kind": "folder", "run_id": run_id, "path": str(folder),
                          "frames": None, "bytes": folder_bytes(folder)})
    return found


@click.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@click.pass_obj
def gc(obj: Context, dry_run: bool, as_json: bool) -> None:
    """Remove the spools of runs the ingest has confirmed, and run folders that belong to no
    run (a folder with a spool not yet stored is kept: `gymbus sync` stores it)."""
    require_service(obj, "ingest")
    require_service(obj, "controller")
    found = collectable(obj)
    if not dry_run:
        for item in found:
            if item["kind"] == "spool":
                spool.confirm(Path(item["path"]).parent.parent, item["frames"])
            else:
                shutil.rmtree(item["path"], ignore_errors=True)
    if as_json:
        out.emit_json({"dry_run": dry_run, "removed": [] if dry_run else found,
                       "would_remove": found if dry_run else [],
                       "bytes": sum(i["bytes"] for i in found)})
        return
    if not found:
        click.echo("nothing to remove")
        return
    click.echo(out.table(["KIND", "RUN", "SIZE", "PATH"], [
        [i["kind"], i["run_id"], human(i["bytes"]), i["path"]] for i in found]))
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {human(sum(i['bytes'] for i in found))} in {len(found)} item(s)")
