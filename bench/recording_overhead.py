"""What `run.record(env)` costs a user's own loop, against the same loop bare and its peers.

    python bench/recording_overhead.py [--rounds 5] [--steps 200000] [--cases cartpole,sb3]

Each case is a user's script, run in ways that interleave round by round (bare, full, fast,
bare, full, fast, ...), each in a fresh interpreter that imports the same modules before its
clock starts, against one private stack (ingest, broker, controller), after one short warm-up
run of each that is not counted (Python's bytecode cache, as a user's: `cache_bytecode`):

  cartpole  CartPole-v1, random policy (`env.action_space.sample()`): bare, recorded with
            `telemetry="full"` and `"fast"`, with Minari's `DataCollector` (until its dataset
            is written) and with wandb offline (one `wandb.log` of reward and action a step)
  vector    an 8-env SyncVectorEnv of CartPole-v1, bare and recorded
  sb3       Stable-Baselines3 PPO on 4 CartPole-v1 envs, same seed and budget, alone and
            recorded (`make_vec_env(..., wrapper_class=run.record)` + `GymbusCallback(run)`);
            torch on one thread in both (see bench/recording_workloads.py)
  pendulum  Pendulum-v1 (continuous actions and observations), bare and recorded
  pixels    a custom env of 64x64x3 uint8 observations: bare, recorded (pixels are not stored
            by default) and recorded with `store_large_obs=True`

Timed: a recorded run from before `gymbus.run()` to after its `with` block (which flushes and
waits for the ingest to hold every frame; the checkpoint that frees its spool follows on a
thread, which the script's exit waits for: printed apart, not timed), a bare one from making
its env to closing it, a peer from wrapping or `wandb.init` to its dataset written or
`run.finish()`. The loop alone is timed apart, and so is the training process's CPU time
(threads included; the stack's and wandb's service processes not). A variant that runs fewer steps (the peers, stored pixels: their rates
are steady) has its whole rate projected to bare's steps (its start and end, then that many
steps at its loop's rate), so that its fixed costs weigh as much as gymbus's. Bytes per step:
growth of the DuckDB file's blocks in use over a recorded run, once the ingest has checkpointed
it. Every recorded run is checked against the ingest: a step row missing (or, in fast mode, one
stored) is reported and makes the script exit 1 after its tables. Medians over rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recording_workloads import CASES, NEEDS, RECORDED, VECTOR_ENVS

#: steps of each variant's warm-up run (a multiple of VECTOR_ENVS)
WARM_UP_STEPS = 1024
#: variants run after every round of the others (see `bench`)
LAST = ("full+pixels",)
from telemetry_overhead import cache_bytecode, cpu_seconds, stack_env

from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import Command
from gymbus.shared.transport import Client

#: (case, variant, against, at least): variant's whole steps/s over `against`'s
TARGETS = [("cartpole", "full", "bare", 0.85), ("cartpole", "fast", "bare", 0.98),
           ("cartpole", "full", "minari", 20.0), ("cartpole", "full", "wandb", 20.0),
           ("vector", "full", "bare", 0.95), ("sb3", "full", "bare", 0.97)]
SKIPPED = "skipped: pip install -e '.[bench]'"
WORKLOADS = Path(__file__).with_name("recording_workloads.py")


def missing(variant: str, case: str) -> bool:
    return any(importlib.util.find_spec(m) is None
               for m in NEEDS.get(variant, ()) + NEEDS.get(case, ()))


def store_bytes(stack: Stack) -> int:
    """Bytes of the store's blocks in use (its free blocks, which DuckDB reuses, left out)."""
    with Client(stack.settings.ingest, "ingest") as ingest:
        reply = ingest.request(Command.QUERY, {
            "sql": "SELECT used_blocks * block_size FROM pragma_database_size()"})
    return int(reply["rows"][0][0])


def quiesce(stack: Stack, timeout: float = 300.0) -> None:
    """Wait until the ingest has written everything sent to it (nothing queued or buffered,
    nothing arriving for half a second), so that no run is timed against the last one's backlog
    (a stored pixel run is ~0.5 GB of frames)."""
    deadline = time.monotonic() + timeout
    last = -1
    with Client(stack.settings.ingest, "ingest") as ingest:
        while time.monotonic() < deadline:
            stats = ingest.request(Command.INGEST_STATS, {})
            idle = stats.get("receive_backlog", 0) == 0 and stats.get("pending", 0) == 0
            if idle and stats.get("received") == last:
                return
            last = stats.get("received", 0)
            time.sleep(0.5)  # bench polling, bounded by the deadline


def run_child(stack: Stack, case: str, variant: str, steps: int, seed: int,
              scratch: Path) -> dict[str, Any]:
    """One run in a fresh interpreter with the stack's variables, once the ingest is idle;
    checked against the ingest."""
    quiesce(stack)
    result_path = scratch / f"result-{case}-{variant}.json"
    env = stack.process_env({"MINARI_DATASETS_PATH": str(scratch / "minari"),
                             "WANDB_DIR": str(scratch), "WANDB_SILENT": "true",
                             "WANDB_MODE": "offline"})
    ingest_pid = stack.services["ingest"].process.pid
    before, stack_cpu = store_bytes(stack) if variant in RECORDED else 0, cpu_seconds(ingest_pid)
    proc = subprocess.run([sys.executable, str(WORKLOADS), case, variant, str(steps), str(seed),
                           str(result_path)], env=env, capture_output=True, text=True,
                          check=False, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} {variant} failed:\n{proc.stderr[-3000:]}")
    r: dict[str, Any] = json.loads(result_path.read_text())
    if "run_id" in r:
        r["problems"] = check_stored(stack, case, variant, r)
        r["stored_bytes"] = store_bytes(stack) - before
        r["ingest_cpu_s"] = cpu_seconds(ingest_pid) - stack_cpu
    return r


def check_stored(stack: Stack, case: str, variant: str, r: dict[str, Any]) -> list[str]:
    """What the ingest misses of a recorded run, once it holds the run in its main file (a
    final spool_status, as the spool's repair asks, checkpoints it: its bytes are counted)."""
    want = 0 if variant == "fast" else r["recorded"]
    # a vector env's autoreset calls are not steps; every other step is one row
    lost = variant != "fast" and case != "vector" and r["recorded"] != r["steps"]
    deadline = time.monotonic() + 30
    with Client(stack.settings.ingest, "ingest") as ingest:
        while True:  # an unconfirmed run's last frames may still be on their way
            stats = ingest.request(Command.RUN_STATS, {"run_id": r["run_id"]})["runs"][0]
            durable = stats["complete"] and ingest.request(Command.SPOOL_STATUS, {
                "run_id": r["run_id"], "frames": stats["frames_emitted"], "final": True,
            })["complete"]
            emitted = stats["frames_emitted"]
            holes = emitted is not None and stats["last_seq"] == emitted - 1 and stats["gaps"]
            if durable or holes or time.monotonic() > deadline:  # holes: refused, for good
                break
            time.sleep(0.05)  # bench polling, bounded by the deadline
    return [text for bad, text in (
        (r["offline"], "recorded offline: no controller answered"),
        (lost, f"{r['recorded']} of {r['steps']} steps recorded"),
        (not stats["complete"] or stats["gaps"] or stats["steps"] != want,
         f"{stats['steps']} of {want} step rows stored ({stats['gaps']} gaps)"))
        if bad]


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r["steps"] / r[key] for r in runs))


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median rates per variant; the whole rate of one that ran fewer steps than bare (a peer,
    stored pixels) also projected to bare's steps."""
    out: dict[str, Any] = {}
    projected_steps = runs["bare"][0]["steps"]
    for variant, rs in runs.items():
        if not rs:
            continue
        s = {"steps_per_s": median(rs, "seconds"), "loop_steps_per_s": median(rs, "loop_seconds"),
             "cpu_steps_per_s": median(rs, "cpu_seconds"),
             "loop_cpu_steps_per_s": median(rs, "loop_cpu_seconds"),
             "end_s": statistics.median(r["seconds"] - r["loop_seconds"] for r in rs),
             "steps": rs[0]["steps"], "runs": rs}
        if "stored_bytes" in rs[0]:
            s["bytes_per_step"] = statistics.median(r["stored_bytes"] / r["steps"] for r in rs)
        if s["steps"] < projected_steps:
            s["projected_steps_per_s"] = statistics.median(run_rate(r, projected_steps)
                                                           for r in rs)
        out[variant] = s
    return out


def whole_rate(s: dict[str, Any]) -> float:
    return float(s.get("projected_steps_per_s", s["steps_per_s"]))


def run_rate(r: dict[str, Any], steps: int) -> float:
    """One run's whole rate, projected to `steps` if it ran fewer: its start and end, then
    `steps` at its loop's rate."""
    if r["steps"] >= steps:
        return float(r["steps"] / r["seconds"])
    return steps / (r["seconds"] - r["loop_seconds"] + steps * r["loop_seconds"] / r["steps"])


def round_ratios(variant: dict[str, Any], against: dict[str, Any]) -> list[float]:
    """The variant's whole rate over `against`'s, round by round (runs of one round ran one
    after the other): their spread says how far the machine moved the medians."""
    steps = max(variant["runs"][0]["steps"], against["runs"][0]["steps"])
    return [run_rate(v, steps) / run_rate(a, steps)
            for v, a in zip(variant["runs"], against["runs"], strict=False)]


def print_case(case: str, s: dict[str, Any], skipped: list[str]) -> list[str]:
    """Print one case's table and its verdicts; returns the targets it misses."""
    bare = s["bare"]
    print(f"\n{case}  (medians of {len(bare['runs'])} rounds; x: over bare; +s: timed beyond "
          "the loop)")
    print(f"  {'variant':11} {'steps/s':>9} {'x':>6} {'loop/s':>9} {'x':>6} {'cpu/s':>9} "
          f"{'x':>6} {'+s':>5} {'B/step':>7}")
    for variant, v in s.items():
        bps = (f"{'':7}" if "bytes_per_step" not in v else f"{'n/a':>7}"
               if v["bytes_per_step"] < 0 else f"{v['bytes_per_step']:7.0f}")
        print(f"  {variant:11} {whole_rate(v):9.0f} {whole_rate(v) / whole_rate(bare):6.3f} "
              f"{v['loop_steps_per_s']:9.0f} "
              f"{v['loop_steps_per_s'] / bare['loop_steps_per_s']:6.3f} "
              f"{v['cpu_steps_per_s']:9.0f} {v['cpu_steps_per_s'] / bare['cpu_steps_per_s']:6.3f} "
              f"{v['end_s']:5.2f} {bps}")
    for variant in skipped:
        print(f"  {variant:11} {SKIPPED}")
    if any(v.get("bytes_per_step", 0) < 0 for v in s.values()):
        print("  n/a: the store's blocks in use shrank over the run (DuckDB compacts and "
              "reuses\n  blocks at its checkpoints): the run's rows took too little room to show")
    for variant, v in s.items():
        if "projected_steps_per_s" in v:
            print(f"  {variant}: ran {v['steps']} steps; its steps/s projected to {bare['steps']}")
    ended = [r for v in s.values() for r in v["runs"] if "confirmed" in r]
    waits = {variant: statistics.median(r["confirm_s"] for r in v["runs"])
             for variant, v in s.items() if v["runs"] and "confirm_s" in v["runs"][0]}
    if waits:
        print("  spool freed after the block (untimed; the exit waits): " +
              ", ".join(f"{variant} {w:.2f} s" for variant, w in waits.items()))
    if any(not r["confirmed"] for r in ended):
        print(f"  spools not freed 120 s after the block: {sum(not r['confirmed'] for r in ended)} "
              f"of {len(ended)} recorded runs")
    if case == "sb3" and "full" in s:
        same = {v["runs"][0].get("ep_rew_mean") for v in s.values()}
        print(f"  same returns with and without gymbus: {'yes' if len(same) == 1 else same}")
    missed = []
    for c, variant, against, target in TARGETS:
        if c != case or variant not in s or against not in s:
            continue
        ratio = whole_rate(s[variant]) / whole_rate(s[against])
        cpu = s[variant]["cpu_steps_per_s"] / s[against]["cpu_steps_per_s"]
        ok = ratio >= target
        rounds = round_ratios(s[variant], s[against])
        print(f"  target {variant} >= {target:g}x {against}: {ratio:.3f}x (cpu {cpu:.3f}x; "
              f"rounds {min(rounds):.3f}-{max(rounds):.3f}) {'met' if ok else 'MISSED'}")
        if not ok:
            missed.append(f"{case}: {variant} {ratio:.3f}x {against} < {target:g}x")
    return missed


def bench(args: argparse.Namespace) -> int:
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(sorted(unknown))}; cases: "
                         f"{', '.join(CASES)}")
    scratch = Path(tempfile.mkdtemp(prefix="gymbus-bench-rec-"))
    steps: dict[str, int] = dict.fromkeys(CASES, args.steps)
    steps.update(vector=args.steps // VECTOR_ENVS * VECTOR_ENVS, sb3=args.sb3_steps)
    capped: dict[str, int] = {"minari": args.peer_steps, "wandb": args.peer_steps,
                              "full+pixels": args.pixel_steps}
    plan = {c: [v for v in CASES[c] if not missing(v, c)] for c in cases}
    skipped = {c: [v for v in CASES[c] if v not in plan[c]] for c in cases}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {v: [] for v in plan[c]} for c in cases}
    print(f"recording overhead: {args.rounds} rounds, {args.steps} steps ({args.peer_steps} for "
          f"peers,\n  {args.sb3_steps} sb3, {args.pixel_steps} stored pixels), "
          f"{os.cpu_count()} CPUs, in {scratch}", flush=True)
    cache_bytecode(scratch)
    stack = Stack(stack_env(scratch / "home"))
    try:
        stack.start(("ingest", "broker", "controller"))
        for case in cases:  # warm-up, not counted: the bytecode cache, each variant's imports
            for variant in plan[case]:
                if variant not in LAST:
                    run_child(stack, case, variant, WARM_UP_STEPS, args.seed, scratch)
        # the stored-pixel runs come after every round: one writes ~0.5 GB, and the next run's
        # end would wait for the ingest's checkpoint of it
        order = [(rnd, case, variant) for rnd in range(args.rounds) for case in cases
                 for variant in plan[case] if variant not in LAST]
        order += [(rnd, case, variant) for rnd in range(args.rounds) for case in cases
                  for variant in plan[case] if variant in LAST]
        for rnd, case, variant in order:
            n = capped.get(variant, steps[case])
            r = run_child(stack, case, variant, n, args.seed, scratch)
            runs[case][variant].append(r)
            rate = r["steps"] / r["seconds"]
            print(f"  round {rnd + 1} {case:9} {variant:11} {rate:9.0f} steps/s "
                  f"({r['seconds']:.2f} s, loop {r['loop_seconds']:.2f} s)"
                  + "".join(f"\n    LOST DATA: {p}" for p in r.get("problems", ())),
                  flush=True)
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    summaries = {c: summarize(runs[c]) for c in cases if runs[c].get("bare")}
    missed = [m for c in summaries for m in print_case(c, summaries[c], skipped[c])]
    for case in cases:
        if case not in summaries:
            print(f"\n{case}  {SKIPPED}")
    print("\ntargets " + ("all met" if not missed else "missed:"))
    for line in missed:
        print(f"  {line}")
    lost = [f"{c} {v} round {i + 1}: {p}" for c in runs for v, rs in runs[c].items()
            for i, r in enumerate(rs) for p in r.get("problems", ())]
    for line in lost:
        print(f"LOST DATA: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cases": summaries,
                                               "skipped": skipped, "missed": missed,
                                               "lost": lost},
                                              indent=2, default=str))
    return 1 if lost or (missed and args.strict) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200_000,
                        help="steps per run of cartpole, vector, pendulum and pixels")
    parser.add_argument("--peer-steps", type=int, default=10_000,
                        help="steps per Minari and wandb run (~0.2 ms a step)")
    parser.add_argument("--sb3-steps", type=int, default=32_768, help="PPO's step budget")
    parser.add_argument("--pixel-steps", type=int, default=5_000,
                        help="steps per run that stores 64x64x3 pixels (~60 KB a step stored)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder (its store)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
