"""Learning quality through the real stack, and BDI against plain Q-learning.

    python bench/learning.py [--quick] [--only table|compare] [--json FILE] [--keep]

Starts a private stack (ingest, broker, controller, one worker with two slots) and submits
every run to its controller, in fast mode (episodes and metrics stored, no step rows).

The table: each algorithm trains with its budget, then an evaluation run (`eval_from`) plays
the saved policy greedily; the result is read back from the ingest (mean return of the
evaluation's episodes; on FrozenLake that is the success rate) and checked against its target
(docs/agents.md). Wall times are the controller's, from the run's start to its end.

The comparison: bdi and q-learning train with `eval_every` (greedy checkpoints of 1000
episodes, 10 on the deterministic map) on FrozenLake maps, five seeds each; for each run, the
episodes trained when a checkpoint first reached the target success rate, the episodes
from which every later checkpoint stayed there ("held from"), and the first training episode
that reached the goal ("first success"). Same budgets and
hyperparameters for both. Wall times include the checkpoints' greedy episodes.

`--quick` cuts every budget (a smoke test of the script, not of the agents).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared import settings as settings_mod
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState, TelemetryMode
from gymbus.shared.transport import Client

SEEDS = (1, 2, 3, 4, 5)
SUCCESS_TARGET = 0.70
POLL_S = 0.5


@dataclass
class Row:
    """One line of the table: a training run and the evaluation of its policy."""

    label: str
    config: dict[str, Any]
    eval_episodes: int
    target: str
    passes: Any  # Callable[[float], bool]
    train_id: str = ""
    eval_id: str = ""
    result: float | None = None
    note: str = ""
    wall: dict[str, float] = field(default_factory=dict)


@dataclass
class Curve:
    """One comparison run: training with greedy checkpoints every `every` episodes."""

    map_label: str
    config: dict[str, Any]
    run_id: str = ""
    reached_at: int | None = None
    #: episodes from which every later checkpoint stayed at or above the target
    held_from: int | None = None
    #: the first training episode that reached the goal (0-based)
    first_success: int | None = None
    checkpoints: list[float] = field(default_factory=list)
    final: float | None = None
    wall: float = 0.0
    decisions: float | None = None
    note: str = ""


def table_rows(quick: bool) -> list[Row]:
    """The runs of the learning table: env, algo, budget, target."""
    cut = 10 if quick else 1
    lake = {"env": "FrozenLake-v1", "seed": 1}
    episodes = 1000 // cut
    rows = [
        Row("FrozenLake-v1 4x4 slippery", {**lake, "algo": "q-learning", "episodes": 8000 // cut},
            episodes, ">= 0.70 success", lambda v: v >= 0.70),
        Row("FrozenLake-v1 4x4 slippery", {**lake, "algo": "bdi", "episodes": 8000 // cut},
            episodes, ">= 0.70 success", lambda v: v >= 0.70),
        Row("Taxi-v4", {"env": "Taxi-v4", "algo": "q-learning", "episodes": 10000 // cut,
                        "seed": 1}, episodes, ">= 7.0 mean return", lambda v: v >= 7.0),
        Row("CliffWalking-v1", {"env": "CliffWalking-v1", "algo": "q-learning",
                                "episodes": 500 // cut, "seed": 1},
            episodes, "= -13 mean return", lambda v: v == -13.0),
    ]
    for seed in (1, 2, 3):
        rows.append(Row(f"CartPole-v1 seed {seed}",
                        {"env": "CartPole-v1", "algo": "dqn", "total_steps": 100_000 // cut,
                         "seed": seed}, 20, ">= 475 mean return", lambda v: v >= 475.0))
    return rows


def curves(quick: bool) -> list[Curve]:
    """Five seeds of bdi and of q-learning on each map, with greedy checkpoints."""
    cut = 10 if quick else 1
    maps = [
        ("FrozenLake-v1 4x4 slippery", {"env": "FrozenLake-v1", "episodes": 8000 // cut,
                                        "eval_every": 100, "eval_episodes": 1000 // cut}),
        ("FrozenLake8x8-v1 slippery", {"env": "FrozenLake8x8-v1", "episodes": 10000 // cut,
                                       "eval_every": 250, "eval_episodes": 1000 // cut}),
        ("FrozenLake8x8-v1 not slippery", {"env": "FrozenLake8x8-v1", "episodes": 2000 // cut,
                                           "eval_every": 20, "eval_episodes": 10,
                                           "env_kwargs": {"is_slippery": False}}),
    ]
    return [Curve(label, {**config, "algo": algo, "seed": seed})
            for label, config in maps for algo in ("q-learning", "bdi") for seed in SEEDS]


# --- the stack ----------------------------------------------------------------------------------


def stack_env(home: Path) -> dict[str, str]:
    """Free loopback ports for every endpoint setting (also ones free_endpoints may not know)."""
    env = {**free_endpoints(home), "GYMBUS_WORKER_SLOTS": "2"}
    for name, default in settings_mod.DEFAULTS.items():
        var = settings_mod.PREFIX + name.upper()
        if isinstance(default, str) and default.startswith("tcp://") and var not in env:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                env[var] = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return env


class Bench:
    """Submits runs, follows them to their end, reads their results back from the ingest."""

    def __init__(self, stack: Stack) -> None:
        s = stack.settings
        self.controller = Client(s.controller, "controller", 10.0)
        self.ingest = Client(s.ingest, "ingest", 30.0)

    def submit(self, config: dict[str, Any]) -> str:
        body = {"config": {**config, "telemetry": TelemetryMode.FAST.value},
                "idempotency_key": str(uuid.uuid4())}
        return str(self.controller.request(Command.SUBMIT, body)["run_id"])

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.controller.request(Command.GET_RUN, {"run_id": run_id})["run"])

    def finished(self, run_id: str) -> dict[str, Any] | None:
        """The run's record once it has ended and the ingest holds all its frames, else None."""
        run = self.run(run_id)
        if run["state"] not in TERMINAL_STATES:
            return None
        if run["state"] == RunState.COMPLETED:
            stats = self.ingest.request(Command.RUN_STATS, {"run_id": run_id})["runs"]
            if not stats or not stats[0]["complete"]:
                return None
        return run

    def query(self, sql: str) -> list[dict[str, Any]]:
        reply = self.ingest.request(Command.QUERY, {"sql": sql})
        return [dict(zip(reply["columns"], row)) for row in reply["rows"]]

    def mean_return(self, run_id: str) -> float:
        rows = self.query(f"SELECT avg(\"return\") AS mean FROM episodes WHERE run_id = '{run_id}'")
        return float(rows[0]["mean"])

    def checkpoints(self, run_id: str) -> list[float]:
        rows = self.query("SELECT value FROM metrics WHERE name = 'eval/mean_return' AND "
                          f"run_id = '{run_id}' ORDER BY step")
        return [float(r["value"]) for r in rows]

    def mean_metric(self, run_id: str, name: str) -> float | None:
        rows = self.query(f"SELECT avg(value) AS v FROM metrics WHERE name = '{name}' "
                          f"AND run_id = '{run_id}'")
        return None if rows[0]["v"] is None else float(rows[0]["v"])


def wall_s(run: dict[str, Any]) -> float:
    if run.get("started_ns") is None or run.get("ended_ns") is None:
        return 0.0
    return (run["ended_ns"] - run["started_ns"]) / 1e9


def follow(bench: Bench, rows: list[Row], runs: list[Curve], timeout: float) -> None:
    """Submit everything, start each evaluation when its training ends, read every result."""
    for row in rows:
        row.train_id = bench.submit(row.config)
    for curve in runs:
        curve.run_id = bench.submit(curve.config)
    pending_rows, pending_curves = list(rows), list(runs)
    deadline = time.monotonic() + timeout
    while (pending_rows or pending_curves) and time.monotonic() < deadline:
        for row in list(pending_rows):
            if _advance_row(bench, row):
                pending_rows.remove(row)
        for curve in list(pending_curves):
            run = bench.finished(curve.run_id)
            if run is not None:
                _read_curve(bench, curve, run)
                pending_curves.remove(curve)
        time.sleep(POLL_S)  # poll interval, bounded by the deadline
    for item in pending_rows + pending_curves:
        item.note = f"not finished within {timeout:.0f} s"


def _advance_row(bench: Bench, row: Row) -> bool:
    """One step of a row's life; True once its result (or failure) is known."""
    if not row.eval_id:
        run = bench.finished(row.train_id)
        if run is None:
            return False
        row.wall["train"] = wall_s(run)
        if run["state"] != RunState.COMPLETED:
            row.note = f"training {run['state']}: {run.get('reason')}"
            return True
        evaluation = {k: v for k, v in row.config.items() if k not in ("episodes", "total_steps")}
        row.eval_id = bench.submit({**evaluation, "episodes": row.eval_episodes,
                                    "eval_from": row.train_id})
        return False
    run = bench.finished(row.eval_id)
    if run is None:
        return False
    row.wall["eval"] = wall_s(run)
    if run["state"] != RunState.COMPLETED:
        row.note = f"evaluation {run['state']}: {run.get('reason')}"
    else:
        row.result = bench.mean_return(row.eval_id)
    return True


def _read_curve(bench: Bench, curve: Curve, run: dict[str, Any]) -> None:
    curve.wall = wall_s(run)
    if run["state"] != RunState.COMPLETED:
        curve.note = f"{run['state']}: {run.get('reason')}"
        return
    values = bench.checkpoints(curve.run_id)
    every = int(curve.config["eval_every"])
    curve.checkpoints = values
    curve.final = values[-1] if values else None
    curve.reached_at = next(((i + 1) * every for i, v in enumerate(values)
                             if v >= SUCCESS_TARGET), None)
    below = [i for i, v in enumerate(values) if v < SUCCESS_TARGET]
    if values and values[-1] >= SUCCESS_TARGET:
        curve.held_from = (below[-1] + 2 if below else 1) * every
    rows = bench.query(f"SELECT min(episode) AS first FROM episodes WHERE run_id = "
                       f"'{curve.run_id}' AND \"return\" > 0")
    curve.first_success = rows[0]["first"]
    if curve.config["algo"] == "bdi":
        curve.decisions = bench.mean_metric(curve.run_id, "bdi/decisions")


# --- the report ---------------------------------------------------------------------------------


def budget_of(config: dict[str, Any]) -> str:
    if "total_steps" in config:
        return f"{config['total_steps']:,} steps"
    return f"{config['episodes']:,} episodes"


def print_table(rows: list[Row]) -> bool:
    header = ("env", "algo", "budget", "train wall s", "eval wall s", "result", "target", "pass")
    lines = [header]
    ok = True
    for row in rows:
        passed = row.result is not None and bool(row.passes(row.result))
        ok &= passed or row.config["algo"] == "dqn"
        result = f"{row.result:.3f}" if row.result is not None else row.note
        lines.append((row.label, row.config["algo"], budget_of(row.config),
                      f"{row.wall.get('train', 0):.1f}", f"{row.wall.get('eval', 0):.1f}",
                      f"{result} ({row.eval_episodes} ep.)", row.target,
                      "yes" if passed else "NO"))
    dqn = [r for r in rows if r.config["algo"] == "dqn"]
    solved = sum(1 for r in dqn if r.result is not None and r.passes(r.result))
    ok &= solved >= 2
    lines.append(("CartPole-v1", "dqn", "3 seeds", "", "", f"{solved} of 3 seeds",
                  ">= 2 of 3 seeds", "yes" if solved >= 2 else "NO"))
    _print_lines(lines)
    return ok


def print_comparison(runs: list[Curve]) -> None:
    header = ("map", "algo", "budget", "reached", "episodes to 0.70 (mean)", "per seed",
              "held from (mean)", "first success (mean)", "final success", "wall s (mean)",
              "decisions/episode")
    lines = [header]
    for map_label in dict.fromkeys(c.map_label for c in runs):
        for algo in ("q-learning", "bdi"):
            group = [c for c in runs if c.map_label == map_label and c.config["algo"] == algo]
            reached = [c.reached_at for c in group if c.reached_at is not None]
            held = [c.held_from for c in group if c.held_from is not None]
            finals = [c.final for c in group if c.final is not None]
            firsts = [c.first_success for c in group if c.first_success is not None]
            decisions = [c.decisions for c in group if c.decisions is not None]
            lines.append((
                map_label, algo, budget_of(group[0].config), f"{len(reached)}/{len(group)}",
                f"{statistics.mean(reached):.0f}" if reached else "-",
                " ".join(str(c.reached_at or "-") for c in group),
                f"{statistics.mean(held):.0f} ({len(held)}/{len(group)})" if held else "-",
                f"{statistics.mean(firsts):.0f}" if firsts else "-",
                f"{statistics.mean(finals):.3f}" if finals else "-",
                f"{statistics.mean(c.wall for c in group):.1f}",
                f"{statistics.mean(decisions):.2f}" if decisions else "",
            ))
    _print_lines(lines)
    for c in runs:
        if c.note:
            print(f"  {c.map_label} {c.config['algo']} seed {c.config['seed']}: {c.note}")


def _print_lines(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets: a smoke test")
    parser.add_argument("--only", choices=("table", "compare"), help="one part only")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data folder")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for everything")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="gymbus-learning-")) / "home"
    rows = [] if args.only == "compare" else table_rows(args.quick)
    runs = [] if args.only == "table" else curves(args.quick)
    started = time.monotonic()
    with Stack(stack_env(home)) as stack:
        stack.start()
        follow(Bench(stack), rows, runs, args.timeout)
    ok = True
    if rows:
        print("\nLearning quality (greedy evaluation runs with eval_from, through the stack)\n")
        ok = print_table(rows)
    if runs:
        print(f"\nBDI against Q-learning: episodes until a greedy checkpoint first reaches "
              f"{SUCCESS_TARGET:.2f} success ({len(SEEDS)} seeds)\n")
        print_comparison(runs)
    print(f"\n{time.monotonic() - started:.0f} s in all; data in {home}"
          f"{'' if args.keep else ' (deleted: --keep keeps it)'}")
    if args.json:
        args.json.write_text(json.dumps({"table": [_plain(r) for r in rows],
                                         "compare": [_plain(c) for c in runs]}, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(home.parent, ignore_errors=True)
    return 0 if ok else 1


def _plain(item: Row | Curve) -> dict[str, Any]:
    return {k: v for k, v in vars(item).items() if k != "passes"}


if __name__ == "__main__":
    sys.exit(main())
