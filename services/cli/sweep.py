"""`gymbus sweep`: one run per point of a sweep file, all in one group, and waiting for them.

The file's format is shared/sweeps.py's (docs/sweeps.md shows one). Each point is submitted with
an idempotency key made of the sweep's key and its index, so that submitting the same sweep
again with the same key (`--key`, or `key` in the file) returns the runs made the first time;
the group's id is made from the key too. Without a key, a new group and keys are made each time.
"""

from __future__ import annotations

import hashlib
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click
from ulid import ULID

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.services.cli.durations import DURATION, short
from gymbus.services.cli.runs import (
    NO_WORKER,
    POLL_SECONDS,
    WorkerNotice,
    absolute_plans,
    complete_evaluation,
    split_command,
)
from gymbus.shared.errors import ConfigError, ExitCode, GymbusError
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState
from gymbus.shared.run_filters import RunFilter
from gymbus.shared.sweeps import Point, Sweep, parse_sweep

NO_WORKER_SWEEP = NO_WORKER.replace("the run stays", "the sweep's runs stay")


def load_sweep(path: str) -> Sweep:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("sweep file", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("sweep file", f"{path} is not valid TOML: {exc}") from None
    return parse_sweep(raw)


def group_of(key: str) -> str:
    """The group id of a sweep submitted with this key: the same every time."""
    return "sweep-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@click.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the points; submit nothing.")
@click.option("--key", help="Idempotency key: the same sweep submitted again with it makes no "
                            "new runs (default: the file's `key`).")
@click.option("--wait", is_flag=True, help="Wait for every run; exit 0 only if all completed.")
@click.option("--wait-timeout", "timeout", type=DURATION, metavar="DURATION",
              help="With --wait: stop waiting after this long (e.g. 30m; exit 6).")
@json_option
@click.pass_obj
def sweep(obj: Context, sweep_file: str, dry_run: bool, key: str | None, wait: bool,
          timeout: float | None, as_json: bool) -> None:
    """Submit one run per point of SWEEP_FILE (TOML: [run], seeds, [grid], [sample]), all in one
    group; prints the group id (JSON: the group and each run with its point)."""
    spec = load_sweep(sweep_file)
    base = complete_evaluation(obj, dict(spec.base))  # asks the controller only for eval_from
    absolute_plans(base)
    split_command(base)
    spec = Sweep(base=base, key=spec.key, name=spec.name, seeds=spec.seeds, grid=spec.grid,
                 samples=spec.samples)
    points = spec.points()
    if dry_run:
        show_points(spec, points, as_json)
        return
    key = key or spec.key
    group = group_of(key) if key else f"sweep-{ULID()}".lower()
    runs = submit_points(obj, points, group, key or group)
    if not wait:
        if as_json:
            out.emit_json({"group": group, "runs": runs})
        else:
            click.echo(group)
        return
    records = wait_for_group(obj, group, [r["run_id"] for r in runs], timeout)
    states = {r["run_id"]: r["state"] for r in records}
    timed_out = any(s not in TERMINAL_STATES for s in states.values())
    if as_json:
        out.emit_json({"group": group, "timed_out": timed_out,
                       "runs": [{**r, "status": states.get(r["run_id"])} for r in runs]})
    else:
        click.echo(group)
    if timed_out:
        click.echo(f"error: sweep {group} has runs still going after {short(timeout or 0)} "
                   "(--wait-timeout); they go on", err=True)
        sys.exit(ExitCode.TIMED_OUT)
    failed = [r for r in records if r["state"] != RunState.COMPLETED]
    if failed:
        click.echo(f"error: {len(failed)} of the sweep's {len(records)} runs did not complete "
                   f"(first: {failed[0]['run_id']} {failed[0]['state']})", err=True)
        sys.exit(ExitCode.RUN_NOT_COMPLETED)


def submit_points(obj: Context, points: list[Point], group: str,
                  key: str) -> list[dict[str, Any]]:
    """Submit each point in `group` with the idempotency key `sweep:KEY:INDEX`, progress on
    stderr; each run's id, index, point and whether this submit made it. A point the controller
    refuses (its environment checks) stops the sweep, saying what was queued before it."""
    progress = out.Progress()
    runs: list[dict[str, Any]] = []
    for point in points:
        config = {**point.config, "group": group}
        body = {"config": config, "idempotency_key": f"sweep:{key}:{point.index}"}
        try:
            reply = obj.controller.request(Command.SUBMIT, body)
        except GymbusError:
            if runs:
                click.echo(f"error: point {point.index} refused; the {len(runs)} before it are "
                           f"in group {group} (fix the file and submit again with the same "
                           "key: they are not made twice)", err=True)
            raise
        if reply["run"].get("tags") not in (None, config["tags"]):
            click.echo(f"warning: run {reply['run_id']} was made by an earlier submit with this "
                       f"key, for other values than point {point.index}'s", err=True)
        runs.append({"run_id": reply["run_id"], "index": point.index, "point": point.values,
                     "created": reply["created"]})
        progress.show(f"submitted {len(runs)}/{len(points)}", time.monotonic())
    created = sum(r["created"] for r in runs)
    progress.done(f"sweep {group}: {created} run(s) queued, {len(runs) - created} already "
                  "submitted")
    return runs


def show_points(spec: Sweep, points: list[Point], as_json: bool) -> None:
    if as_json:
        out.emit_json([{"index": p.index, "point": p.values, "config": p.config} for p in points])
        return
    axes = spec.axes
    click.echo(out.table(["#", *[a.upper() for a in axes], "NAME"],
                         [[p.index, *[_shown(p.values[a]) for a in axes], p.config.get("name") or None]
                          for p in points]))
    click.echo(f"{len(points)} run(s); nothing submitted (--dry-run)", err=True)


def group_line(records: list[dict[str, Any]], total: int, started: float, now: float,
               group: str) -> str:
    """The group's progress: done, failed, running, queued, and an ETA from the pace so far."""
    count: dict[str, int] = {}
    for r in records:
        count[r["state"]] = count.get(r["state"], 0) + 1
    done = count.get(RunState.COMPLETED, 0)
    failed = sum(count.get(s, 0) for s in (RunState.FAILED, RunState.CANCELLED, RunState.LOST))
    running = count.get(RunState.RUNNING, 0) + count.get(RunState.DISPATCHED, 0)
    queued = count.get(RunState.QUEUED, 0)
    finished = done + failed
    eta = "-"
    if finished and finished < total:
        eta = short((now - started) / finished * (total - finished))
    return (f"sweep {group}: {done}/{total} done, {failed} failed, {running} running, "
            f"{queued} queued, ETA {eta}")


def wait_for_group(obj: Context, group: str, run_ids: list[str],
                   timeout: float | None) -> list[dict[str, Any]]:
    """Poll the group until each of `run_ids` is terminal (or `timeout` passed), its progress
    on stderr, saying at once when runs are queued and no worker is connected; the records."""
    progress = out.Progress()
    notice = WorkerNotice()
    wanted = set(run_ids)
    started = time.monotonic()
    body = {"filter": RunFilter(group=group).to_wire()}
    while True:
        records = [r for r in obj.controller.request(Command.LIST_RUNS, body)["runs"]
                   if r["run_id"] in wanted]
        now = time.monotonic()
        line = group_line(records, len(wanted), started, now, group)
        ended = all(r["state"] in TERMINAL_STATES for r in records)
        if ended or (timeout is not None and now - started >= timeout):
            progress.done(line)
            return records
        if any(r["state"] == RunState.QUEUED for r in records) and notice.due(now):
            notice.checked(now)
            if not obj.controller.request(Command.LIST_WORKERS)["workers"]:
                progress.note(NO_WORKER_SWEEP)
        progress.show(line, now)
        time.sleep(POLL_SECONDS)


def _shown(value: Any) -> str:
    """An axis value as given (a table would round a float to 4 digits)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
