"""`gymbus replay RUN --episode N`: a stored episode step by step, and what a fast-mode run has."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from conftest import gymbus_cli, stack_fixture, wait_until
from test_live import VIEWER_ENV, stored, submit

from gymbus.services.stack.launcher import Stack
from gymbus.services.viewers.grid import GridWorld

pytestmark = pytest.mark.integration


stack = stack_fixture("replay", **VIEWER_ENV)


@pytest.fixture(scope="module")
def runs(stack: Stack) -> dict[str, str]:
    """Two runs at a time: as many as the worker has slots."""
    configs: dict[str, dict[str, Any]] = {
        "lake": {"env": "FrozenLake-v1", "episodes": 300,
                 "env_kwargs": {"map_name": "8x8", "is_slippery": False}},
        "taxi": {"env": "Taxi-v4", "episodes": 100},
        "fast": {"env": "FrozenLake-v1", "episodes": 200, "telemetry": "fast"},
        "sampled": {"env": "CliffWalking-v1", "episodes": 30, "telemetry": "sampled",
                    "every": 10},
    }
    made: dict[str, str] = {}
    names = list(configs)
    for pair in (names[:2], names[2:]):
        for name in pair:
            made[name] = submit(stack, **configs[name])
        for name in pair:
            wait_until(lambda r=made[name]: stored(stack, r).get("complete"), 90,
                       f"the {name} run to be stored")
    return made


def gymbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({"COLUMNS": "120"}), *args)


def replay_json(stack: Stack, run_id: str, episode: int) -> dict[str, Any]:
    result = gymbus(stack, "replay", run_id, "--episode", str(episode), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_grid_episode_is_replayed_step_by_step(stack: Stack, runs: dict[str, str]) -> None:
    data = replay_json(stack, runs["lake"], 299)
    assert data["steps_stored"] and data["env"] == "FrozenLake-v1"
    steps = data["steps"]
    assert len(steps) == data["length"] and [s["step"] for s in steps] == list(range(len(steps)))
    assert sum(s["reward"] for s in steps) == pytest.approx(data["return"])
    world = GridWorld.for_env("FrozenLake-v1", {"map_name": "8x8"})
    assert world is not None
    for s in steps:  # the board after each step shows the agent where the observation puts it
        row, col = divmod(s["obs"], 8)
        assert s["board"].splitlines()[row].split()[col].startswith("[")
        assert s["action_name"] in ("LEFT", "DOWN", "RIGHT", "UP")
        assert s["label"] in ("explore", "exploit")
    assert steps[-1]["terminated"] or steps[-1]["truncated"]

    text = gymbus(stack, "replay", runs["lake"], "--episode", "299")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"episode 299: return {data['return']:g}, {data['length']} steps" in out
    assert out.count("action ") == data["length"]
    assert out.count("agent at row") == data["length"]
    assert "choice explore" in out or "choice exploit" in out


def test_taxi_replay_shows_the_passenger_and_the_walls(stack: Stack, runs: dict[str, str]) -> None:
    out = gymbus(stack, "replay", runs["taxi"], "--episode", "3").stdout
    assert "+---" in out and "|" in out
    assert "destination" in out and "taxi at row" in out


def test_a_fast_run_says_no_steps_were_stored_and_shows_what_was(
        stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "replay", runs["fast"], "--episode", "10")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ran in fast mode: no steps were stored" in out
    assert "episode 10: return" in out
    for name in ("charts/episodic_return", "charts/episodic_length", "charts/epsilon"):
        assert name in out
    data = replay_json(stack, runs["fast"], 10)
    assert not data["steps_stored"] and "fast mode" in data["reason"]
    metrics = {m["name"]: m for m in data["metrics"]}
    assert metrics["charts/episodic_return"]["n"] == 200
    assert len(metrics["charts/episodic_return"]["curve"]) == 40


def test_a_sampled_run_points_to_an_episode_with_steps(stack: Stack, runs: dict[str, str]) -> None:
    data = replay_json(stack, runs["sampled"], 13)
    assert not data["steps_stored"] and "e.g. episode 10" in data["reason"]
    assert replay_json(stack, runs["sampled"], 10)["steps_stored"]


def test_absent_episodes_and_runs_have_their_exit_codes(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "replay", runs["lake"], "--episode", "300")
    assert result.returncode == 4
    assert "episodes 0 to 299" in result.stderr
    result = gymbus(stack, "replay", "01NOTARUN0000000000000000", "--episode", "0")
    assert result.returncode == 4


def test_with_no_ingest_it_reads_the_file(stack: Stack, runs: dict[str, str]) -> None:
    expected = replay_json(stack, runs["lake"], 7)
    assert stack.stop_one("ingest") == 143  # SIGTERM; the module's last test: the stack goes next
    result = gymbus_cli(stack.process_env({"GYMBUS_REQUEST_TIMEOUT": "0.5"}), "replay",
                        runs["lake"], "--episode", "7", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected
