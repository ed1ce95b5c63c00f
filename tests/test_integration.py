"""The whole pipeline with real processes on loopback: CLI → controller → broker → worker → ingest.

One stack serves the module; each test drives it through the real `gymbus` command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import zmq
from conftest import (
    STACK_ENV,
    gymbus_cli,
    gymbus_cli_json,
    make_stack,
    stack_fixture,
    wait_until,
)

from gymbus.services.stack.launcher import Stack
from gymbus.shared.codec import encode_frame
from gymbus.shared.protocol import FrameKind, LifecycleEvent

pytestmark = pytest.mark.integration

stack = stack_fixture("stack", **STACK_ENV)


def gymbus(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `gymbus` command against the stack."""
    return gymbus_cli(stack.process_env(), *args, timeout=timeout)


def gymbus_json(stack: Stack, *args: str) -> Any:
    return gymbus_cli_json(stack.process_env(), *args)


def query(stack: Stack, sql: str) -> list[dict[str, Any]]:
    return gymbus_json(stack, "query", sql)  # type: ignore[no-any-return]


def child_pids(run_id: str) -> list[int]:
    """Processes whose command line names this run (the worker's child for it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gymbus.worker.child" in cmdline and run_id.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_frozenlake_run_is_stored_whole(stack: Stack) -> None:
    episodes = 300
    reply = gymbus_json(stack, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                        "--episodes", str(episodes), "--seed", "1", "--wait")
    run_id = reply["run_id"]
    assert reply["status"] == "completed"

    stored = query(stack, f"SELECT count(*) AS n, sum(length) AS total FROM episodes "
                          f"WHERE run_id = '{run_id}'")[0]
    steps = query(stack, f"SELECT count(*) AS n FROM steps WHERE run_id = '{run_id}'")[0]["n"]
    assert stored["n"] == episodes
    assert steps == stored["total"] > 0
    seqs = query(stack, f"SELECT count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, "
                        f"max(seq) AS hi FROM frames WHERE run_id = '{run_id}'")[0]
    assert seqs["n"] == seqs["d"] == seqs["hi"] + 1
    assert seqs["lo"] == 0

    status = gymbus_json(stack, "status", run_id)
    assert status["status"] == "completed"
    assert status["gaps"] == 0
    assert status["duplicates"] == 0
    assert status["frames_emitted"] == status["frames_stored"] == seqs["n"]
    assert (status["episodes"], status["steps"]) == (episodes, steps)

    listed = {r["run_id"]: r for r in gymbus_json(stack, "runs")}
    assert listed[run_id]["status"] == "completed"
    assert listed[run_id]["episodes"] == episodes
    artifact = query(stack, f"SELECT path FROM lifecycle WHERE run_id = '{run_id}' "
                            f"AND event = '{LifecycleEvent.ARTIFACT.value}'")
    assert artifact and (stack.settings.run_dir(run_id) / artifact[0]["path"]).is_file()


def test_episodes_of_a_built_in_agent_carry_their_seed_and_reset_observation(
        stack: Stack) -> None:
    """Each stored episode has N+1 observations: the reset one, then one per step; the first
    episode's seed is the run's (later resets continue its generator and have none)."""
    reply = gymbus_json(stack, "submit", "--env", "CartPole-v1", "--algo", "random",
                        "--episodes", "5", "--seed", "7", "--wait")
    run_id = reply["run_id"]
    assert reply["status"] == "completed"
    episodes = query(stack, f"SELECT episode, seed, reset_obs_vec FROM episodes "
                            f"WHERE run_id = '{run_id}' ORDER BY episode")
    assert [e["episode"] for e in episodes] == list(range(5))
    assert [e["seed"] for e in episodes] == [7, None, None, None, None]
    expected, _ = gym.make("CartPole-v1").reset(seed=7)
    np.testing.assert_array_equal(np.asarray(episodes[0]["reset_obs_vec"], np.float32), expected)
    assert all(len(e["reset_obs_vec"]) == 4 for e in episodes)
    first_steps = query(stack, f"SELECT episode, obs_vec FROM steps WHERE run_id = '{run_id}' "
                               f"AND step = 0 ORDER BY episode")
    assert len(first_steps) == 5  # a reset observation is not a step's observation
    for e in episodes[1:]:
        assert e["reset_obs_vec"] != first_steps[e["episode"]]["obs_vec"]

    reply = gymbus_json(stack, "submit", "--env", "FrozenLake-v1", "--algo", "random",
                        "--episodes", "3", "--seed", "2", "--wait")
    frozen = query(stack, f"SELECT seed, reset_obs FROM episodes "
                          f"WHERE run_id = '{reply['run_id']}' ORDER BY episode")
    assert frozen == [{"seed": 2, "reset_obs": 0}, {"seed": None, "reset_obs": 0},
                      {"seed": None, "reset_obs": 0}]


def test_fast_mode_stores_episodes_but_no_steps(stack: Stack) -> None:
    reply = gymbus_json(stack, "submit", "--env", "Taxi-v4", "--algo", "q-learning",
                        "--episodes", "50", "--fast", "--wait")
    run_id = reply["run_id"]
    status = gymbus_json(stack, "status", run_id)
    assert (status["status"], status["telemetry"], status["gaps"]) == ("completed", "fast", 0)
    assert status["episodes"] == 50
    assert status["steps_stored"] == 0 < status["steps"]  # no step rows of the steps it took


def test_cancel_stops_the_run_process(stack: Stack) -> None:
    run_id = gymbus(stack, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                    "--episodes", "10000000").stdout.strip()
    wait_until(lambda: child_pids(run_id), 20, "the run's process to start")
    wait_until(lambda: (gymbus_json(stack, "status", run_id)["steps"] or 0) > 0, 20,
               "steps to be stored")
    started = time.monotonic()
    result = gymbus(stack, "cancel", run_id)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not child_pids(run_id), 2.0, "the run's process to exit")
    assert time.monotonic() - started < 4.0
    status = gymbus_json(stack, "status", run_id)
    assert status["status"] == "cancelled"
    wait_until(lambda: gymbus_json(stack, "status", run_id)["complete"], 10,
               "the cancelled run's frames to be stored")


def test_a_stalled_ingest_loses_no_frame(stack: Stack) -> None:
    """The ingest freezes mid-run (SIGSTOP); frames queue upstream, and all are stored after."""
    ingest = stack.services["ingest"].process
    run_id = gymbus(stack, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                    "--episodes", "3000", "--seed", "3").stdout.strip()
    wait_until(lambda: (gymbus_json(stack, "status", run_id)["steps"] or 0) > 0, 20,
               "the first steps to be stored")
    ingest.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: gymbus_json(stack, "status", run_id)["frames_emitted"] is not None,
                   60, "the run to end while the ingest is frozen")
    finally:
        ingest.send_signal(signal.SIGCONT)
    wait_until(lambda: gymbus_json(stack, "status", run_id)["complete"], 30,
               "every frame to be stored after the ingest resumes")
    status = gymbus_json(stack, "status", run_id)
    assert status["frames_stored"] == status["frames_emitted"]
    assert (status["gaps"], status["duplicates"], status["episodes"]) == (0, 0, 3000)


def test_an_invalid_config_is_refused_and_nothing_stored(stack: Stack) -> None:
    before = len(gymbus_json(stack, "runs"))
    cases = [
        (["--env", "NoSuchEnv-v0", "--algo", "q-learning", "--episodes", "5"], "env:"),
        (["--env", "FrozenLake-v1", "--algo", "q-learning", "--episodes", "-5"], "episodes:"),
        (["--env", "Taxi-v3", "--algo", "q-learning", "--episodes", "5"], "Taxi-v4"),
        (["--env", "FrozenLake-v1", "--algo", "q-learning", "--episodes", "5",
          "--agent-arg", "gamma=high"], "agent.gamma:"),
    ]
    for args, expected in cases:
        result = gymbus(stack, "submit", *args)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert len(gymbus_json(stack, "runs")) == before


def test_a_run_file_with_an_unknown_field_is_refused(stack: Stack, tmp_path: Path) -> None:
    run_file = tmp_path / "run.toml"
    run_file.write_text('env = "FrozenLake-v1"\nalgo = "q-learning"\nepisodes = 5\ncolour = 1\n')
    result = gymbus(stack, "submit", str(run_file))
    assert result.returncode == 2
    assert "colour: unknown field" in result.stderr


def test_a_malformed_frame_on_the_bus_is_a_dead_letter(stack: Stack) -> None:
    before = query(stack, "SELECT count(*) AS n FROM dead_letters")[0]["n"]
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 1000)
    try:
        pub.connect(stack.settings.telemetry_in)
        assert pub.poll(5000), "no subscription reached the test publisher"
        pub.recv()
        topic, good = encode_frame(FrameKind.METRIC, "injected-run", 0,
                                   {"name": ["x"], "step": [1], "value": [2.0], "ts_ns": [3]})
        pub.send_multipart([b"step.injected-run", b"\x00\xffnot msgpack"])
        pub.send_multipart([topic, msgpack.packb({"v": 99})])
        pub.send_multipart([topic, good])
    finally:
        pub.close()
    wait_until(lambda: query(stack, "SELECT count(*) AS n FROM dead_letters")[0]["n"] >= before + 2,
               10, "the dead letters to be stored")
    reasons = [r["reason"] for r in query(stack, "SELECT reason FROM dead_letters")]
    assert any("malformed msgpack" in r for r in reasons)
    assert any("unknown protocol version 99" in r for r in reasons)
    wait_until(lambda: query(stack, "SELECT count(*) AS n FROM metrics "
                                    "WHERE run_id = 'injected-run'")[0]["n"] == 1,
               10, "the valid frame after them to be stored")


def test_queries_are_read_only(stack: Stack) -> None:
    for sql in ["DELETE FROM runs", "DROP TABLE steps", "CREATE TABLE t (x INT)",
                "SELECT 1; DELETE FROM runs"]:
        result = gymbus(stack, "query", sql)
        assert result.returncode == 2, (sql, result.stderr)
        assert "read-only" in result.stderr or "read only" in result.stderr
    assert gymbus(stack, "query", "SELECT 42 AS answer", "--csv").stdout.split() == ["answer", "42"]


def test_workers_and_config_report_the_stack(stack: Stack) -> None:
    workers = gymbus_json(stack, "workers")
    assert len(workers) == 1
    assert workers[0]["slots"] == 2
    assert {"worker_id", "busy", "last_heartbeat_ns"} <= set(workers[0])
    config = gymbus_json(stack, "config")
    assert config["home"] == str(stack.settings.home)
    assert config["telemetry_in"] == stack.settings.telemetry_in
    assert config["telemetry_out"] == stack.settings.telemetry_out
    assert config["controller"] == stack.settings.controller


def test_unknown_run_and_absent_services_have_their_exit_codes(stack: Stack) -> None:
    result = gymbus(stack, "status", "01NOTARUN0000000000000000")
    assert result.returncode == 4, result.stderr
    env = {**stack.process_env(), "GYMBUS_CONTROLLER": "tcp://127.0.0.1:1",
           "GYMBUS_REQUEST_TIMEOUT": "0.5"}
    result = gymbus_cli(env, "runs", timeout=30)
    assert result.returncode == 3
    assert "did not answer" in result.stderr


def test_a_killed_worker_makes_its_run_lost_and_services_stop_on_sigterm(tmp_path: Path) -> None:
    with make_stack(tmp_path / "home", **STACK_ENV) as stack:
        stack.start()
        run_id = gymbus(stack, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                        "--episodes", "10000000").stdout.strip()
        wait_until(lambda: gymbus_json(stack, "status", run_id)["status"] == "running", 20,
                   "the run to be running")
        worker = stack.services["worker"].process
        for pid in child_pids(run_id):
            os.kill(pid, signal.SIGKILL)
        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: gymbus_json(stack, "status", run_id)["status"] == "lost", 10,
                   "the run to become lost")
        assert time.monotonic() - killed < 0.25 * 3 * 4  # within a few heartbeat intervals
        assert "heartbeat" in (gymbus_json(stack, "status", run_id)["reason"] or "")
        stack.services.pop("worker")
        for role in ("controller", "broker", "ingest"):
            started = time.monotonic()
            assert stack.stop_one(role) == 143  # stopped by SIGTERM
            assert time.monotonic() - started < 5.0
