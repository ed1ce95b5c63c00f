"""How long `gymbus` commands take to fail, or to fall back to the DuckDB file, when no service
runs: each against the request timeout, beside the command's own start-up.

    python bench/no_stack.py [--timeout 2] [--rounds 3] [--json FILE]

A private stack makes a home holding two finished runs (CartPole, full telemetry; FrozenLake,
fast mode) and is stopped; then, round by round, `gymbus --help` (the start-up alone: imports,
settings), `submit`, `query`, `replay` and `watch --once` run against that home, its endpoints
with nothing listening. Printed per command: the median wall time, the same less the start-up's
median, the exit code, and whether it is within the request timeout + 1 s (the target; the
start-up of a Python command is counted apart, since it depends on the machine's load alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.protocol import Command
from gymbus.shared.transport import Client

#: seconds beyond the request timeout a command may take to fail or fall back
SLACK = 1.0
RUNS = ({"env": "CartPole-v1", "algo": "random", "episodes": 50, "telemetry": "full"},
        {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 100, "telemetry": "fast"})


def make_home(home: Path) -> tuple[dict[str, str], list[str]]:
    """A home holding RUNS, its stack stopped: the environment of a `gymbus` there, the run ids."""
    stack = Stack(free_endpoints(home))
    run_ids = []
    try:
        stack.start()
        with Client(stack.settings.controller, "controller") as client:
            for config in RUNS:
                run_ids.append(str(client.request(Command.SUBMIT, {"config": config})["run_id"]))
        with Client(stack.settings.ingest, "ingest") as ingest:
            deadline = time.monotonic() + 120
            while True:
                stats = {r["run_id"]: r for r in ingest.request(Command.RUN_STATS, {})["runs"]}
                if all(stats.get(r, {}).get("complete") for r in run_ids):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("error: the runs were not stored within 120 s")
                time.sleep(0.2)  # poll interval, toward the deadline
    finally:
        stack.stop()
    return stack.process_env(), run_ids


def timed(env: dict[str, str], args: list[str]) -> tuple[float, int]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    return time.monotonic() - started, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=2.0, help="GYMBUS_REQUEST_TIMEOUT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the numbers to this file too")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gymbus-no-stack-")) / "home"
    print(f"making {home} ...", file=sys.stderr, flush=True)
    env, (cartpole, _) = make_home(home)
    env = {**env, "GYMBUS_REQUEST_TIMEOUT": f"{args.timeout:g}"}
    commands: dict[str, list[str]] = {
        "start-up": ["--help"],
        "submit": ["submit", "--env", "FrozenLake-v1", "--algo", "q-learning", "--episodes", "5"],
        "query": ["query", "SELECT count(*) FROM episodes"],
        "replay": ["replay", cartpole, "--episode", "3", "--json"],
        "watch --once": ["watch", "--once"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, int] = {}
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        for name, argv in commands.items():
            took, codes[name] = timed(env, argv)
            times[name].append(took)
    start_up = statistics.median(times["start-up"])
    report: dict[str, Any] = {"request_timeout_s": args.timeout, "rounds": args.rounds}
    print(f"{'command':<14}{'median s':>10}{'less start-up':>15}{'exit':>6}  within timeout + 1 s")
    for name in commands:
        median = statistics.median(times[name])
        beyond = median - start_up
        ok = name == "start-up" or beyond <= args.timeout + SLACK
        report[name] = {"median_s": round(median, 2), "less_start_up_s": round(beyond, 2),
                        "exit": codes[name], "within": ok}
        print(f"{name:<14}{median:>10.2f}{beyond:>15.2f}{codes[name]:>6}  "
              f"{'-' if name == 'start-up' else 'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(v["within"] for k, v in report.items() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
