"""The ingest under load: eight full-telemetry runs at once through a real stack, with a viewer.

    python bench/ingest_load.py [--steps 100000] [--workers 2] [--slots 4]

A private stack (services/stack/launcher.py) with `--workers` worker processes of `--slots`
slots each runs as many full-telemetry runs at once, FrozenLake-v1 (q-learning) and CartPole-v1
(random) in turn, while a real `gymbus watch --until-done` follows them. Measured:

  lost        frames and step rows missing at the end, from the ingest's accounting (run_stats:
              frames emitted against stored, gaps; ingest_stats: frames lost in failed flushes,
              dead letters), the step rows counted in the store against the steps every run
              took, and the broker's telemetry proxy counters (messages in against out, from its
              log at stop). Must be 0.
  backlog     the most telemetry messages that waited at once in the ingest's receive queue
              (`receive_backlog_max`), and the puts that found it full
  latency     p50/p99 of a step frame's age (now - t0_ns, its oldest row) when a SUB on the
              broker's output sees it, as a viewer does; and p99 of emit to ingest receipt
              (frames.received_at - the frame's ts_ns, from the store)
  ingest      step rows stored per CPU-second of the ingest process (/proc/<pid>/stat), from
              the first submission until every run is stored
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from telemetry_overhead import Watch, cpu_seconds, percentiles, stack_env

from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import TERMINAL_STATES, Command
from gymbus.shared.transport import Client

ENVS = (("FrozenLake-v1", "q-learning"), ("CartPole-v1", "random"))
_PROXY_TOTALS = re.compile(r"telemetry proxy totals: (\{.*\})")


def start_stack(home: Path, workers: int, slots: int) -> tuple[Stack, list[subprocess.Popen[bytes]]]:
    """The stack with its first worker, and the other workers started beside it."""
    stack = Stack({**stack_env(home), "GYMBUS_WORKER_SLOTS": str(slots)})
    stack.start()
    extra = []
    for i in range(1, workers):
        log = open(home / "logs" / f"worker-{i}.log", "ab")  # noqa: SIM115 -- the child's
        extra.append(subprocess.Popen([sys.executable, "-m", "gymbus.worker"],
                                      env=stack.process_env(), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    with Client(stack.settings.controller, "controller") as ctl:
        deadline = time.monotonic() + 60
        while len(ctl.request(Command.LIST_WORKERS)["workers"]) < workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"{workers} workers did not register; logs in {home / 'logs'}")
            time.sleep(0.1)  # polls toward the deadline
    return stack, extra


def submit_all(stack: Stack, count: int, steps: int, seed: int) -> list[str]:
    run_ids = []
    with Client(stack.settings.controller, "controller") as ctl:
        for i in range(count):
            env_id, algo = ENVS[i % len(ENVS)]
            config = {"env": env_id, "algo": algo, "total_steps": steps, "seed": seed + i,
                      "telemetry": "full"}
            run_ids.append(ctl.request(Command.SUBMIT, {
                "config": config, "idempotency_key": uuid.uuid4().hex})["run_id"])
    return run_ids


def wait_stored(stack: Stack, run_ids: list[str], timeout: float,
                answer_s: list[float]) -> dict[str, dict[str, Any]]:
    """Every run ended and complete in the ingest's accounting; its run_stats by run id. The
    seconds each run_stats took (a flush first, then the answer) go to `answer_s`."""
    s = stack.settings
    deadline = time.monotonic() + timeout
    with (Client(s.controller, "controller", timeout=60) as ctl,
          Client(s.ingest, "ingest", timeout=60) as ingest):
        while True:
            states = [ctl.request(Command.GET_RUN, {"run_id": r})["run"]["state"] for r in run_ids]
            t0 = time.perf_counter()
            stats = {r["run_id"]: r for r in ingest.request(Command.RUN_STATS)["runs"]}
            answer_s.append(time.perf_counter() - t0)
            if (all(state in TERMINAL_STATES for state in states)
                    and all(stats.get(r, {}).get("complete") for r in run_ids)):
                return stats
            if time.monotonic() > deadline:
                raise SystemExit(f"runs not stored within {timeout:g} s: {states}; "
                                 f"logs in {s.home / 'logs'}")
            time.sleep(0.2)  # polls toward the deadline


def proxy_totals(log: Path) -> dict[str, int]:
    found = _PROXY_TOTALS.findall(log.read_text(errors="replace"))
    return json.loads(found[-1].replace("'", '"')) if found else {}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="gymbus-load-")) / "home"
    stack, extra = start_stack(home, args.workers, args.slots)
    count = args.workers * args.slots
    result: dict[str, Any] = {"runs": count, "steps": args.steps}
    watcher: subprocess.Popen[bytes] | None = None
    try:
        watch = Watch(stack.settings.telemetry_out)
        ingest_pid = stack.services["ingest"].process.pid
        cpu0, t0 = cpu_seconds(ingest_pid), time.monotonic()
        run_ids = submit_all(stack, count, args.steps, args.seed)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "gymbus.services.cli", "watch", *run_ids, "--until-done",
             "--json"], env=stack.process_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        answers: list[float] = []
        stats = wait_stored(stack, run_ids, args.timeout, answers)
        result["run_stats_max_s"] = max(answers)
        result["run_stats_p50_s"] = sorted(answers)[len(answers) // 2]
        result["run_stats_s"] = answers
        result["seconds"] = time.monotonic() - t0
        result["ingest_cpu_s"] = cpu_seconds(ingest_pid) - cpu0
        result["watch_exit"] = watcher.wait(timeout=60)
        watch.close()
        with Client(stack.settings.ingest, "ingest") as ingest:
            totals = ingest.request(Command.INGEST_STATS)
            rows = ingest.request(Command.QUERY, {"sql": (
                "SELECT (SELECT count(*) FROM steps), (SELECT sum(steps) FROM lifecycle "
                "WHERE event = 'run_completed'), "
                "(SELECT quantile_cont(epoch_us(received_at) - ts_ns // 1000, 0.99) / 1000 "
                "FROM frames WHERE kind = 'step')")})["rows"][0]
        runs = [stats[r] for r in run_ids]
        result["lost_frames"] = sum((r["frames_emitted"] or 0) - r["frames_stored"] for r in runs)
        result["gaps"] = sum(r["gaps"] for r in runs)
        result["steps_stored"], result["steps_taken"], result["store_p99_ms"] = rows
        result["ingest"] = {k: totals[k] for k in (
            "frames_received", "frames_stored", "frames_lost", "dead_letters", "duplicates",
            "receive_backlog_max", "receive_full_waits")}
        result["latency"] = percentiles([a for ages in watch.ages.values() for a in ages])
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        for proc in extra:
            proc.terminate()
            proc.wait(timeout=30)
        stack.stop()
    result["broker_proxy"] = proxy_totals(home / "logs" / "broker.log")
    if not args.keep:
        shutil.rmtree(home.parent, ignore_errors=True)
    return result


def report(r: dict[str, Any]) -> bool:
    ing, lat = r["ingest"], r["latency"]
    lost = (r["lost_frames"] + ing["frames_lost"] + ing["dead_letters"]
            + r["steps_taken"] - r["steps_stored"])
    print(f"ingest_load: {r['runs']} full-telemetry runs of {r['steps']:,} steps at once, "
          f"stored in {r['seconds']:.1f} s; gymbus watch exit {r['watch_exit']}")
    print(f"  lost: {lost} ({r['lost_frames']} frames missing, {ing['frames_lost']} lost in "
          f"flushes, {ing['dead_letters']} dead letters, {r['steps_stored']:,} of "
          f"{r['steps_taken']:,} step rows stored; {r['gaps']} gaps seen, "
          f"{ing['duplicates']} duplicates)")
    print(f"  broker proxy: {r['broker_proxy'] or 'no totals in its log'}")
    print(f"  receive queue: {ing['receive_backlog_max']} messages at most, "
          f"{ing['receive_full_waits']} waits on a full queue")
    print(f"  live latency: p50 {lat.get('frame_p50_ms', 0):.1f} ms, p99 "
          f"{lat.get('frame_p99_ms', 0):.1f} ms (frame at a viewer's SUB); p99 "
          f"{r['store_p99_ms'] or 0:.1f} ms to the ingest's receipt")
    print(f"  run_stats under load (a flush, then the answer): p50 {r['run_stats_p50_s']:.3f} s, "
          f"max {r['run_stats_max_s']:.2f} s")
    print(f"  ingest: {r['steps_stored'] / max(r['ingest_cpu_s'], 1e-9):,.0f} step rows per "
          f"CPU-second ({r['ingest_cpu_s']:.1f} CPU-s)")
    return lost == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="steps of each run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="run slots of each worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack's home and logs")
    args = parser.parse_args(argv)
    result = bench(args)
    ok = report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
