"""The store at scale: grow one DuckDB file to many step rows through the real ingest process.

    python bench/store_scale.py [--rows 10000000] [--runs 100] [--frame-rows 500] [--keep DIR]

This script takes the broker's place: it binds the telemetry XPUB and feeds the real ingest
(`python -m gymbus.services.ingest`) frames encoded by the codec, as a run's publisher sends them
(typed-array step columns, an episode frame after each step frame, run_started and
run_completed), from `--runs` runs, eight at a time, half with a Discrete observation
(FrozenLake-like) and half with four numbers (CartPole-like). Frames in flight are capped (the
ingest's `received` counter), so that nothing is dropped at a high-water mark; every row is
counted back at the end.

Measured: size on disk (the DuckDB file, its WAL, the archive); ingest step rows per CPU-second
(the ingest process's own CPU time, /proc/<pid>/stat) over the last 1M rows before 1M (the
last 0.5M there), 10M and 100M rows (the feed pauses at both ends of each window until the
ingest has written every row sent), and from 0; the time
of a run's learning curve (episode returns, and the per-episode reward sum from the step rows)
and of one episode's replay (the viewers' query), through the ingest's query API; then with half
the runs archived as Parquet (`Command.ARCHIVE`, timed), the same queries on an archived run
and on a live one, and the same learning-curve query over every run.
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from gymbus.services.stack.launcher import free_endpoints
from gymbus.shared import queries
from gymbus.shared.codec import encode_frame, typed_array
from gymbus.shared.protocol import Command, FrameKind
from gymbus.shared.transport import Client

CLK_TCK = os.sysconf("SC_CLK_TCK")
EPISODE_STEPS = 100
ACTIVE_RUNS = 8
#: frames sent but not yet taken off the ingest's SUB, at most
WINDOW_FRAMES = 4000
MARKS = (1_000_000, 10_000_000, 100_000_000)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def blocks(feed: Feed) -> dict[str, int]:
    """The DuckDB file's blocks in use and free (free ones are reused by later inserts)."""
    reply = feed.client.request(Command.QUERY, {"sql": "SELECT * FROM pragma_database_size()"})
    row = dict(zip(reply["columns"], reply["rows"][0], strict=True))
    return {"used_blocks": row["used_blocks"], "free_blocks": row["free_blocks"],
            "block_size": row["block_size"]}


def disk_bytes(home: Path) -> dict[str, int]:
    db = home / "gymbus.duckdb"
    wal = home / "gymbus.duckdb.wal"
    archive = sum(f.stat().st_size for f in (home / "archive").rglob("*.parquet"))
    return {"db": db.stat().st_size if db.exists() else 0,
            "wal": wal.stat().st_size if wal.exists() else 0, "archive": archive}


class Run:
    """One synthetic run's frames, built from its row index on."""

    def __init__(self, index: int, rows: int, frame_rows: int) -> None:
        self.run_id = f"scale-{index:05d}"
        self.vector = index % 2 == 1
        self.rows, self.frame_rows = rows, frame_rows
        self.seq, self.done = 0, 0
        self.rng = np.random.default_rng(index)

    def frame(self, kind: FrameKind, body: dict[str, Any]) -> tuple[bytes, bytes]:
        parts = encode_frame(kind, self.run_id, self.seq, body, agent_id="agent-0",
                             worker_id="bench")
        self.seq += 1
        return parts

    def started(self) -> tuple[bytes, bytes]:
        env = "CartPole-v1" if self.vector else "FrozenLake-v1"
        return self.frame(FrameKind.LIFECYCLE, {"event": "run_started",
                                                "config": {"env": env, "algo": "random"}})

    def completed(self) -> tuple[bytes, bytes]:
        return self.frame(FrameKind.LIFECYCLE, {
            "event": "run_completed", "status": "completed", "frames_emitted": self.seq + 1,
            "episodes": self.rows // EPISODE_STEPS, "steps": self.rows})

    def next_frames(self) -> list[tuple[bytes, bytes]]:
        """The next step frame, and an episode frame for the episodes it ends."""
        n = min(self.frame_rows, self.rows - self.done)
        index = np.arange(self.done, self.done + n, dtype=np.int64)
        self.done += n
        episode, step = index // EPISODE_STEPS, index % EPISODE_STEPS
        ends = step == EPISODE_STEPS - 1
        obs = (self.rng.standard_normal((n, 4)) if self.vector
               else self.rng.integers(0, 16, n, dtype=np.int64))
        body = {"episode": typed_array(episode), "step": typed_array(step),
                "action": typed_array(self.rng.integers(0, 2, n, dtype=np.int64)),
                "obs": typed_array(obs), "reward": typed_array(self.rng.random(n)),
                "terminated": typed_array(ends), "truncated": typed_array(np.zeros(n, bool))}
        frames = [self.frame(FrameKind.STEP, body)]
        if ends.any():
            k = int(ends.sum())
            now = time.time_ns()
            frames.append(self.frame(FrameKind.EPISODE, {
                "episode": typed_array(episode[ends]), "return": typed_array(np.full(k, 1.0)),
                "length": typed_array(np.full(k, EPISODE_STEPS, np.int64)),
                "terminated": typed_array(np.ones(k, bool)),
                "truncated": typed_array(np.zeros(k, bool)),
                "ts_ns": typed_array(np.full(k, now, np.int64))}))
        return frames


class Feed:
    """The XPUB in the broker's place, the ingest process, and a client of its query API."""

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, **free_endpoints(home)}
        self.home = home
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, 0)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.xpub.bind(self.env["GYMBUS_TELEMETRY_OUT"])
        home.mkdir(parents=True, exist_ok=True)
        self.log = open(home / "ingest.log", "ab")  # noqa: SIM115 -- open for the whole bench
        self.proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.ingest"],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = Client(self.env["GYMBUS_INGEST"], "ingest", timeout=600.0, ctx=self.ctx)
        deadline = time.monotonic() + 60
        while self.xpub.poll(100, zmq.POLLIN) == 0 or self.xpub.recv() != b"\x01":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the ingest did not subscribe; see {home / 'ingest.log'}")
        self.sent = 0

    def send(self, parts: tuple[bytes, bytes]) -> None:
        self.xpub.send_multipart(list(parts))
        self.sent += 1
        if self.sent % 500 == 0:
            while self.sent - self.stats()["received"] > WINDOW_FRAMES:
                time.sleep(0.01)  # pacing: frames in flight capped, so that none is dropped

    def stats(self) -> dict[str, Any]:
        return self.client.request(Command.INGEST_STATS)

    def written(self, rows: int) -> float:
        """Wait until the ingest has written `rows` step rows; its CPU seconds then."""
        while self.stats()["rows"]["steps"] < rows:
            if self.proc.poll() is not None:
                raise SystemExit(f"the ingest died; see {self.home / 'ingest.log'}")
            time.sleep(0.05)  # polls toward the ingest's next flush (0.5 s at most)
        return cpu_seconds(self.proc.pid)

    def query_s(self, sql: str, repeat: int = 5) -> float:
        """Median seconds of a query through the ingest's API (rows fetched included)."""
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.client.request(Command.QUERY, {"sql": sql, "max_rows": 1_000_000})
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def close(self) -> int | None:
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = None
        self.client.close()
        self.xpub.close()
        self.ctx.term()
        self.log.close()
        return code


def fill(feed: Feed, total: int, runs: int, frame_rows: int) -> list[dict[str, Any]]:
    """Feed every run, pausing at each mark (and a tenth before it) to sample the ingest's CPU."""
    per_run = total // runs
    marks = sorted({m for mark in MARKS if mark <= total for m in (mark - window(mark), mark)})
    pending = [Run(i, per_run, frame_rows) for i in range(runs)]
    active: list[Run] = []
    rows_sent, samples = 0, [{"rows": 0, "cpu": cpu_seconds(feed.proc.pid),
                              "wall": time.monotonic()}]
    while pending or active:
        while pending and len(active) < ACTIVE_RUNS:
            run = pending.pop(0)
            feed.send(run.started())
            active.append(run)
        for run in list(active):
            before = run.done
            for parts in run.next_frames():
                feed.send(parts)
            rows_sent += run.done - before
            if run.done == run.rows:
                feed.send(run.completed())
                active.remove(run)
            if marks and rows_sent >= marks[0]:
                mark = marks.pop(0)
                cpu = feed.written(rows_sent)
                samples.append({"rows": rows_sent, "cpu": cpu, "wall": time.monotonic(),
                                "mark": mark})
                print(f"  {rows_sent:>12,} rows written, ingest CPU {cpu:8.1f} s, "
                      f"{disk_bytes(feed.home)['db'] / 1e9:6.2f} GB", file=sys.stderr)
    feed.written(per_run * runs)
    return samples


def window(mark: int) -> int:
    """The rows before a mark that its rate is measured over: the same 1M at every mark from
    2M on (half of them below)."""
    return min(1_000_000, mark // 2)


def rates(samples: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Rows per ingest CPU-second over the window before each mark, and from 0."""
    out: dict[int, dict[str, float]] = {}
    by_mark = {s.get("mark"): s for s in samples}
    for mark in MARKS:
        end, start = by_mark.get(mark), by_mark.get(mark - window(mark))
        if end is None or start is None:
            continue
        out[mark] = {
            "rows_per_cpu_s": (end["rows"] - start["rows"]) / max(end["cpu"] - start["cpu"], 1e-9),
            "rows_per_wall_s": (end["rows"] - start["rows"]) / (end["wall"] - start["wall"]),
            "cumulative_rows_per_cpu_s": end["rows"] / max(end["cpu"] - samples[0]["cpu"], 1e-9)}
    return out


def query_times(feed: Feed, run_id: str) -> dict[str, float]:
    mid = (feed.client.request(Command.QUERY, {"sql": queries.episode_span(run_id)})
           ["rows"][0][2]) // 2
    return {
        "curve_episodes_s": feed.query_s(queries.returns(run_id)),
        "curve_steps_s": feed.query_s(
            "SELECT episode, sum(reward) AS r FROM steps WHERE run_id = "
            f"{queries.sql_str(run_id)} GROUP BY episode ORDER BY episode"),
        "replay_s": feed.query_s(queries.episode_steps(run_id, mid)),
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(args.keep or tempfile.mkdtemp(prefix="gymbus-scale-")) / "home"
    feed = Feed(home)
    result: dict[str, Any] = {"rows": args.rows, "runs": args.runs, "frame_rows": args.frame_rows}
    try:
        t0 = time.monotonic()
        samples = fill(feed, args.rows, args.runs, args.frame_rows)
        result["fill_s"] = time.monotonic() - t0
        result["rates"] = rates(samples)
        stored = feed.client.request(Command.QUERY, {"sql": "SELECT count(*) FROM steps"})
        result["steps_stored"] = stored["rows"][0][0]
        result["frames_sent"] = feed.sent
        feed.client.request(Command.QUERY, {"sql": "SELECT 1"})  # a flush first
        result["disk"] = {**disk_bytes(home), **blocks(feed)}
        run_ids = [f"scale-{i:05d}" for i in range(args.runs)]
        result["queries"] = query_times(feed, run_ids[-1])
        t0 = time.monotonic()
        half = run_ids[: args.runs // 2]
        for run_id in half:
            feed.client.request(Command.ARCHIVE, {"run_ids": [run_id]})
        result["archive_s"] = time.monotonic() - t0
        result["disk_archived"] = {**disk_bytes(home), **blocks(feed)}
        result["queries_archived_run"] = query_times(feed, half[len(half) // 2])
        result["queries_live_run"] = query_times(feed, run_ids[-1])
        result["all_runs_count_s"] = feed.query_s(
            "SELECT run_id, count(*), sum(reward) FROM steps GROUP BY run_id", repeat=3)
        after = feed.client.request(Command.QUERY, {"sql": "SELECT count(*) FROM steps"})
        result["steps_after_archive"] = after["rows"][0][0]
        result["stats"] = feed.stats()
    finally:
        result["ingest_exit"] = feed.close()
        if not args.keep:
            shutil.rmtree(home.parent, ignore_errors=True)
    return result


def report(r: dict[str, Any]) -> None:
    expected = r["rows"] // r["runs"] * r["runs"]
    print(f"store_scale: {r['steps_stored']:,} step rows from {r['runs']} runs "
          f"({r['frame_rows']} rows a frame), filled in {r['fill_s']:.0f} s")
    print(f"  lost: {expected - r['steps_stored']} rows (sent {expected:,}); after archiving "
          f"half the runs, queries see {r['steps_after_archive']:,}")
    for mark, v in r["rates"].items():
        print(f"  at {mark:>11,} rows: {v['rows_per_cpu_s']:>9,.0f} rows/CPU-s "
              f"(window), {v['rows_per_wall_s']:>9,.0f} rows/s wall, "
              f"{v['cumulative_rows_per_cpu_s']:>9,.0f} rows/CPU-s from 0")
    d, a = r["disk"], r["disk_archived"]
    print(f"  disk: {d['db'] / 1e9:.2f} GB DuckDB + {d['wal'] / 1e6:.0f} MB WAL "
          f"({d['db'] / max(r['steps_stored'], 1):.1f} B/row); archived half: "
          f"{a['archive'] / 1e9:.2f} GB Parquet, DuckDB file {a['db'] / 1e9:.2f} GB, "
          f"archive took {r['archive_s']:.1f} s")
    print(f"  DuckDB blocks used/free: {d['used_blocks']}/{d['free_blocks']} before, "
          f"{a['used_blocks']}/{a['free_blocks']} after archiving half "
          f"({d['block_size'] // 1024} KiB blocks)")
    print(f"  {'query (median of 5, s)':<26}{'curve(episodes)':>16}{'curve(steps)':>14}"
          f"{'replay':>10}")
    for label, key in (("all runs live", "queries"), ("archived run", "queries_archived_run"),
                       ("live run, half archived", "queries_live_run")):
        q = r[key]
        print(f"  {label:<26}{q['curve_episodes_s']:>16.3f}{q['curve_steps_s']:>14.3f}"
              f"{q['replay_s']:>10.3f}")
    print(f"  every run's count and reward sum, half archived: {r['all_runs_count_s']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="step rows in all")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--frame-rows", type=int, default=500, help="step rows a frame")
    parser.add_argument("--keep", help="a folder for the home, kept afterwards")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    if args.runs < 2 or args.rows < args.runs * EPISODE_STEPS:
        parser.error("give at least 2 runs of at least 100 rows each")
    result = bench(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["steps_stored"] == args.rows // args.runs * args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
