"""A sweep against the same runs submitted one by one, and the controller's pace with a full queue.

    python bench/sweep_vs_submit.py [--episodes 200] [--queued 1000] [--json FILE]

Starts a private stack (ingest, broker, controller, one worker of 4 slots) and times, side by
side, the wall time of

  * `gymbus sweep sweep.toml --wait`: 5 seeds x 3 learning rates of q-learning on
    FrozenLake-v1 (fast mode), 15 runs at once on the 4 slots, and
  * the same 15 runs, each `gymbus submit --wait` in turn (the next one once the last ended);

then, with the worker stopped, queues `--queued` tiny runs (one episode, fast mode) with one
`gymbus sweep` and reports the runs queued per second, and the submit and `list_runs` round
trips with an empty queue against those with the full one (the ratio says what a long queue
costs the controller). Last, a worker starts again and the runs dispatched (and ended) per
second are counted for `--dispatch-seconds`: that pace is the worker's (each run is a process),
the controller's share of it shows in how soon a freed slot is filled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState
from gymbus.shared.transport import Client

SWEEP = """
    seeds = {{start = 0, count = 5}}
    [run]
    env = "FrozenLake-v1"
    algo = "q-learning"
    episodes = {episodes}
    telemetry = "fast"
    [grid]
    agent.learning_rate = [0.05, 0.1, 0.2]
"""
TINY = """
    seeds = {{start = 0, count = {count}}}
    [run]
    env = "FrozenLake-v1"
    algo = "q-learning"
    episodes = 1
    telemetry = "fast"
    tags = {{bench = "tiny"}}
"""


def gymbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args],
                            env=stack.process_env(), capture_output=True, text=True,
                            timeout=3600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"gymbus {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def round_trips(client: Client, n: int = 50) -> dict[str, float]:
    """Median milliseconds of a submit that its key answers at once (the first one made the
    run), of list_runs, and of list_runs of a group (read by the registry's index)."""
    probe = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 1, "telemetry": "fast"}

    def submit() -> None:
        client.request(Command.SUBMIT, {"config": probe, "idempotency_key": "bench:probe"})

    submit()

    def listing() -> None:
        client.request(Command.LIST_RUNS)

    def group() -> None:
        client.request(Command.LIST_RUNS, {"filter": {"group": "no-such-group"}})

    return {name: 1000 * statistics.median(timed(fn) for _ in range(n))
            for name, fn in (("submit_ms", submit), ("list_runs_ms", listing),
                             ("list_group_ms", group))}


def sweep_against_submits(stack: Stack, folder: Path, episodes: int) -> dict[str, float]:
    path = folder / "sweep.toml"
    path.write_text(textwrap.dedent(SWEEP.format(episodes=episodes)))
    points = json.loads(gymbus(stack, "sweep", str(path), "--dry-run", "--json").stdout)
    print(f"sweep of {len(points)} runs, --wait ...", file=sys.stderr)
    sweep_s = timed(lambda: gymbus(stack, "sweep", str(path), "--wait"))
    print("the same runs, one `submit --wait` after another ...", file=sys.stderr)

    def one_by_one() -> None:
        for p in points:
            c = p["config"]
            gymbus(stack, "submit", "--env", c["env"], "--algo", c["algo"], "--episodes",
                   str(c["episodes"]), "--fast", "--seed", str(c["seed"]), "--agent-arg",
                   f"learning_rate={c['agent']['learning_rate']}", "--wait")

    submit_s = timed(one_by_one)
    return {"runs": len(points), "sweep_wait_s": sweep_s, "submit_wait_in_turn_s": submit_s,
            "speedup": submit_s / sweep_s}


def full_queue(stack: Stack, folder: Path, queued: int, dispatch_seconds: float) -> dict[str, Any]:
    stack.stop_one("worker")
    with Client(stack.settings.controller, "controller", timeout=30.0) as client:
        empty = round_trips(client)
        path = folder / "tiny.toml"
        path.write_text(textwrap.dedent(TINY.format(count=queued)))
        print(f"queueing {queued} tiny runs ...", file=sys.stderr)
        queue_s = timed(lambda: gymbus(stack, "sweep", str(path)))
        full = round_trips(client)
        stack.start_one("worker")
        # the clock starts with the first dispatch: the worker's own start is not the queue's
        while not client.request(Command.LIST_RUNS, {"filter": {"states": ["dispatched",
                                                                           "running"]}})["runs"]:
            time.sleep(0.05)  # poll toward the first dispatch
        started = time.monotonic()
        while time.monotonic() - started < dispatch_seconds:
            time.sleep(0.5)  # the window being measured
        runs = client.request(Command.LIST_RUNS, {"filter": {"tags": {"bench": "tiny"}}})["runs"]
    left = sum(r["state"] == RunState.QUEUED for r in runs)
    ended = sum(r["state"] in TERMINAL_STATES for r in runs)
    completed = sum(r["state"] == RunState.COMPLETED for r in runs)
    return {
        "queued": queued, "queue_s": queue_s, "queued_per_s": queued / queue_s,
        "empty_queue": empty, "full_queue": full,
        "list_runs_ratio": full["list_runs_ms"] / empty["list_runs_ms"],
        "submit_ratio": full["submit_ms"] / empty["submit_ms"],
        "dispatch_window_s": dispatch_seconds, "dispatched": queued - left,
        "dispatched_per_s": (queued - left) / dispatch_seconds,
        "ended_per_s": ended / dispatch_seconds, "completed": completed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200, help="episodes of each sweep run")
    parser.add_argument("--queued", type=int, default=1000, help="tiny runs to queue")
    parser.add_argument("--dispatch-seconds", type=float, default=20.0)
    parser.add_argument("--json", dest="json_path", help="write the numbers to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gymbus-sweep-bench-") as tmp:
        folder = Path(tmp)
        env = {**free_endpoints(folder / "home"), "GYMBUS_WORKER_SLOTS": "4"}
        with Stack(env) as stack:
            stack.start()
            compared = sweep_against_submits(stack, folder, args.episodes)
            queue = full_queue(stack, folder, args.queued, args.dispatch_seconds)
    print(f"{compared['runs']} runs of {args.episodes} episodes, 4 slots:")
    print(f"  gymbus sweep --wait          {compared['sweep_wait_s']:8.1f} s")
    print(f"  gymbus submit --wait x {compared['runs']:<5} {compared['submit_wait_in_turn_s']:8.1f} s"
          f"   ({compared['speedup']:.1f}x the sweep's time)")
    print(f"{queue['queued']} tiny runs queued by one sweep: {queue['queue_s']:.1f} s, "
          f"{queue['queued_per_s']:.0f} runs/s")
    for name in ("submit_ms", "list_runs_ms", "list_group_ms"):
        print(f"  {name:<14} none queued {queue['empty_queue'][name]:7.2f}   "
              f"{queue['queued']} queued {queue['full_queue'][name]:7.2f}")
    print(f"with {queue['queued']} queued, one worker of 4 slots: {queue['dispatched_per_s']:.2f} "
          f"runs dispatched/s, {queue['ended_per_s']:.2f} ended/s over "
          f"{queue['dispatch_window_s']:.0f} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"sweep": compared, "queue": queue}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
