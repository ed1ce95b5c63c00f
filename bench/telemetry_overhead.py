"""What telemetry costs the built-in agents' loop: gymbus fast and full mode against a user's plain loop.

    python bench/telemetry_overhead.py [--steps 500000] [--rounds 5] [--envs FrozenLake-v1,...]

A random policy (`gymbus submit --algo random`), the same seed and the same step budget, per
environment, in five ways that interleave round by round (1,2,3,4,5,1,2,...), after a short
warm-up run that is not counted (Python's bytecode cache: `cache_bytecode`):

  plain  the loop a user writes without gymbus: gym.make, one seeded action_space.sample() per
         step, reset on termination or truncation (a subprocess of this script)
  fast   `--algo random` in gymbus fast mode through a real stack (ingest, broker, controller,
         worker)
  full   the same with full telemetry, timed until the ingest holds every step row
  jsonl  the plain loop with one json.dumps + write + flush per step to a pipe that this
         script drains (the approach gymbus replaces)
  tb     the plain loop logging reward, action and observation per step with
         torch.utils.tensorboard.SummaryWriter.add_scalar (capped at --tb-steps: at ~4k steps/s
         the full budget would take minutes per run; its rate does not change along a run)

Timed intervals: the baselines from building the environment to the end of the loop (writers
closed); gymbus from its run_started frame to run_completed (fast) or to the moment the ingest
reports every frame stored (full), so process start-up, which is the same for every run, is
left out of both and reported apart. Besides wall-clock steps/s, the CPU steps/s of the training
process (its own CPU time, threads included) are shown: they do not move when another process
takes the CPU. Live latency: a SUB on the broker's telemetry output takes each step frame's age
at arrival (now - t0_ns, the frame's first step: its oldest row), and estimates per-row ages by
spreading rows evenly between t0_ns and the frame's build time. Ingest efficiency: step rows
stored per CPU-second of the ingest process (/proc/<pid>/stat), from a full run's submission
until the ingest confirms its spool (the run's checkpoint included); runs do not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import zmq

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared import settings as settings_mod
from gymbus.shared.protocol import TERMINAL_STATES, Command, FrameKind, LifecycleEvent
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool

ENVS = ("FrozenLake-v1", "Taxi-v4", "CliffWalking-v1", "CartPole-v1")
MODES = ("plain", "fast", "full", "jsonl", "tb")
TARGETS = {"fast": 0.98, "full": 0.90}  # of the plain loop's steps/s
FULL_OVER_JSONL, FULL_OVER_TB, LATENCY_P99_MS, INGEST_ROWS_PER_CPU_S = 1.35, 20.0, 250.0, 500_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the baselines, each in a subprocess of its own -------------------------------------------------


def plain_loop(env_id: str, steps: int, seed: int) -> int:
    """A user's random loop, as one writes it without gymbus: one seeded action_space.sample()
    per step, reset on termination or truncation. Returns the episodes begun (a partial last
    one included, as a run counts it)."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    sample, step = env.action_space.sample, env.step
    env.reset(seed=seed)
    episodes = 1
    for _ in range(steps - 1):
        _, _, terminated, truncated, _ = step(sample())
        if terminated or truncated:
            env.reset()
            episodes += 1
    _, _, terminated, truncated, _ = step(sample())
    env.close()
    return episodes


def hooked_loop(env_id: str, steps: int, seed: int, on_step: Any,
                on_episode: Any = None) -> int:
    """The plain loop with a logging hook per step (and per episode, with its return and
    length, as a logger needs them); returns the episodes begun."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    sample, step = env.action_space.sample, env.step
    done = episode = 0
    while done < steps:
        env.reset(seed=seed if episode == 0 else None)
        ret, t, left = 0.0, 0, steps - done
        while True:
            action = sample()
            obs, raw_reward, terminated, truncated, _ = step(action)
            reward = float(raw_reward)
            on_step(episode, t, action, obs, reward, terminated, truncated, done + t)
            ret += reward
            t += 1
            if terminated or truncated or t >= left:
                break
        done += t
        if on_episode is not None:
            on_episode(episode, ret, t, terminated, truncated)
        episode += 1
    env.close()
    return episode


class JsonLines:
    """Per-step JSON lines at their lightest: one json.dumps + write + flush per event, with an
    integer timestamp (formatting an ISO timestamp per line as well makes it ~30% slower)."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.out = run_id, sys.stdout

    def emit(self, event_type: str, **fields: Any) -> None:
        payload = {"type": event_type, "ts_unix_ns": time.time_ns(), "run_id": self.run_id,
                   **fields}
        self.out.write(json.dumps(payload, separators=(",", ":")) + "\n")
        self.out.flush()

    def step(self, episode: int, t: int, action: int, obs: Any, reward: float, terminated: bool,
             truncated: bool, global_step: int) -> None:
        self.emit("step", episode=episode, step_index=t, action=int(action),
                  observation=obs.tolist() if hasattr(obs, "tolist") else obs, reward=reward,
                  terminated=bool(terminated), truncated=bool(truncated), agent_id="agent-0")

    def episode(self, episode: int, ret: float, length: int, terminated: bool,
                truncated: bool, seed: int | None = None, reset_obs: Any = None) -> None:
        self.emit("episode", episode=episode, total_reward=ret, steps=length,
                  terminated=bool(terminated), truncated=bool(truncated), agent_id="agent-0")


def run_baseline(mode: str, env_id: str, steps: int, seed: int) -> dict[str, Any]:
    """One timed baseline run in this process; its numbers as a dict."""
    writer: Any = None
    tb_dir = None
    if mode == "tb":
        from torch.utils.tensorboard import SummaryWriter  # imported before the clock starts

        tb_dir = tempfile.mkdtemp(prefix="gymbus-bench-tb-")
        writer = SummaryWriter(tb_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "plain":
        episodes = plain_loop(env_id, steps, seed)
    elif mode == "jsonl":
        log = JsonLines(str(uuid.uuid4()))
        log.emit("run_started", config={"env": env_id, "seed": seed})
        episodes = hooked_loop(env_id, steps, seed, log.step, log.episode)
        log.emit("run_completed", status="completed", steps=steps, episodes=episodes)
    else:
        add = writer.add_scalar

        def log_step(episode: int, t: int, action: int, obs: Any, reward: float,
                     terminated: bool, truncated: bool, global_step: int) -> None:
            add("step/reward", reward, global_step)
            add("step/action", action, global_step)
            add("step/observation", float(obs if np.ndim(obs) == 0 else obs[0]), global_step)

        episodes = hooked_loop(env_id, steps, seed, log_step)
        writer.close()
    timed = {"steps": steps, "episodes": episodes, "seconds": time.perf_counter() - wall,
             "cpu_seconds": time.process_time() - cpu}
    if tb_dir is not None:
        shutil.rmtree(tb_dir, ignore_errors=True)
    return timed


def baseline_subprocess(mode: str, env_id: str, steps: int, seed: int) -> dict[str, Any]:
    """Run a baseline in a fresh interpreter (as a gymbus run is); JSON lines are drained here."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--baseline", mode, "--envs", env_id, "--steps", str(steps),
           "--seed", str(seed), "--result", str(result_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = sum(1 for _ in proc.stdout)  # type: ignore[union-attr]  # the reader that drains
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline {mode} {env_id} failed:\n{err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result_path.unlink()
    if mode == "jsonl" and lines != steps + result["episodes"] + 2:
        raise AssertionError(f"jsonl: {lines} lines read for {steps} steps: lines were lost")
    return result


# --- gymbus through the stack ---------------------------------------------------------------------


class Watch:
    """A SUB on the broker's telemetry output: lifecycle frames and step-frame latencies by run."""

    def __init__(self, endpoint: str) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        for kind in (FrameKind.STEP, FrameKind.LIFECYCLE):
            self.sock.setsockopt(zmq.SUBSCRIBE, kind.value.encode())
        self.sock.connect(endpoint)
        self.started: dict[str, int] = {}
        self.completed: dict[str, tuple[int, dict[str, Any]]] = {}
        #: run id -> [(age of the oldest row, age of the newest row, rows)] in ns
        self.ages: dict[str, list[tuple[int, int, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            topic, payload = self.sock.recv_multipart()
            now = time.time_ns()
            if topic.startswith(FrameKind.STEP.value.encode()):
                run_id, ts_ns, t0_ns, rows = step_times(payload)
                self.ages.setdefault(run_id, []).append((now - t0_ns, now - ts_ns, rows))
                continue
            frame = msgpack.unpackb(payload, raw=False)
            body = frame["body"]
            if body["event"] == LifecycleEvent.RUN_STARTED.value:
                self.started[frame["run_id"]] = frame["ts_ns"]
            elif body["event"] == LifecycleEvent.RUN_COMPLETED.value:
                self.completed[frame["run_id"]] = (frame["ts_ns"], body)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()


def step_times(payload: bytes) -> tuple[str, int, int, int]:
    """run_id, ts_ns, t0_ns and rows of a step frame, skipping its columns unbuilt (the watcher
    shares the machine with what it measures: a full decode costs ~5x more)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    head: dict[str, Any] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key != "body":
            head[key] = unpacker.unpack()
            continue
        for _ in range(unpacker.read_map_header()):
            name = unpacker.unpack()
            if name == "t0_ns":
                head["t0_ns"] = unpacker.unpack()
            elif name == "step":  # a typed array (docs/protocol.md), or a list
                column = unpacker.unpack()
                head["rows"] = column["shape"][0] if isinstance(column, dict) else len(column)
            else:
                unpacker.skip()
    return head["run_id"], head["ts_ns"], head["t0_ns"], head["rows"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_gymbus(stack: Stack, watch: Watch, mode: str, env_id: str, steps: int,
               seed: int) -> dict[str, Any]:
    """Submit one run, wait for it, time it, and check that nothing was lost."""
    s = stack.settings
    ingest_pid = stack.services["ingest"].process.pid
    config = {"env": env_id, "algo": "random", "total_steps": steps, "seed": seed, "telemetry": mode}
    with Client(s.controller, "controller") as ctl, Client(s.ingest, "ingest") as ingest:
        cpu0, submitted = cpu_seconds(ingest_pid), time.time_ns()
        run_id = ctl.request(Command.SUBMIT, {"config": config,
                                              "idempotency_key": uuid.uuid4().hex})["run_id"]
        deadline = time.monotonic() + 600
        while run_id not in watch.completed:
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not complete; see {s.home / 'logs'}")
            time.sleep(0.001)  # bench polling, bounded by the deadline: 1 ms, so that the
            # wait adds ~1 ms to a full run's timing, not ~10
        end_ns, body = watch.completed[run_id]
        while True:  # the ingest flushes before answering run_stats
            stats = ingest.request(Command.RUN_STATS, {"run_id": run_id})["runs"][0]
            if stats["complete"] or time.monotonic() > deadline:
                break
            time.sleep(0.01)  # each request makes the ingest flush: not more often than this
        if mode == "full":
            end_ns = time.time_ns()
        while ctl.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"] not in TERMINAL_STATES:
            time.sleep(0.02)
        # the ingest's work for a run ends when it confirms the run's spool, after the checkpoint
        # that moves the run from the write-ahead log into the file: wait for it, so that the
        # ingest's CPU time holds all of this run's work and none of the next run's
        while not spool.is_confirmed(s.run_dir(run_id)) and time.monotonic() < deadline:
            time.sleep(0.02)
        cpu1 = cpu_seconds(ingest_pid)
    if body["status"] != "completed" or not stats["complete"] or stats["gaps"]:
        raise AssertionError(f"{mode} run {run_id}: {body['status']}, stats {stats}")
    expected_rows = body["steps"] if mode == "full" else 0
    if body["steps"] != steps or stats["steps"] != expected_rows:
        raise AssertionError(f"{mode} run {run_id}: {stats['steps']} step rows stored for "
                             f"{body['steps']} steps taken (expected {expected_rows})")
    result = json.loads((s.run_dir(run_id) / "result.json").read_text())
    seconds = (end_ns - watch.started[run_id]) / 1e9
    return {"steps": steps, "episodes": body["episodes"], "seconds": seconds,
            "cpu_seconds": result.get("train_cpu_s"), "run_id": run_id,
            "startup_s": (watch.started[run_id] - submitted) / 1e9,
            "ingest_cpu_s": cpu1 - cpu0, "step_rows": stats["steps"]}


# --- the report -----------------------------------------------------------------------------------


def percentiles(ages: list[tuple[int, int, int]]) -> dict[str, float]:
    """p50/p99 of the oldest row per frame, and of every row (spread from oldest to newest)."""
    if not ages:
        return {}
    oldest = np.array([a[0] for a in ages]) / 1e6
    rows = np.concatenate([np.linspace(a[0], a[1], a[2]) for a in ages]) / 1e6
    return {"frame_p50_ms": float(np.percentile(oldest, 50)),
            "frame_p99_ms": float(np.percentile(oldest, 99)),
            "row_p50_ms": float(np.percentile(rows, 50)),
            "row_p99_ms": float(np.percentile(rows, 99)), "frames": len(ages)}


def summarize(env_id: str, runs: dict[str, list[dict[str, Any]]],
              watch: Watch) -> dict[str, Any]:
    rate = {m: statistics.median(r["steps"] / r["seconds"] for r in rs) for m, rs in runs.items()}
    cpu_rate = {m: statistics.median(r["steps"] / r["cpu_seconds"] for r in rs
                                     if r.get("cpu_seconds")) for m, rs in runs.items()}
    ages = [a for r in runs["full"] for a in watch.ages.get(r["run_id"], [])]
    ingest = [r["step_rows"] / r["ingest_cpu_s"] for r in runs["full"] if r["ingest_cpu_s"] > 0]
    return {"env": env_id, "steps_per_s": rate, "cpu_steps_per_s": cpu_rate,
            "ratio": {m: rate[m] / rate["plain"] for m in rate},
            "cpu_ratio": {m: cpu_rate[m] / cpu_rate["plain"] for m in cpu_rate},
            "latency": percentiles(ages),
            "ingest_rows_per_cpu_s": statistics.median(ingest) if ingest else None,
            "startup_s": statistics.median(r["startup_s"] for r in runs["fast"] + runs["full"]),
            "episodes": {m: sorted({r["episodes"] for r in rs}) for m, rs in runs.items()},
            "runs": runs}


def print_summary(s: dict[str, Any]) -> list[str]:
    """Print one environment's table; returns the targets it misses."""
    print(f"\n{s['env']}  (median of {len(s['runs']['plain'])} rounds; startup of a gymbus run "
          f"{s['startup_s']:.2f} s, not timed)")
    print(f"  {'mode':6} {'steps/s':>10} {'x plain':>7} {'cpu steps/s':>12} {'x plain':>7}")
    for m in MODES:
        print(f"  {m:6} {s['steps_per_s'][m]:10.0f} {s['ratio'][m]:7.3f} "
              f"{s['cpu_steps_per_s'][m]:12.0f} {s['cpu_ratio'][m]:7.3f}")
    lat, rate = s["latency"], s["steps_per_s"]
    print(f"  live latency: oldest row per frame p50 {lat['frame_p50_ms']:.1f} ms, p99 "
          f"{lat['frame_p99_ms']:.1f} ms; per row p50 {lat['row_p50_ms']:.1f} ms, p99 "
          f"{lat['row_p99_ms']:.1f} ms ({lat['frames']} frames)")
    print(f"  ingest: {s['ingest_rows_per_cpu_s']:,.0f} step rows per CPU-second; full is "
          f"{rate['full'] / rate['jsonl']:.2f}x jsonl, {rate['full'] / rate['tb']:.1f}x tb")
    checks = [(s["ratio"]["fast"] >= TARGETS["fast"], f"fast {s['ratio']['fast']:.3f} < {TARGETS['fast']}"),
              (s["ratio"]["full"] >= TARGETS["full"], f"full {s['ratio']['full']:.3f} < {TARGETS['full']}"),
              (rate["full"] >= FULL_OVER_JSONL * rate["jsonl"], "full < 1.35x jsonl"),
              (rate["full"] >= FULL_OVER_TB * rate["tb"], "full < 20x tb"),
              (lat["frame_p99_ms"] <= LATENCY_P99_MS, "latency p99 > 250 ms"),
              ((s["ingest_rows_per_cpu_s"] or 0) >= INGEST_ROWS_PER_CPU_S, "ingest < 500k rows/CPU-s")]
    missed = [f"{s['env']}: {text}" for ok, text in checks if not ok]
    print("  targets: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))
    return missed


def stack_env(home: Path) -> dict[str, str]:
    """Free loopback ports for every endpoint setting, one run slot."""
    import socket

    env = {**free_endpoints(home), "GYMBUS_WORKER_SLOTS": "1"}
    for name, default in settings_mod.DEFAULTS.items():
        var = settings_mod.PREFIX + name.upper()
        if isinstance(default, str) and default.startswith("tcp://") and var not in env:
            with socket.socket() as s:  # an endpoint free_endpoints does not know (yet)
                s.bind(("127.0.0.1", 0))
                env[var] = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return env


def cache_bytecode(folder: Path) -> None:
    """Have every process the bench starts write and read bytecode, in `folder`, as a user's
    Python does: with PYTHONDONTWRITEBYTECODE set (this machine sets it), every run would
    compile gymbus's modules again, ~10 ms of a recorded run's timed start. Its empty value
    unsets it for the children (Python reads it as set only when it is not empty). The first
    runs compile; each bench warms the cache before its rounds."""
    os.environ.update(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(folder / "pycache"))


def bench(args: argparse.Namespace) -> int:
    envs = args.envs.split(",")
    home = Path(tempfile.mkdtemp(prefix="gymbus-bench-"))
    cache_bytecode(home)
    stack = Stack(stack_env(home / "home"))
    runs = {e: {m: [] for m in MODES} for e in envs}
    print(f"telemetry overhead: {args.steps} steps per run ({args.tb_steps} for tb), "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs, stack in {home}", flush=True)
    try:
        stack.start()
        watch = Watch(stack.settings.telemetry_out)
        for env_id in envs:  # warm-up, not counted: the bytecode cache, the stack's first run
            run_gymbus(stack, watch, "full", env_id, 1000, args.seed)
            baseline_subprocess("plain", env_id, 1000, args.seed)
        for rnd in range(args.rounds):
            for env_id in envs:
                for mode in MODES:
                    steps = args.tb_steps if mode == "tb" else args.steps
                    if mode in ("fast", "full"):
                        r = run_gymbus(stack, watch, mode, env_id, steps, args.seed)
                    else:
                        r = baseline_subprocess(mode, env_id, steps, args.seed)
                    runs[env_id][mode].append(r)
                    print(f"  round {rnd + 1} {env_id:16} {mode:5} {steps / r['seconds']:9.0f} "
                          f"steps/s ({r['seconds']:.2f} s)", flush=True)
        summaries = [summarize(e, runs[e], watch) for e in envs]
        watch.close()
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    missed = [m for s in summaries for m in print_summary(s)]
    for s in summaries:  # the same work: every mode ran the same episodes
        same = {m: s["episodes"][m] for m in ("plain", "fast", "full", "jsonl")}
        if len({tuple(v) for v in same.values()}) != 1:
            print(f"warning: {s['env']}: episodes differ between modes: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2, default=str))
    return 1 if (missed and args.strict) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500_000)
    parser.add_argument("--tb-steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder (its store)")
    parser.add_argument("--baseline", choices=("plain", "jsonl", "tb"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        result = run_baseline(args.baseline, args.envs, args.steps, args.seed)
        Path(args.result).write_text(json.dumps(result))
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
