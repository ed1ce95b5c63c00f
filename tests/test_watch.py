"""`gymbus watch`: the terminal dashboard, drawn once (`--once`) or followed to the end, on a stack."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import gymbus_cli, stack_fixture, wait_until
from test_live import VIEWER_ENV, stored, submit

from gymbus.services.stack.launcher import Stack
from gymbus.services.viewers.watch import curve_lines

pytestmark = pytest.mark.integration


stack = stack_fixture("watch", **VIEWER_ENV)


@pytest.fixture(scope="module")
def runs(stack: Stack) -> dict[str, str]:
    """A finished Taxi run (full telemetry) and a finished fast-mode FrozenLake run."""
    made = {"taxi": submit(stack, env="Taxi-v4", episodes=200),
            "fast": submit(stack, env="FrozenLake-v1", episodes=300, telemetry="fast")}
    for run_id in made.values():
        wait_until(lambda r=run_id: stored(stack, r).get("complete"), 60, "the runs to be stored")
    return made


def gymbus(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({"COLUMNS": "160"}), *args, timeout=timeout)


def test_once_prints_one_frame_of_every_run(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", "--once", runs["taxi"], runs["fast"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in ("RUN", "STATE", "EPISODES", "STEPS/S", "LAST RET", "MEAN RET", "STORED",
                   "GAPS", "MISSED"):
        assert header in out
    lines = {run: next(line for line in out.splitlines() if runs[run][-10:] in line)
             for run in runs}
    assert "Taxi-v4" in lines["taxi"] and "completed" in lines["taxi"]
    assert " 200 " in lines["taxi"] and "fast" in lines["fast"] and " 300 " in lines["fast"]
    assert f"returns of {runs['taxi']}" in out  # the first named run is selected
    assert "board: Taxi-v4" in out and "destination" in out  # its last stored step, drawn
    assert "+---" in out  # Taxi's walls
    assert "viewer:" in out and "missed 0" in out


def test_once_prints_at_120_columns_off_a_terminal_or_at_columns(stack: Stack,
                                                                 runs: dict[str, str]) -> None:
    env = {k: v for k, v in stack.process_env().items() if k != "COLUMNS"}
    for columns, width in ((None, 120), ("80", 80)):
        result = gymbus_cli({**env, "COLUMNS": columns} if columns else env, "watch", "--once",
                            runs["taxi"], runs["fast"], timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) == width, result.stdout
        for run_id, episodes in ((runs["taxi"], "200"), (runs["fast"], "300")):
            row = next(line for line in lines if run_id[-8:] in line)
            assert f" {episodes} " in row and "completed" in row, row
        print(f"--- gymbus watch --once at {width} columns\n{result.stdout}")


def test_once_json_matches_what_is_stored(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", "--once", "--json", runs["taxi"])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (run,) = data["runs"]
    stats = stored(stack, runs["taxi"])
    assert run["run_id"] == runs["taxi"] and run["state"] == "completed"
    assert run["episodes"] == stats["episodes"] == 200
    assert run["frames_stored"] == run["held"] == run["frames_emitted"] == stats["frames_emitted"]
    assert run["from_store"] == run["held"] and run["live"] == 0  # all from the snapshot
    assert run["mean_return"] is not None
    assert data["viewer"]["missed"] == 0


def test_until_done_follows_a_run_live_to_its_end(stack: Stack) -> None:
    run_id = submit(stack, env="FrozenLake-v1", episodes=3000)
    result = gymbus(stack, "watch", run_id, "--until-done", "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] == "completed" and run["episodes"] == 3000
    assert run["held"] == run["frames_emitted"]
    assert run["live"] > 0 and run["missed"] == 0
    # joined a little late: what came before its first live frame is from the store
    assert run["live"] + run["from_store"] == run["frames_emitted"]


def test_the_live_dashboard_draws_until_done(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", runs["fast"], "--until-done")
    assert result.returncode == 0, result.stderr
    assert runs["fast"][-10:] in result.stdout and "fast mode: no steps" in result.stdout


def test_an_unknown_run_exits_4(stack: Stack) -> None:
    result = gymbus(stack, "watch", "--once", "01NOTARUN0000000000000000")
    assert result.returncode == 4
    assert "01NOTARUN0000000000000000" in result.stderr


def test_the_return_curve_is_drawn_in_blocks() -> None:
    lines = curve_lines([0.0, 1.0, 2.0, 3.0], width=4, height=2)
    assert lines == ["  ▃█", "▁▆██"]  # 1, 6, 11 and 16 eighths of two rows
    assert curve_lines(list(map(float, range(1000))), width=50, height=8)[0].endswith("█")
    assert len(curve_lines([1.0] * 10, width=5, height=3)) == 3
    assert curve_lines([], 10) == []

