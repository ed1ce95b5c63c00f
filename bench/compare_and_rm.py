"""`gymbus compare` on 15 runs and `gymbus rm` of a run of a million step rows, through a real
stack (broker, controller, ingest; no worker: the runs' frames are published straight to the
broker, as a run child would, so that making them takes seconds).

Prints, side by side in one run:
- compare: its wall time against a baseline CLI call (`gymbus runs --json`, the cost of any
  command that asks the services), and each configuration's IQM with its 95% interval next to
  rliable's, computed here from the same scores with the same seed;
- rm: its wall time against storing the same rows (the ingest's write of them), and the DuckDB
  file's size before and after, each measured after a checkpoint (the ingest checkpoints when
  it stops).

    .venv/bin/python bench/compare_and_rm.py [--episodes 1000] [--step-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.codec import encode_frame
from gymbus.shared.protocol import Command, FrameKind
from gymbus.shared.transport import Client

GROUP = "bench-compare"
#: the three configurations: how fast each learns and where it ends
CONFIGS = {0.5: (0.004, 0.9), 0.1: (0.002, 0.7), 0.01: (0.0005, 0.4)}
SEEDS = 5
STEP_FRAME_ROWS = 10_000


def cli(stack: Stack, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args],
                            env=stack.process_env(), capture_output=True, text=True,
                            timeout=600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"gymbus {' '.join(args)} failed: {result.stderr}{result.stdout}")
    return time.perf_counter() - started, result


class Feeder:
    """Publishes whole runs to the broker's telemetry input, and resends what the ingest
    reports missing until it holds each run complete."""

    def __init__(self, stack: Stack) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.connect(stack.settings.telemetry_in)
        self.ingest = Client(stack.settings.ingest, "ingest", 30.0)
        self.frames: dict[str, list[tuple[bytes, bytes]]] = {}
        time.sleep(1.0)  # the broker's XSUB joins the new publisher (bench only)

    def add(self, run_id: str, bodies: list[tuple[FrameKind, dict[str, Any]]]) -> None:
        parts = [encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="bench")
                 for seq, (kind, body) in enumerate(bodies)]
        self.frames[run_id] = parts
        for topic, payload in parts:
            self.pub.send_multipart([topic, payload])

    def wait_complete(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.frames)
        while waiting:
            if time.monotonic() > deadline:
                raise SystemExit(f"the ingest did not store {sorted(waiting)} in {timeout} s")
            for run_id in sorted(waiting):
                parts = self.frames[run_id]
                answer = self.ingest.request(Command.SPOOL_STATUS,
                                             {"run_id": run_id, "frames": len(parts)})
                if answer["complete"]:
                    waiting.discard(run_id)
                    continue
                for first, last in answer["missing"]:
                    for seq in range(first, last + 1):
                        self.pub.send_multipart(list(parts[seq]))
            time.sleep(0.5)  # polls the ingest toward the deadline above

    def close(self) -> None:
        self.ingest.close()
        self.pub.close(linger=1000)
        self.ctx.term()


def lifecycle(config: dict[str, Any], frames_after: int) -> tuple[
        tuple[FrameKind, dict[str, Any]], tuple[FrameKind, dict[str, Any]]]:
    started = (FrameKind.LIFECYCLE, {"event": "run_started", "config": config})
    ended = (FrameKind.LIFECYCLE, {"event": "run_completed", "status": "completed",
                                   "frames_emitted": frames_after + 2, "reason": None})
    return started, ended


def learning_run(lr: float, seed: int, episodes: int) -> list[tuple[FrameKind, dict[str, Any]]]:
    """A run whose returns rise like a learner's, with seed noise; episodes in frames of 100."""
    rate, top = CONFIGS[lr]
    rng = np.random.default_rng(seed * 100 + int(lr * 1000))
    lengths = rng.integers(5, 40, episodes)
    steps = np.cumsum(lengths)
    returns = top * (1 - np.exp(-rate * steps / 10)) + rng.normal(0, 0.15, episodes) \
        + rng.normal(0, 0.05)
    config = {"env": "FrozenLake-v1", "algo": "q-learning", "seed": seed, "group": GROUP,
              "episodes": episodes, "agent": {"learning_rate": lr}, "telemetry": "fast"}
    now = time.time_ns()
    bodies = []
    for lo in range(0, episodes, 100):
        hi = min(episodes, lo + 100)
        bodies.append((FrameKind.EPISODE, {
            "episode": list(range(lo, hi)), "return": returns[lo:hi].tolist(),
            "length": lengths[lo:hi].tolist(), "terminated": [True] * (hi - lo),
            "truncated": [False] * (hi - lo), "ts_ns": [now + i for i in range(lo, hi)]}))
    started, ended = lifecycle(config, len(bodies))
    return [started, *bodies, ended]


def big_run(rows: int) -> list[tuple[FrameKind, dict[str, Any]]]:
    """A run of `rows` step rows in frames of STEP_FRAME_ROWS."""
    config = {"env": "FrozenLake-v1", "algo": "random", "seed": 0, "telemetry": "full"}
    bodies = []
    for lo in range(0, rows, STEP_FRAME_ROWS):
        n = min(STEP_FRAME_ROWS, rows - lo)
        idx = np.arange(lo, lo + n)
        bodies.append((FrameKind.STEP, {
            "episode": (idx // 20).tolist(), "step": (idx % 20).tolist(),
            "action": (idx % 4).tolist(), "obs": (idx % 16).tolist(),
            "reward": [0.0] * n, "terminated": ((idx % 20) == 19).tolist(),
            "truncated": [False] * n}))
    started, ended = lifecycle(config, len(bodies))
    return [started, *bodies, ended]


def checkpointed_size(stack: Stack) -> tuple[int, str]:
    """The DuckDB file's size after the ingest's checkpoint at stop (then it starts again),
    and its blocks in use and free as DuckDB counts them."""
    stack.stop_one("ingest")
    size = stack.settings.db_path.stat().st_size
    stack.start_one("ingest")
    stack.wait_ready(("ingest",), 60)
    _, result = cli(stack, "query", "--json", "SELECT used_blocks, free_blocks, block_size "
                    "FROM pragma_database_size()")
    blocks = json.loads(result.stdout)[0]
    used = blocks["used_blocks"] * blocks["block_size"] / 2**20
    free = blocks["free_blocks"] * blocks["block_size"] / 2**20
    return size, f"{used:.1f} MiB in use, {free:.1f} MiB free"


def rliable_iqm(scores: dict[str, np.ndarray], reps: int, seed: int) -> dict[str, Any]:
    from rliable import library as rly
    from rliable import metrics

    np.random.seed(seed)
    points, intervals = rly.get_interval_estimates(
        scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    return {k: (float(points[k][0]), float(intervals[k][0][0]), float(intervals[k][1][0]))
            for k in scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per compared run")
    parser.add_argument("--step-rows", type=int, default=1_000_000, help="rows of the big run")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            Stack(free_endpoints(Path(tmp) / "home")) as stack:
        stack.start(("broker", "controller", "ingest"))
        feeder = Feeder(stack)
        run_ids: dict[str, tuple[float, int]] = {}
        for lr in CONFIGS:
            for seed in range(SEEDS):
                run_id = f"bench-lr{lr}-s{seed}"
                feeder.add(run_id, learning_run(lr, seed, args.episodes))
                run_ids[run_id] = (lr, seed)
        feeder.wait_complete()
        print(f"compare: {len(run_ids)} runs ({len(CONFIGS)} configurations x {SEEDS} seeds, "
              f"{args.episodes} episodes each)", file=sys.stderr)

        base_s, _ = cli(stack, "runs", "--json")
        compare_s, result = cli(stack, "compare", GROUP, "--json", "--reps", str(args.reps))
        compared = json.loads(result.stdout)
        rows = json.loads(cli(stack, "query", "--json", "SELECT run_id, \"return\" FROM "
                              "episodes ORDER BY run_id, ts, seq, episode")[1].stdout)
        returns: dict[str, list[float]] = {}
        for row in rows:
            returns.setdefault(row["run_id"], []).append(row["return"])
        scores = {c["label"]: np.array([[np.mean(returns[r["run_id"]][-100:])]
                                        for r in c["runs"]])
                  for c in compared["configurations"]}
        reference = rliable_iqm(scores, args.reps, compared["seed"])

        print(f"\n{'gymbus compare ' + GROUP:<34} {compare_s:7.2f} s")
        print(f"{'gymbus runs --json (baseline)':<34} {base_s:7.2f} s   ratio "
              f"{compare_s / base_s:.2f}")
        print(f"\n{'CONF':<6}{'CONFIG':<26}{'IQM gymbus [95% CI]':<26}{'IQM rliable [95% CI]'}")
        for conf in compared["configurations"]:
            iqm = conf["final"]["iqm"]
            ref = reference[conf["label"]]
            print(f"{conf['label']:<6}{conf['describe']:<26}"
                  f"{iqm['value']:.4f} [{iqm['low']:.4f}, {iqm['high']:.4f}]  "
                  f"{ref[0]:.4f} [{ref[1]:.4f}, {ref[2]:.4f}]")

        print(f"\nrm: a run of {args.step_rows:,} step rows", file=sys.stderr)
        started = time.perf_counter()
        feeder.add("bench-big", big_run(args.step_rows))
        feeder.wait_complete()
        store_s = time.perf_counter() - started
        before, before_blocks = checkpointed_size(stack)
        rm_s, removed = cli(stack, "rm", "bench-big", "--yes", "--json")
        deleted = json.loads(removed.stdout)[0]["rows"]
        after, after_blocks = checkpointed_size(stack)
        left = json.loads(cli(stack, "query", "--json",
                              "SELECT count(*) AS n FROM steps")[1].stdout)[0]["n"]
        # the same rows once more: do they take the space the deleted ones left?
        feeder.ingest.close()
        feeder.ingest = Client(stack.settings.ingest, "ingest", 30.0)
        feeder.frames.clear()
        feeder.add("bench-big-again", big_run(args.step_rows))
        feeder.wait_complete()
        feeder.close()
        again, again_blocks = checkpointed_size(stack)
        print(f"\n{'gymbus rm (1 run, ' + str(deleted['steps']) + ' step rows)':<40} "
              f"{rm_s:7.2f} s")
        print(f"{'storing the same frames (baseline)':<40} {store_s:7.2f} s   ratio "
              f"{rm_s / store_s:.2f}")
        print(f"{'DuckDB file after checkpoint, before':<40} {before / 2**20:7.1f} MiB   "
              f"({before_blocks})")
        print(f"{'DuckDB file after checkpoint, after rm':<40} {after / 2**20:7.1f} MiB   "
              f"({after_blocks}; {left} step rows left)")
        print(f"{'... after storing the same rows again':<40} {again / 2**20:7.1f} MiB   "
              f"({again_blocks})")


if __name__ == "__main__":
    main()
