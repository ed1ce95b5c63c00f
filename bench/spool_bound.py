"""How big a long run's spool gets: its largest size on disk against all it wrote.

    python bench/spool_bound.py [--steps 1000000] [--segment-bytes 8388608] [--env FrozenLake-v1]
                                [--baseline]

Starts a private stack (ingest, broker, controller, one worker), submits one q-learning run with
full telemetry and a step budget, and samples the run's spool every 0.1 s until the ingest has
confirmed the run: its size now (every segment on disk), and each segment's largest size seen, whose
sum is what the spool wrote in all. The spool keeps only what the ingest has not confirmed
durable, so its largest size is a few segments (the one being written, the ones waiting for
the ingest's next checkpoint), whatever the run's length: the ratio below is largest / all written.
With --baseline the same run is made again, side by side, with one segment larger than the
run (nothing trimmed, as a spool was before it had segments): the ratio of their times says
what trimming costs. A 10M-step run: `--steps 10000000` (about ten times as long).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.protocol import TERMINAL_STATES, Command
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool

MIB = 2**20
#: a segment no run here fills: the spool is never trimmed (the baseline)
UNTRIMMED = 2**40


def measure(stack: Stack, env_id: str, steps: int) -> dict[str, float]:
    """Run one full-telemetry run and follow its spool until the ingest confirms it."""
    config = {"env": env_id, "algo": "q-learning", "total_steps": steps, "seed": 1,
              "telemetry": "full"}
    with Client(stack.settings.controller, "controller", timeout=10.0) as client:
        run_id = str(client.request(Command.SUBMIT, {"config": config,
                                                     "idempotency_key": ""})["run_id"])
        run_dir = stack.settings.run_dir(run_id)
        started = time.monotonic()
        largest, seen, ended, last_note = 0, dict[int, int](), False, started
        while not spool.is_confirmed(run_dir):
            held = 0
            for first, path in spool.segments(spool.spool_dir(run_dir)):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                held += size
                seen[first] = max(seen.get(first, 0), size)
            largest = max(largest, held)
            if not ended:
                state = client.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"]
                ended = state in {s.value for s in TERMINAL_STATES}
            now = time.monotonic()
            if now - last_note >= 5:
                last_note = now
                print(f"  {now - started:5.0f} s: spool {held / MIB:7.2f} MiB, largest "
                      f"{largest / MIB:7.2f} MiB, written {sum(seen.values()) / MIB:8.1f} MiB",
                      file=sys.stderr)
            if now - started > 4 * 3600:
                raise SystemExit("the run did not end within 4 hours")
            time.sleep(0.1)  # the sampling interval
        elapsed = time.monotonic() - started
    return {"largest": largest, "written": sum(seen.values()), "segments": len(seen),
            "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="the run's step budget")
    parser.add_argument("--segment-bytes", type=int, default=spool.DEFAULT_SEGMENT_BYTES,
                        help="GYMBUS_SPOOL_SEGMENT_BYTES for the run")
    parser.add_argument("--env", default="FrozenLake-v1", help="a toy-text environment id")
    parser.add_argument("--baseline", action="store_true",
                        help="also run once with one segment larger than the run (nothing is "
                             "trimmed, the spool grows whole) and print the speed ratio")
    args = parser.parse_args(argv)
    sizes = [args.segment_bytes] + ([UNTRIMMED] if args.baseline else [])
    got = {size: one_stack(args.env, args.steps, size) for size in sizes}
    for size, m in got.items():
        what = "one segment, untrimmed" if size == UNTRIMMED else f"{size / MIB:g} MiB segments"
        print(f"{args.steps} steps, full telemetry, {what}: spool wrote "
              f"{m['written'] / MIB:.1f} MiB in {m['segments']:.0f} segments; largest on disk "
              f"{m['largest'] / MIB:.2f} MiB ({m['largest'] / max(m['written'], 1):.3f} of it); "
              f"{args.steps / m['seconds']:,.0f} steps/s, {m['seconds']:.1f} s")
    if args.baseline:
        ratio = got[UNTRIMMED]["seconds"] / got[args.segment_bytes]["seconds"]
        print(f"speed with trimming / without: {ratio:.3f} (submit to confirmed, same run)")
    return 0


def one_stack(env_id: str, steps: int, size: int) -> dict[str, float]:
    """`measure` on a fresh private stack whose runs spool in segments of `size` bytes."""
    with tempfile.TemporaryDirectory(prefix="gymbus-spool-bound-") as tmp:
        env = {**free_endpoints(Path(tmp) / "home"), "GYMBUS_WORKER_SLOTS": "1",
               spool.SEGMENT_BYTES_VAR: str(size)}
        with Stack(env) as stack:
            stack.start()
            what = "one segment, untrimmed" if size == UNTRIMMED else f"{size / MIB:g} MiB segments"
            print(f"spool bound: {steps} steps of {env_id}, full telemetry, {what}",
                  file=sys.stderr)
            return measure(stack, env_id, steps)


if __name__ == "__main__":
    sys.exit(main())
