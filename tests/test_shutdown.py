"""Shutdown without loss: SIGTERM to honcho, the way `make up` runs the stack, while
full-telemetry runs train.

The real Procfile starts each service through gymbus.services.stack.ordered, which passes the stop
signal on in the stack's order: the worker stops its runs and waits until the ingest holds their
frames, then the controller, the broker and last the ingest, which flushes and checkpoints. With
no restart in between, every run is `cancelled` (in the controller and in the store), and every
frame it emitted is stored exactly once; honcho never has to kill anything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from conftest import STACK_ENV, make_stack, wait_until
from test_faults import Bus, steps_stored

from gymbus.shared.protocol import RunState

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
RUNS = 2
#: seconds honcho may take to stop everything: the worker's stop (its runs, then the ingest's
#: confirmation of their spools), then 5 s of honcho's grace for the others at most
STOP_WITHIN = 12.0


def test_sigterm_to_honcho_stores_every_frame_and_cancels_every_run(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "home", **STACK_ENV)
    venv_bin = str(Path(sys.executable).parent)
    env = stack.process_env({"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")})
    log = tmp_path / "honcho.log"
    with open(log, "ab") as out:  # as `make up` does, with the repository's own Procfile
        honcho = subprocess.Popen([os.path.join(venv_bin, "honcho"), "start", "-f",
                                   str(REPO / "Procfile"), "-d", str(tmp_path)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    bus = Bus(stack)
    try:
        stack.wait_ready(("ingest", "controller", "worker"), 60)
        run_ids = [bus.submit(env="FrozenLake-v1", algo="q-learning", total_steps=10**9,
                              seed=i, telemetry="full") for i in range(RUNS)]
        for run_id in run_ids:
            wait_until(lambda r=run_id: steps_stored(bus, r) > 20_000, 60, f"steps of {run_id}")
        bus.close()
        honcho.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        honcho.wait(STOP_WITHIN + 10)
        took = time.monotonic() - signalled
    finally:
        bus.close()
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    text = log.read_text(errors="replace")
    assert "SIGKILL" not in text, text[-3000:]
    for role in ("worker", "controller", "broker", "ingest"):
        assert f"{role}.1 stopped (rc=143)" in text, text[-3000:]
    stopped = [m[1] for m in re.finditer(r"(\w+)\.1 stopped", text)]
    assert stopped[0] == "worker" and stopped[-1] == "ingest", stopped
    assert took < STOP_WITHIN, took

    s = stack.settings
    with sqlite3.connect(f"file:{s.registry_path}?mode=ro", uri=True) as registry:
        states = dict(registry.execute("SELECT run_id, state FROM runs").fetchall())
    with duckdb.connect(str(s.db_path), read_only=True) as store:
        for run_id in run_ids:
            emitted = json.loads((s.run_dir(run_id) / "result.json").read_text())
            frames = emitted["frames_emitted"]
            n, distinct, lo, hi = store.execute(
                "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM frames "
                "WHERE run_id = ?", [run_id]).fetchone() or (0, 0, None, None)
            status, complete = store.execute("SELECT status, complete FROM runs WHERE run_id = ?",
                                             [run_id]).fetchone() or (None, None)
            assert (n, distinct, lo, hi) == (frames, frames, 0, frames - 1), (run_id, frames)
            assert (status, complete) == (RunState.CANCELLED.value, True)
            assert states[run_id] == RunState.CANCELLED.value
            assert emitted["status"] == RunState.CANCELLED.value
            print(f"\nMEASURED shutdown: run {run_id}: {frames} frames emitted, {n} stored")
    print(f"MEASURED shutdown: honcho stopped {took:.2f} s after SIGTERM; order {stopped}")
