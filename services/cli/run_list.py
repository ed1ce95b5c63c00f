"""`gymbus runs`: the run records, filtered by its options, with the mean return of each run's
last 100 stored episodes, in a table (registered in main.py)."""

from __future__ import annotations

import time
from typing import Any

import click

from gymbus.services.cli import output as out
from gymbus.services.cli.context import Context, json_option
from gymbus.services.cli.durations import DURATION
from gymbus.services.cli.runs import status_record, store_only, uncounted_steps
from gymbus.shared import queries
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.run_filters import RunFilter, tag_pairs


def run_filter(group: str | None, tags: tuple[str, ...], states: tuple[str, ...],
               env: str | None, algo: str | None, since: float | None) -> RunFilter:
    """The filter the options of `runs` ask for; `since` is an age in seconds."""
    since_ns = None if since is None else time.time_ns() - int(since * 1e9)
    return RunFilter(group=group, tags=tag_pairs(tags), states=tuple(states), env=env,
                     algo=algo, since_ns=since_ns)


def mean_returns(obj: Context, run_ids: list[str]) -> dict[str, float]:
    """The mean return of each run's last 100 stored episodes; {} when the store cannot say."""
    if not run_ids:
        return {}
    try:
        rows = obj.store.rows(queries.run_summaries(run_ids))
    except (ServiceUnavailable, RemoteError):
        return {}
    return {r["run_id"]: float(r["mean_return_last_100"]) for r in rows
            if r.get("mean_return_last_100") is not None}


def runs_table(records: list[dict[str, Any]]) -> str:
    """The `runs` table of `status_record`s with `mean_return_last_100`."""
    return out.table(
        ["RUN", "NAME", "ENV", "ALGO", "MODE", "STATUS", "EPISODES", "STEPS", "STEPS STORED",
         "MEAN RET", "CREATED"],
        [[r["run_id"], r["name"], r["env"], out.shown_algo(r), r["telemetry"], r["status"],
          out.done_of(r["episodes"] or 0, r["episodes_budget"]),
          out.done_of(r["steps"], r["steps_budget"]), r["steps_stored"],
          r.get("mean_return_last_100"), out.format_ns(r["created_ns"])] for r in records])


@click.command()
@click.option("--group", metavar="GROUP", help="Only the runs of this group (a sweep's).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Only runs with this tag (repeatable: all of them).")
@click.option("--status", "states", multiple=True, metavar="STATE",
              type=click.Choice([s.value for s in RunState]),
              help="Only runs in this state (repeatable: any of them): "
                   f"{', '.join(s.value for s in RunState)}.")
@click.option("--env", help="Only runs of this environment id.")
@click.option("--algo", help="Only runs of this algorithm.")
@click.option("--since", type=DURATION, metavar="DURATION",
              help="Only runs created within this long, e.g. 2h.")
@json_option
@click.pass_obj
def runs(obj: Context, group: str | None, tags: tuple[str, ...], states: tuple[str, ...],
         env: str | None, algo: str | None, since: float | None, as_json: bool) -> None:
    """Runs, every one or those the options ask for: id, name, env, algo (eval:ALGO for an
    evaluation run), mode, status, episodes and steps done, steps stored, the mean return of
    the last 100 episodes, created time."""
    wanted = run_filter(group, tags, states, env, algo, since)
    # the runs only the store holds carry no group or tags: with neither asked for, they are
    # found among all the controller's runs, and the filter is applied here
    labelled = wanted.group is not None or bool(wanted.tags)
    body = {"filter": wanted.to_wire()} if labelled else {}
    records = obj.controller.request(Command.LIST_RUNS, body)["runs"]
    stats = obj.run_stats()
    if not labelled:
        records = [r for r in records + store_only(obj, records, stats) if wanted.matches(r)]
    taken = uncounted_steps(obj, records, stats)
    means = mean_returns(obj, [r["run_id"] for r in records]) if stats is not None else {}
    rows = [{**status_record(run, (stats or {}).get(run["run_id"]), taken.get(run["run_id"])),
             "mean_return_last_100": means.get(run["run_id"]),
             "source": run.get("source", "controller")} for run in records]
    if as_json:
        out.emit_json(rows)
        return
    click.echo(runs_table(rows))
