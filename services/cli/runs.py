"""The run commands of `gymbus`: `submit`, `status` and `cancel`, and their helpers (`runs` is
run_list.py's).

Registered in main.py; each takes the shared `Context` with `@click.pass_obj`. A run's record
comes from the controller, its telemetry accounting from the ingest (`Context.run_stats`).
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
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
from gymbus.shared import queries
from gymbus.shared.errors import ConfigError, ExitCode, RemoteError
from gymbus.shared.policy_files import POLICY_FILES, guess_policy_algo
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState, TelemetryMode
from gymbus.shared.run_filters import tag_pairs
from gymbus.shared.runconfig import parse_config

POLL_SECONDS = 0.25


# --- submit ---------------------------------------------------------------------------------------


def build_config(run_file: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The run config: a TOML file's fields, then the flags given on the command line."""
    config: dict[str, Any] = {}
    if run_file:
        try:
            config = tomllib.loads(Path(run_file).read_text())
        except OSError as exc:
            raise ConfigError("run file", f"cannot read {run_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("run file", f"{run_file} is not valid TOML: {exc}") from None
    config.update({k: v for k, v in flags.items() if v is not None})
    return config


def parse_assignments(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """`key=value` pairs, the value read as TOML (so 0.5, true and "x" keep their types)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(option, f"expected key=value, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        # a TOML date or time is text here: no environment or agent takes one
        result[key] = raw if isinstance(value, dt.date | dt.time) else value
    return result


@click.command()
@click.argument("run_file", required=False, type=click.Path(dir_okay=False))
@click.option("--env", help="Gymnasium environment id, e.g. FrozenLake-v1.")
@click.option("--algo", help="q-learning, bdi, dqn or random (an evaluation run: from its policy).")
@click.option("--episodes", type=int, help="Episode budget.")
@click.option("--total-steps", type=int, help="Environment-step budget.")
@click.option("--seed", type=int, help="Seed of the run (default 0).")
@click.option("--fast", is_flag=True, help="Fast mode: no step frames at all.")
@click.option("--telemetry", type=click.Choice([m.value for m in TelemetryMode]),
              help="full, fast or sampled.")
@click.option("--every", type=int, help="With --telemetry sampled: every Nth episode's steps.")
@click.option("--max-episode-steps", type=int, help="Truncate episodes at this length.")
@click.option("--env-arg", "env_args", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for gymnasium.make (repeatable), e.g. is_slippery=false.")
@click.option("--agent-arg", "agent_args", multiple=True, metavar="KEY=VALUE",
              help="Hyperparameter (repeatable), e.g. learning_rate=0.2.")
@click.option("--name", help="A label for people.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="A tag to filter runs by (repeatable), e.g. arm=baseline.")
@click.option("--agent-id", help="Agent id in telemetry (default agent-0).")
@click.option("--eval-from", metavar="RUN",
              help="Evaluate the policy saved by run RUN: greedy episodes, nothing trained or saved.")
@click.option("--policy", metavar="PATH",
              help="Evaluate the policy at PATH (q_table.npy, q_network.pt, or their folder).")
@click.option("--eval-every", type=int,
              help="While training, evaluate the greedy policy every N episodes (eval/* metrics).")
@click.option("--eval-episodes", type=int, help="Episodes per --eval-every evaluation (100).")
@click.option("--env-module", metavar="MODULE",
              help="A module imported before gymnasium.make: it registers your environment ids.")
@click.option("--command", metavar="CMD",
              help="Run your own script on a worker instead of a built-in agent, e.g. "
                   "\"python train.py --seed 1\"; its gymbus.run() records the run.")
@click.option("--cpus", type=int, help="CPU cores the run needs (pinned to that many).")
@click.option("--memory", metavar="SIZE", help="Memory limit, e.g. 512MiB or 2GiB.")
@click.option("--gpus", type=int, help="GPUs the run needs (0: it sees none).")
@click.option("--timeout", "time_limit", metavar="DURATION",
              help="The run fails past this long, e.g. 90s or 30m (run files: timeout).")
@click.option("--idempotency-key", help="Resubmitting with the same key makes one run.")
@click.option("--wait", is_flag=True, help="Wait for the end; exit 0 only if it completed.")
@click.option("--wait-timeout", "timeout", type=DURATION, metavar="DURATION",
              help="With --wait: stop waiting after this long (e.g. 90s, 10m; exit 6).")
@json_option
@click.pass_obj
def submit(obj: Context, /, run_file: str | None, fast: bool, env_args: tuple[str, ...],
           agent_args: tuple[str, ...], tags: tuple[str, ...], idempotency_key: str | None,
           wait: bool, timeout: float | None, as_json: bool, **flags: Any) -> None:
    """Submit a run, from flags or a RUN_FILE (TOML with the same field names)."""
    if fast:
        if flags.get("telemetry") not in (None, TelemetryMode.FAST.value):
            raise ConfigError("telemetry", "--fast contradicts --telemetry " + flags["telemetry"])
        flags["telemetry"] = TelemetryMode.FAST.value
    flags["timeout"] = flags.pop("time_limit")  # the run's limit; --wait-timeout is --wait's
    config = build_config(run_file, flags)
    if env_args:
        config["env_kwargs"] = {**config.get("env_kwargs", {}),
                                **parse_assignments(env_args, "--env-arg")}
    if agent_args:
        config["agent"] = {**config.get("agent", {}),
                           **parse_assignments(agent_args, "--agent-arg")}
    if tags:
        config["tags"] = {**config.get("tags", {}), **tag_pairs(tags)}
    config = complete_evaluation(obj, config)
    absolute_plans(config)
    split_command(config)
    parse_config(config)  # types and ranges, before any service is asked
    body = {"config": config, "idempotency_key": idempotency_key or str(ULID())}
    # one try, within the request timeout: its message says how long it waited (a submit
    # that timed out is resubmitted safely with --idempotency-key: still one run)
    reply = obj.controller.request(Command.SUBMIT, body)
    run_id = reply["run_id"]
    if not wait:
        if as_json:
            out.emit_json({"run_id": run_id, "created": reply["created"], "run": reply["run"]})
        else:
            click.echo(run_id)
        return
    run = wait_for_end(obj, run_id, timeout)
    stats = (obj.run_stats(run_id) or {}).get(run_id)
    timed_out = run["state"] not in TERMINAL_STATES
    if as_json:
        taken = uncounted_steps(obj, [run], stats).get(run_id)
        out.emit_json({"run_id": run_id, "status": run["state"], "reason": run.get("reason"),
                       **status_record(run, stats, taken), "timed_out": timed_out})
    else:
        click.echo(run_id)
    if timed_out:
        click.echo(f"error: run {run_id} is still {run['state']} after {short(timeout or 0)} "
                   "(--wait-timeout); it goes on", err=True)
        sys.exit(ExitCode.TIMED_OUT)
    if run["state"] != RunState.COMPLETED:
        reason = f": {run['reason']}" if run.get("reason") else ""
        click.echo(f"error: run {run_id} ended {run['state']}{reason}", err=True)
        sys.exit(ExitCode.RUN_NOT_COMPLETED)


#: what an evaluation run takes from the run it evaluates, unless given
INHERITED_FIELDS = ("env", "algo", "env_kwargs", "max_episode_steps", "agent")


def complete_evaluation(obj: Context, config: dict[str, Any]) -> dict[str, Any]:
    """An evaluation run's config, completed from its source and checked against it.

    `eval_from`: the run must be a completed training run; its env, algo, env_kwargs,
    max_episode_steps and agent settings fill what the config leaves out, and the algo must
    load the same policy file. `policy`: the path becomes absolute (the worker reads it), must
    exist, and gives the algo when none is given.
    """
    policy, eval_from = config.get("policy"), config.get("eval_from")
    if isinstance(policy, str) and policy:
        path = Path(policy).expanduser().resolve()
        if not path.exists():
            raise ConfigError("policy", f"no such file or folder: {policy}")
        config["policy"] = str(path)
        if "algo" not in config:
            algo = guess_policy_algo(path)
            if algo is None:
                raise ConfigError("policy", f"{policy} holds no policy gymbus knows "
                                            f"({', '.join(sorted(set(POLICY_FILES.values())))})")
            config["algo"] = algo
    if isinstance(eval_from, str) and eval_from:
        source = obj.controller.request(Command.GET_RUN, {"run_id": eval_from})["run"]
        trained = source.get("config") or {}
        if trained.get("eval_from") or trained.get("policy"):
            raise ConfigError("eval_from", f"run {eval_from} is an evaluation run and saved no "
                                           "policy; name the training run it evaluated")
        if source["state"] != RunState.COMPLETED:
            raise ConfigError("eval_from", f"run {eval_from} is {source['state']}: only a "
                                           "completed training run has a policy to evaluate")
        for key in INHERITED_FIELDS:
            if key not in config and trained.get(key) is not None:
                config[key] = trained[key]
        algo, source_algo = config.get("algo"), trained.get("algo")
        if POLICY_FILES.get(str(algo)) != POLICY_FILES.get(str(source_algo)):
            raise ConfigError("algo", f"run {eval_from} trained {source_algo}; its policy "
                                      f"cannot be evaluated by {algo}")
    return config


def absolute_plans(config: dict[str, Any]) -> None:
    """A BDI plan file that exists here becomes an absolute path (the worker reads it); other
    names are those of shipped plan files."""
    agent = config.get("agent")
    plans = agent.get("plans") if isinstance(agent, dict) else None
    if isinstance(agent, dict) and isinstance(plans, str) and plans:
        path = Path(plans).expanduser()
        if path.is_file():
            agent["plans"] = str(path.resolve())


def split_command(config: dict[str, Any]) -> None:
    """A command run's `command` given as one string is split as a shell would; the run
    records the directory it was submitted from (its script runs there, if the worker has it)."""
    command = config.get("command")
    if isinstance(command, str):
        try:
            config["command"] = shlex.split(command)
        except ValueError as exc:
            raise ConfigError("command", f"cannot split {command!r}: {exc}") from None
    if command is not None and "cwd" not in config:
        config["cwd"] = os.getcwd()


#: seconds between two notices that no worker is connected, while a run waits queued
NO_WORKER_EVERY = 10.0
NO_WORKER = ("no worker is connected to the controller: the run stays queued until one is "
             "(start the whole stack with `make up`, or a worker with `python -m gymbus.worker`)")


class WorkerNotice:
    """When a waiting command asks the controller whether any worker is connected: at once,
    then every `every` seconds, while its run is queued."""

    def __init__(self, every: float = NO_WORKER_EVERY) -> None:
        self.every = every
        self._next: float | None = None

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next

    def checked(self, now: float) -> None:
        self._next = now + self.every


def wait_for_end(obj: Context, run_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Poll the run until it is terminal, showing progress on stderr (and, while it is queued
    with no worker connected, saying so); then its record. After `timeout` seconds, the
    record as it is (not terminal)."""
    progress = out.Progress()
    notice = WorkerNotice()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run: dict[str, Any] = obj.controller.request(Command.GET_RUN, {"run_id": run_id})["run"]
        stats = (obj.run_stats(run_id) or {}).get(run_id)
        by_steps = bool(run.get("config", {}).get("total_steps")) and stats is not None
        taken = obj.steps_taken([run_id]).get(run_id) if by_steps else None
        line = out.progress_line(run, stats, taken)
        now = time.monotonic()
        if run["state"] in TERMINAL_STATES or (deadline is not None and now >= deadline):
            progress.done(line)
            return run
        if run["state"] == RunState.QUEUED and notice.due(now):
            notice.checked(now)
            if not obj.controller.request(Command.LIST_WORKERS)["workers"]:
                progress.note(NO_WORKER)
        progress.show(line, now)
        time.sleep(POLL_SECONDS)


# --- runs, status, cancel -------------------------------------------------------------------------


def status_record(run: dict[str, Any], stats: dict[str, Any] | None,
                  steps_taken: int | None = None) -> dict[str, Any]:
    """A run as `status` and `runs` show it: the controller's record merged with the ingest's
    accounting. `steps` are the steps the run took (the controller's count at its end, else
    `steps_taken`: those of its stored episodes), `steps_stored` the step rows the ingest holds
    (none in fast mode); `episodes_budget` and `steps_budget` its budget."""
    stats = stats or {}
    config = run.get("config") or {}
    emitted = run.get("frames_emitted")
    if emitted is None:
        emitted = stats.get("frames_emitted")
    steps = run.get("steps")
    episodes = stats.get("episodes")
    return {
        "run_id": run["run_id"],
        "name": run.get("name") or None,
        "tags": run.get("tags") or config.get("tags") or {},
        "group": run.get("group") or config.get("group") or None,
        "status": run["state"],
        "env": run["env"],
        "algo": run["algo"],
        "telemetry": run["telemetry"],
        "worker_id": run.get("worker_id"),
        "reason": run.get("reason"),
        "created_ns": run.get("created_ns"),
        "frames_emitted": emitted,
        "frames_stored": stats.get("frames_stored"),
        "gaps": stats.get("gaps"),
        "duplicates": stats.get("duplicates"),
        "complete": stats.get("complete"),
        "episodes": episodes if episodes is not None else run.get("episodes"),
        "steps": steps if steps is not None else steps_taken,
        # a recorded run's steps stored without their observation, and rows it refused
        "obs_not_stored": stats.get("obs_not_stored"),
        "rows_refused": stats.get("rows_refused"),
        "steps_stored": stats.get("steps"),
        "episodes_budget": config.get("episodes"),
        "steps_budget": config.get("total_steps"),
        "evaluation": bool(config.get("eval_from") or config.get("policy")),
        "eval_from": config.get("eval_from"),
        "policy": config.get("policy"),
        "started_ns": run.get("started_ns"),
        "ended_ns": run.get("ended_ns"),
    }


def uncounted_steps(obj: Context, records: list[dict[str, Any]],
                    stats: dict[str, Any] | None) -> dict[str, int]:
    """The steps taken, from their stored episodes, by the runs whose record does not count
    them (yet): a run still running, or one whose worker was lost. None asked when the ingest
    did not answer for `stats` (the store would wait out its timeout again)."""
    if stats is None:
        return {}
    return obj.steps_taken(r["run_id"] for r in records if r.get("steps") is None)


def store_only(obj: Context, records: list[dict[str, Any]],
               stats: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Runs the store holds that the controller never made (`gymbus import-tb` makes them),
    as records of the controller's shape; their state is what their run_completed said."""
    known = {r["run_id"] for r in records}
    missing = sorted(set(stats or {}) - known)
    if not missing:
        return []
    rows = obj.store.rows(queries.stored_runs(missing))
    return [{"run_id": r["run_id"], "name": r["name"] or "", "state": r["status"] or "stored",
             "env": r["env"] or "", "algo": r["algo"] or "", "telemetry": r["telemetry"] or "",
             "config": {}, "created_ns": r["started_ns"], "worker_id": None,
             "reason": r["reason"], "frames_emitted": r["frames_emitted"],
             "steps": r["steps"], "episodes": r["episodes"], "source": "store"} for r in rows]


@click.command()
@click.argument("run_id")
@json_option
@click.pass_obj
def status(obj: Context, run_id: str, as_json: bool) -> None:
    """A run's state and its telemetry accounting (frames emitted, stored, gaps, duplicates)."""
    run = obj.controller.request(Command.GET_RUN, {"run_id": run_id})["run"]
    stats = obj.run_stats(run_id)
    if stats is None:
        click.echo("warning: the ingest did not answer; stored counts unknown", err=True)
    taken = uncounted_steps(obj, [run], stats).get(run_id)
    record = status_record(run, (stats or {}).get(run_id), taken)
    if as_json:
        out.emit_json(record)
        return
    tags = " ".join(f"{k}={v}" for k, v in sorted(record["tags"].items())) or None
    click.echo(out.status_lines({**record, "tags": tags}))


@click.command()
@click.argument("run_id")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the end.")
@json_option
@click.pass_obj
def cancel(obj: Context, run_id: str, timeout: float, as_json: bool) -> None:
    """Cancel a run: its process is stopped, and the run ends `cancelled`."""
    run = obj.controller.request(Command.CANCEL, {"run_id": run_id})["run"]
    deadline = time.monotonic() + timeout
    while run["state"] not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        run = obj.controller.request(Command.GET_RUN, {"run_id": run_id})["run"]
    if as_json:
        out.emit_json({"run_id": run_id, "status": run["state"], "reason": run.get("reason")})
    else:
        click.echo(f"{run_id} {run['state']}")
    if run["state"] not in TERMINAL_STATES:
        raise RemoteError("internal", f"run {run_id} did not stop within {timeout:g} s")
    if run["state"] != RunState.CANCELLED:
        click.echo(f"error: run {run_id} ended {run['state']} before the cancel took effect",
                   err=True)
        sys.exit(ExitCode.REFUSED)
