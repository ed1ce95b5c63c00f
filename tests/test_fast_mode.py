"""Telemetry modes: the precedence of fast mode's switches, sampled mode's whole (replayable)
episodes, and the modes through a real stack (`gymbus status`, `gymbus runs`, a worker started
with DISABLE_TELEMETRY)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import zmq
from conftest import stack_fixture
from test_emitter import FrameSink, connect, run_loop
from test_tensorboard import gymbus_json, query, read_tensorboard, run_to_end

from gymbus.services.stack.launcher import Stack
from gymbus.shared.codec import Frame
from gymbus.shared.protocol import FrameKind, TelemetryMode
from gymbus.worker.child import telemetry_mode

FULL, FAST, SAMPLED = TelemetryMode.FULL, TelemetryMode.FAST, TelemetryMode.SAMPLED


# --- precedence: --no-telemetry, then DISABLE_TELEMETRY, then the run config ----------------------


@pytest.mark.parametrize(("configured", "flag", "variable", "expected"), [
    (FULL, False, None, FULL),
    (SAMPLED, False, None, SAMPLED),
    (FAST, False, None, FAST),
    (FULL, True, None, FAST),        # the flag forces fast mode
    (SAMPLED, True, "0", FAST),      # ... whatever the variable says
    (FULL, False, "1", FAST),        # the variable forces fast mode
    (SAMPLED, False, "true", FAST),
    (FULL, False, " TRUE ", FAST),   # any case, spaces ignored
    (FULL, False, "yes", FAST),
    (FULL, False, "0", FULL),        # false words leave the config's mode
    (FULL, False, "false", FULL),
    (FULL, False, "", FULL),
    (FAST, False, "0", FAST),        # the switches only turn telemetry off, never on
    (FAST, False, "false", FAST),
])
def test_precedence(configured: TelemetryMode, flag: bool, variable: str | None,
                    expected: TelemetryMode) -> None:
    environ = {} if variable is None else {"DISABLE_TELEMETRY": variable}
    assert telemetry_mode(configured, flag, environ) is expected


def test_an_unknown_value_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gymbus.run"):
        assert telemetry_mode(FULL, False, {"DISABLE_TELEMETRY": "maybe"}) is FULL
    assert "DISABLE_TELEMETRY='maybe'" in caplog.text


# --- sampled mode: every Nth episode's steps, whole -----------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def sink(ctx: zmq.Context[Any]) -> Iterator[FrameSink]:
    s = FrameSink(ctx)
    yield s
    s.close()


def steps_by_episode(frames: list[Frame]) -> dict[int, dict[str, np.ndarray]]:
    """Step rows of each recorded episode, as columns in the order they were sent."""
    steps = [f for f in frames if f.kind is FrameKind.STEP]
    cols = {name: np.concatenate([f.body[name] for f in steps])
            for name in ("episode", "step", "action", "obs", "reward", "terminated", "truncated")}
    return {int(e): {k: v[cols["episode"] == e] for k, v in cols.items()}
            for e in np.unique(cols["episode"])}


def episode_rows(frames: list[Frame]) -> dict[int, tuple[int, bool, bool]]:
    out = {}
    for f in frames:
        if f.kind is FrameKind.EPISODE:
            for e, n, term, trunc in zip(f.body["episode"], f.body["length"],
                                         f.body["terminated"], f.body["truncated"]):
                out[int(e)] = (int(n), bool(term), bool(trunc))
    return out


def test_sampled_episodes_are_whole_and_replay(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    """Every recorded episode has all its steps, in order, and replaying its actions in the
    (deterministic) environment gives back its observations, rewards and ending."""
    emitter = connect(ctx, sink)
    config = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 60, "seed": 4,
              "env_kwargs": {"is_slippery": False}, "telemetry": "sampled", "every": 7}
    result = run_loop(emitter, config)
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    frames = sink.drain()
    recorded, episodes = steps_by_episode(frames), episode_rows(frames)
    assert sorted(recorded) == list(range(0, 60, 7))
    env = gym.make("FrozenLake-v1", is_slippery=False)
    for e, rows in recorded.items():
        length, terminated, truncated = episodes[e]
        assert rows["step"].tolist() == list(range(length))  # whole, in order
        assert (bool(rows["terminated"][-1]), bool(rows["truncated"][-1])) == (terminated,
                                                                                truncated)
        env.reset()
        for action, obs, reward, term in zip(rows["action"], rows["obs"], rows["reward"],
                                             rows["terminated"]):
            replayed = env.step(int(action))
            assert (replayed[0], replayed[1], replayed[2]) == (obs, reward, term)
    emitter.close(0)


def test_a_step_budget_cuts_a_sampled_episode_whole(ctx: zmq.Context[Any],
                                                    sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    config = {"env": "CliffWalking-v1", "algo": "random", "total_steps": 2_000, "seed": 1,
              "telemetry": "sampled", "every": 1}
    result = run_loop(emitter, config)
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    frames = sink.drain()
    recorded, episodes = steps_by_episode(frames), episode_rows(frames)
    assert sum(len(r["step"]) for r in recorded.values()) == result.steps == 2_000
    assert {e: len(r["step"]) for e, r in recorded.items()} == {
        e: n for e, (n, _, _) in episodes.items()}


# --- through a real stack -------------------------------------------------------------------------


stack = stack_fixture("modes", GYMBUS_HEARTBEAT_INTERVAL="0.25")


def test_sampled_mode_through_the_stack(stack: Stack) -> None:
    run_id = gymbus_json(stack, "submit", "--env", "Taxi-v4", "--algo", "q-learning",
                         "--episodes", "40", "--telemetry", "sampled", "--every", "5",
                         "--wait")["run_id"]
    status = gymbus_json(stack, "status", run_id)
    assert (status["status"], status["telemetry"], status["complete"]) == ("completed",
                                                                           "sampled", True)
    listed = {r["run_id"]: r for r in gymbus_json(stack, "runs")}
    assert listed[run_id]["telemetry"] == "sampled"
    per_episode = query(stack, f"""
        SELECT e.episode, e.length, count(s.step) AS rows, max(s.step) AS last
        FROM episodes e LEFT JOIN steps s ON s.run_id = e.run_id AND s.episode = e.episode
        WHERE e.run_id = '{run_id}' GROUP BY e.episode, e.length ORDER BY e.episode""")
    assert len(per_episode) == 40
    for row in per_episode:
        expected = row["length"] if row["episode"] % 5 == 0 else 0
        assert row["rows"] == expected, row
        assert row["last"] in (None, row["length"] - 1)
    assert read_tensorboard(stack.settings.run_dir(run_id))["charts/episodic_length"]


def test_a_worker_started_with_disable_telemetry_runs_fast(stack: Stack) -> None:
    stack.stop_one("worker")
    stack.start_one("worker", {"DISABLE_TELEMETRY": "1"})
    stack.wait_ready(("controller", "worker"), 30)
    run_id = run_to_end(stack, {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 100})
    (stored,) = query(stack, "SELECT telemetry, episodes, steps FROM runs "
                             f"WHERE run_id = '{run_id}'")
    # what the run did, from its run_started frame: episodes flow, no step rows
    assert (stored["telemetry"], stored["episodes"], stored["steps"]) == ("fast", 100, 0)
    result = json.loads((stack.settings.run_dir(run_id) / "result.json").read_text())
    assert result["telemetry"] == "fast" and result["tensorboard"]["error"] is None
    assert len(read_tensorboard(stack.settings.run_dir(run_id))["charts/episodic_return"]) > 0
