"""`make demo`: start the stack, train real runs, show them live, summarise them from DuckDB, stop.

If a stack already answers at the configured endpoints (`honcho start`), the demo uses it and
leaves it running; otherwise it starts its own on free loopback ports and stops it at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from gymbus.services.cli import output as out
from gymbus.services.ingest.client import StoreClient
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared import queries
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import GymbusError, ServiceUnavailable
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

RUNS: list[dict[str, Any]] = [
    {"name": "demo-frozenlake", "env": "FrozenLake-v1", "algo": "q-learning",
     "episodes": 4000, "seed": 1, "telemetry": "full",
     "agent": {"learning_rate": 0.1, "epsilon_decay": 0.6}},
    {"name": "demo-taxi", "env": "Taxi-v4", "algo": "q-learning", "episodes": 2000, "seed": 1,
     "telemetry": "fast", "agent": {"learning_rate": 0.5, "epsilon_decay": 0.5}},
    {"name": "demo-cliff", "env": "CliffWalking-v1", "algo": "q-learning", "episodes": 500,
     "seed": 1, "telemetry": "full", "agent": {"learning_rate": 0.5, "epsilon_decay": 0.5}},
]

def say(text: str = "") -> None:
    print(text, flush=True)


def stack_is_up(settings: Settings) -> bool:
    try:
        with Client(settings.controller, "controller", timeout=1.0) as c:
            return bool(c.request(Command.LIST_WORKERS)["workers"])
    except ServiceUnavailable:
        return False


def main() -> int:
    configured = settings_mod.load()
    stack: Stack | None = None
    if stack_is_up(configured):
        settings = configured
        say(f"Using the gymbus stack already running at {settings.controller}.")
    else:
        stack = Stack(free_endpoints(configured.home))
        settings = stack.settings
        say(f"Starting broker, controller, ingest and one worker (data in {settings.home}) ...")
        stack.start()
        say("Stack is up.")
    try:
        return demo(settings)
    except GymbusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            say("Stopping the stack ...")
            codes = stack.stop()
            say("Stopped: " + ", ".join(f"{role} exit {code}" for role, code in codes.items()))


def demo(settings: Settings) -> int:
    controller = Client(settings.controller, "controller", settings.request_timeout)
    store = StoreClient(settings)
    run_ids = []
    for config in RUNS:
        reply = controller.request(Command.SUBMIT, {"config": config, "idempotency_key": ""})
        run_ids.append(reply["run_id"])
        say(f"submitted {reply['run_id']}  {config['env']:<16} {config['algo']}  "
            f"{config['episodes']} episodes, telemetry {config['telemetry']}")
    say()
    watch(controller, store, run_ids)
    return summarise(settings, store, run_ids)


def steps_taken(store: StoreClient, runs: list[dict[str, Any]]) -> dict[str, int]:
    """The steps each run took: its record's count once it has ended, else the lengths of its
    stored episodes summed (a fast-mode run stores no step rows, but it takes steps)."""
    uncounted = [r["run_id"] for r in runs if r.get("steps") is None]
    taken = ({r["run_id"]: int(r["steps"]) for r in store.rows(queries.steps_taken(uncounted))}
             if uncounted else {})
    return {r["run_id"]: r["steps"] if r.get("steps") is not None else taken.get(r["run_id"], 0)
            for r in runs}


def watch(controller: Client, store: StoreClient, run_ids: list[str]) -> None:
    """Redraw a small live table until every run has ended."""
    tty = sys.stdout.isatty()
    drawn = 0
    last_print = 0.0
    while True:
        runs = {r["run_id"]: r for r in controller.request(Command.LIST_RUNS)["runs"]}
        stats = store.run_stats()
        taken = steps_taken(store, [runs[r] for r in run_ids])
        rows = []
        for run_id in run_ids:
            run, st = runs[run_id], stats.get(run_id, {})
            curve = [float(r["return"]) for r in store.rows(queries.returns(run_id))]
            rows.append([run_id[-8:], run["env"], run["telemetry"], run["state"],
                         f"{st.get('episodes', 0)}/{run['config'].get('episodes', '-')}",
                         taken[run_id], out.sparkline(curve)])
        text = out.table(["RUN", "ENV", "MODE", "STATE", "EPISODES", "STEPS", "RETURN CURVE"],
                         rows)
        done = all(runs[r]["state"] in TERMINAL_STATES for r in run_ids)
        now = time.monotonic()
        if tty:
            if drawn:
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            drawn = text.count("\n") + 1
        elif done or now - last_print > 3.0:
            say(text + "\n")
            last_print = now
        if done:
            return
        time.sleep(0.5)  # refresh interval of the live view


def summarise(settings: Settings, store: StoreClient, run_ids: list[str]) -> int:
    result = store.query(queries.run_summaries(run_ids))
    say()
    say("Summary, read back from DuckDB:")
    say(out.table(["RUN", "ENV", "MODE", "STATUS", "COMPLETE", "EPISODES", "STEPS STORED",
                   "MEAN RETURN (LAST 100)"], result["rows"]))
    say()
    say(f"Data directory:  {settings.home}")
    say(f"DuckDB file:     {settings.db_path}")
    say(f"Run folders:     {settings.runs_dir}/<run id>  (config.json, run.log, artifacts/)")
    say("Query it:        GYMBUS_HOME=" + str(settings.home)
        + " .venv/bin/gymbus query \"SELECT env, count(*) FROM steps JOIN runs USING (run_id)"
          " GROUP BY env\"")
    ok = all(row[3] == RunState.COMPLETED and row[4] for row in result["rows"])
    if not ok:
        print("error: not every run completed with all of its telemetry stored", file=sys.stderr)
    return 0 if ok and len(result["rows"]) == len(run_ids) else 1


if __name__ == "__main__":
    sys.exit(main())
