"""Export rates: rows per second of `gymbus export` as Parquet and as Minari on a run of a
million steps, against DuckDB's own COPY of the same rows, and the Minari dataset's size next to
the run's Parquet.

    .venv/bin/python bench/export_rates.py [--steps 1000000] [--episode-length 200] [--json F]

The store is built by the ingest's own `Store` from frames that went through the codec, as the
ingest takes them: one CartPole-shaped run (4 float observations, 2 actions) of `--steps` step
rows. A real ingest process then serves the file, and the real `gymbus export` command exports
the run through it (Parquet, then Minari), and once more from the file with the ingest stopped.
The baseline is DuckDB's `COPY (SELECT ...) TO 'x.parquet'` of the run's steps, straight from the
file: the floor any export pays for reading and writing those rows.
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

import duckdb
import numpy as np

from gymbus.services.ingest.store import Store
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.codec import decode_frame, encode_frame, typed_array_of
from gymbus.shared.protocol import FrameKind

RUN = "01BENCHEXPORT0000000000000"
T0_NS = 1_700_000_000_000_000_000
#: step rows per frame (an emitter sends a few hundred to a few thousand)
FRAME_ROWS = 2048


def typed(values: np.ndarray[Any, Any]) -> dict[str, Any]:
    array: dict[str, Any] = typed_array_of(values.dtype, list(values.shape), values.tobytes())
    return array


def build(path: Path, steps: int, episode_length: int) -> int:
    """One CartPole-shaped run of `steps` step rows in a new store at `path`; returns its
    episodes."""
    rng = np.random.default_rng(0)
    episodes = steps // episode_length
    store = Store(path)
    seq = 0

    def add(kind: FrameKind, body: dict[str, Any]) -> None:
        nonlocal seq
        store.add(decode_frame(list(encode_frame(kind, RUN, seq, body, agent_id="agent-0",
                                                 ts_ns=T0_NS + seq))))
        seq += 1

    config = {"config": {"env": "CartPole-v1", "seed": 0}}
    add(FrameKind.LIFECYCLE, {"event": "run_started", "config": config, "env": "CartPole-v1",
                              "telemetry": "full"})
    n = episodes * episode_length
    episode = np.repeat(np.arange(episodes), episode_length)
    step = np.tile(np.arange(episode_length), episodes)
    last = step == episode_length - 1
    obs = rng.normal(size=(n, 4)).astype(np.float32).astype(np.float64)
    action = rng.integers(0, 2, n)
    for lo in range(0, n, FRAME_ROWS):
        hi = min(lo + FRAME_ROWS, n)
        add(FrameKind.STEP, {
            "episode": typed(episode[lo:hi]), "step": typed(step[lo:hi]),
            "action": typed(action[lo:hi]), "obs": typed(obs[lo:hi]),
            "reward": typed(np.ones(hi - lo)), "terminated": typed(last[lo:hi]),
            "truncated": typed(np.zeros(hi - lo, bool))})
        if store.flush_due():
            store.flush()
    for lo in range(0, episodes, 1000):
        hi = min(lo + 1000, episodes)
        add(FrameKind.EPISODE, {
            "episode": typed(np.arange(lo, hi)), "return": typed(np.full(hi - lo, 200.0)),
            "length": typed(np.full(hi - lo, episode_length)),
            "terminated": typed(np.ones(hi - lo, bool)),
            "truncated": typed(np.zeros(hi - lo, bool)),
            "ts_ns": typed(np.full(hi - lo, T0_NS)), "seed": typed(np.arange(lo, hi)),
            "reset_obs": typed(rng.normal(size=(hi - lo, 4)).astype(np.float32)
                               .astype(np.float64))})
    add(FrameKind.LIFECYCLE, {"event": "run_completed", "status": "completed",
                              "frames_emitted": seq + 1, "reason": None})
    store.close()
    return episodes


def export(stack: Stack, fmt: str, out: Path, extra: dict[str, str] | None = None) -> Any:
    """`gymbus export RUN --format fmt --out out --json`, timed from outside (wall seconds)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gymbus.services.cli", "export", RUN,
                             "--format", fmt, "--out", str(out), "--json"],
                            env=stack.process_env(extra), capture_output=True, text=True,
                            check=False)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"gymbus export --format {fmt} failed: {result.stderr}")
    return {"wall_s": wall, **json.loads(result.stdout)}


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--episode-length", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the numbers to this file too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gymbus-export-") as tmp:
        root = Path(tmp)
        home = root / "home"
        home.mkdir()
        stack = Stack({**free_endpoints(home), "GYMBUS_REQUEST_TIMEOUT": "30"})
        t = time.perf_counter()
        episodes = build(stack.settings.db_path, args.steps, args.episode_length)
        rows = episodes * args.episode_length
        print(f"built {rows:,} step rows, {episodes:,} episodes in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        base_out = root / "copy.parquet"
        t = time.perf_counter()
        with duckdb.connect(str(stack.settings.db_path), read_only=True) as con:
            con.execute(f"COPY (SELECT * FROM steps WHERE run_id = '{RUN}' ORDER BY episode, "
                        f"step) TO '{base_out}' (FORMAT parquet, COMPRESSION zstd)")
        baseline = rows / (time.perf_counter() - t)
        copy_bytes = base_out.stat().st_size
        with stack:
            stack.start(("ingest",))
            parquet = export(stack, "parquet", root / "parquet")
            minari = export(stack, "minari", root / "minari")
            stack.stop_one("ingest")
            from_file = export(stack, "parquet", root / "parquet-file",
                               {"GYMBUS_REQUEST_TIMEOUT": "0.5"})
    dataset = minari["datasets"][0]
    numbers = {
        "step_rows": rows, "episodes": episodes,
        "duckdb_copy_rows_per_s": round(baseline),
        "parquet_rows_per_s": round(rows / parquet["seconds"]),
        "parquet_rows_per_s_wall": round(rows / parquet["wall_s"]),
        "parquet_from_file_rows_per_s": round(rows / from_file["seconds"]),
        "minari_rows_per_s": round(rows / dataset["seconds"]),
        "minari_rows_per_s_wall": round(rows / minari["wall_s"]),
        "parquet_bytes": parquet["bytes"], "minari_bytes": dataset["bytes"],
        "duckdb_copy_bytes": copy_bytes,
    }
    print(f"{'export of ' + format(rows, ',') + ' step rows':<40} {'rows/s':>12} {'vs COPY':>8}")
    for name, key in (("DuckDB COPY to Parquet (baseline)", "duckdb_copy_rows_per_s"),
                      ("gymbus export parquet (ingest)", "parquet_rows_per_s"),
                      ("gymbus export parquet (file)", "parquet_from_file_rows_per_s"),
                      ("gymbus export minari (ingest)", "minari_rows_per_s")):
        value = numbers[key]
        print(f"{name:<40} {value:>12,} {value / numbers['duckdb_copy_rows_per_s']:>8.2f}")
    print(f"sizes: Parquet (every table of the run) {numbers['parquet_bytes'] / 1e6:.1f} MB, "
          f"Minari (HDF5) {numbers['minari_bytes'] / 1e6:.1f} MB "
          f"({numbers['minari_bytes'] / numbers['parquet_bytes']:.1f}x); DuckDB's COPY of the "
          f"steps {copy_bytes / 1e6:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
