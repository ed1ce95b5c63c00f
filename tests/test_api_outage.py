"""A recorded script whose ingest or broker goes away mid-run, and comes back before its end:
training goes on, frames go to the run's spool, and the run's end replays what the ingest
missed, so that every step is stored once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STACK_ENV, make_stack, store_query, stored_run

from gymbus.services.stack.launcher import Stack

pytestmark = pytest.mark.integration

SCRIPT = """
    import json, sys, gymnasium as gym, gymbus
    with gymbus.run(name="outage") as run:
        env = run.record(gym.make("CartPole-v1"))
        env.reset(seed=0)
        env.action_space.seed(0)
        steps = 0
        for phase in range(3):
            for _ in range(4000):
                _, _, term, trunc, _ = env.step(env.action_space.sample())
                steps += 1
                if term or trunc:
                    env.reset()
            print(json.dumps({"run_id": run.run_id, "phase": phase, "steps": steps}),
                  flush=True)
            if phase < 2:
                sys.stdin.readline()
    print(json.dumps({"run_id": run.run_id, "steps": steps}), flush=True)
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with make_stack(tmp_path / "home", **STACK_ENV) as s:
        s.start()
        yield s


@pytest.mark.parametrize("role", [
    "ingest", pytest.param("broker", marks=pytest.mark.slow)])  # test_faults: a broker restart
def test_a_service_lost_mid_run_loses_no_step(stack: Stack, role: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT)],
                            env=stack.process_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        stack.stop_one(role, signal.SIGKILL)  # a crash: nothing flushed, nothing said
        proc.stdin.write("\n")
        proc.stdin.flush()
        json.loads(proc.stdout.readline())  # the second phase trained with the service down
        stack.start_one(role)
        stack.wait_ready((role,), timeout=30)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    run_id = last["run_id"]
    assert run_id == first["run_id"]
    stored_run(stack, run_id, timeout=60)
    rows = store_query(stack, f"SELECT count(*) AS n, count(DISTINCT (episode, step)) AS d "
                              f"FROM steps WHERE run_id = '{run_id}'")[0]
    assert rows["n"] == rows["d"] == last["steps"] == 12000
    episodes = store_query(stack, f"SELECT sum(length) AS total FROM episodes "
                                  f"WHERE run_id = '{run_id}'")[0]
    assert episodes["total"] == 12000
