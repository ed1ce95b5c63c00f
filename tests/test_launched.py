"""Launched scripts (`gymbus submit --command`): a user's own recorded script run by a real worker
of a real stack, its `gymbus.run()` attached to the submitted run.

The run's state follows the script's process: exit 0 after its run ended is `completed`; an
exception is `failed` with its line as the reason; an exit without ending the run is `failed`;
a cancel stops the script's whole process group within 2 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STACK_ENV, make_stack, store_query, stored_run, wait_until

from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import ExitCode
from gymbus.shared.protocol import Command
from gymbus.shared.transport import Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose worker finds this interpreter as `python` (the one gymbus is installed in)."""
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    with make_stack(tmp_path_factory.mktemp("launched") / "home", **STACK_ENV, PATH=path) as s:
        s.start()
        yield s


def submit(stack: Stack, folder: Path, *args: str, wait: bool = True,
           as_json: bool = True) -> tuple[int, Any, str]:
    """The real `gymbus submit ...`, from `folder`: (exit code, JSON printed, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "gymbus.services.cli", "submit", *args, *(["--wait"] if wait else []),
         *(["--json"] if as_json else [])], env=stack.process_env(), cwd=folder,
        capture_output=True, text=True, timeout=120, check=False)
    printed = json.loads(result.stdout) if as_json and result.stdout.strip() else None
    return result.returncode, printed, result.stderr


def write_script(folder: Path, code: str, name: str = "train.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(code))
    return path


def count(stack: Stack, table: str, run_id: str) -> int:
    rows = store_query(stack, f"SELECT count(*) AS n FROM {table} WHERE run_id = '{run_id}'")
    return int(rows[0]["n"])


def run_record(stack: Stack, run_id: str) -> dict[str, Any]:
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        run: dict[str, Any] = client.request(Command.GET_RUN, {"run_id": run_id})["run"]
    return run


RANDOM_CARTPOLE = """
    import json, os, gymnasium as gym, gymbus
    with gymbus.run(name="random-cartpole", config={"env": "CartPole-v1"}) as run:
        env = run.record(gym.make("CartPole-v1"))
        obs, info = env.reset(seed=1)
        for t in range(200):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, info = env.reset()
    print(json.dumps({"run_id": run.run_id, "cwd": os.getcwd(),
                      "worker_id": os.environ["GYMBUS_WORKER_ID"],
                      "run_dir": os.environ["GYMBUS_RUN_DIR"], "mode": run.mode.value}))
"""


def printed_by(stack: Stack, run_id: str) -> dict[str, Any]:
    """The JSON line the script printed, from its run folder's run.log."""
    text = (stack.settings.run_dir(run_id) / "run.log").read_text()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    printed: dict[str, Any] = json.loads(lines[-1])
    return printed


def test_a_recorded_script_completes_with_every_step_stored(stack: Stack, tmp_path: Path) -> None:
    write_script(tmp_path, RANDOM_CARTPOLE)
    code, printed, stderr = submit(stack, tmp_path, "--command", "python train.py --seed 1",
                                   "--name", "launched")
    assert code == 0, stderr
    run_id = printed["run_id"]
    assert printed["status"] == "completed" and printed["reason"] is None
    row = stored_run(stack, run_id)
    assert row["steps"] == 200 and count(stack, "steps", run_id) == 200
    seen = printed_by(stack, run_id)  # the script's print, in run.log
    assert seen["run_id"] == run_id  # its gymbus.run() attached to the submitted run
    assert seen["cwd"] == str(tmp_path)  # where it was submitted from
    assert seen["run_dir"] == str(stack.settings.run_dir(run_id))
    record = run_record(stack, run_id)
    assert seen["worker_id"] == record["worker_id"]
    assert record["algo"] == "command" and record["config"]["command"] == [
        "python", "train.py", "--seed", "1"]
    assert (record["steps"], record["state"]) == (200, "completed")


def test_a_run_submitted_fast_stores_no_steps_though_the_script_asks_for_all(
    stack: Stack, tmp_path: Path,
) -> None:
    write_script(tmp_path, RANDOM_CARTPOLE)
    code, printed, stderr = submit(stack, tmp_path, "--command", "python train.py", "--fast")
    assert code == 0 and printed["status"] == "completed", stderr
    run_id = printed["run_id"]
    row = stored_run(stack, run_id)
    assert printed_by(stack, run_id)["mode"] == "fast" and row["telemetry"] == "fast"
    assert count(stack, "steps", run_id) == 0  # no step frames were built
    lengths = store_query(stack, f"SELECT sum(length) AS n FROM episodes WHERE run_id = '{run_id}'")
    assert lengths[0]["n"] == 200  # its episodes were, with every step it took


@pytest.mark.parametrize("code", [
    """
    import gymnasium as gym, gymbus
    with gymbus.run(name="breaks") as run:
        env = run.record(gym.make("CartPole-v1"))
        env.reset(seed=0)
        for t in range(5):
            env.step(0)
        raise ValueError("the loop broke at step 5")
    """,
    """
    import gymbus
    print("setting up")
    raise ValueError("the loop broke at step 5")  # before any run was opened
    """,
], ids=["inside-the-run", "before-the-run"])
def test_a_script_that_raises_fails_with_the_exception_line(
    stack: Stack, tmp_path: Path, code: str,
) -> None:
    write_script(tmp_path, code)
    exit_code, printed, stderr = submit(stack, tmp_path, "--command", "python train.py")
    assert exit_code == ExitCode.RUN_NOT_COMPLETED, stderr
    assert printed["status"] == "failed"
    assert printed["reason"] == "ValueError: the loop broke at step 5"


def test_a_script_that_exits_without_ending_its_run_fails(stack: Stack, tmp_path: Path) -> None:
    write_script(tmp_path, """
        import os, gymnasium as gym, gymbus
        with gymbus.run(name="vanishes") as run:
            env = run.record(gym.make("CartPole-v1"))
            env.reset(seed=0)
            env.step(0)
            os._exit(0)
    """)
    exit_code, printed, stderr = submit(stack, tmp_path, "--command", "python train.py")
    assert exit_code == ExitCode.RUN_NOT_COMPLETED, stderr
    assert (printed["status"], printed["reason"]) == ("failed", "exited without ending its run")


FOREVER = """
    import os, signal, subprocess, sys, gymnasium as gym, gymbus
    # a process of its own that ignores SIGTERM: only the group's SIGKILL ends it
    helper = subprocess.Popen([sys.executable, "-c", "import signal; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"])
    if sys.argv[1] == "ignores-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with gymbus.run(name="forever") as run:
        env = run.record(gym.make("CartPole-v1"))
        env.reset(seed=0)
        with open("pids.tmp", "w") as f:
            f.write(f"{os.getpid()} {helper.pid}")
        os.replace("pids.tmp", "pids")
        while True:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
"""


def group_alive(pgid: int) -> list[int]:
    """Processes of process group `pgid` that have not exited (zombies count as exited)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


@pytest.mark.parametrize("behaviour", ["steps", "ignores-sigterm"])
def test_cancel_ends_the_script_and_its_process_group_within_2_s(
    stack: Stack, tmp_path: Path, behaviour: str,
) -> None:
    """SIGTERM stops a recording script at its next step; one that ignores SIGTERM is killed
    when the grace ends; either way nothing of its process group is left."""
    write_script(tmp_path, FOREVER)
    exit_code, printed, stderr = submit(stack, tmp_path, "--command",
                                        f"python train.py {behaviour}", wait=False)
    assert exit_code == 0, stderr
    run_id = printed["run_id"]
    pids = wait_until(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text(),
                      30, "the script to start its loop")
    script_pid, helper_pid = map(int, pids.split())
    assert helper_pid in group_alive(script_pid)
    started = time.monotonic()
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        client.request(Command.CANCEL, {"run_id": run_id})
    wait_until(lambda: not group_alive(script_pid), 2.0, "the script's process group to end")
    assert time.monotonic() - started < 2.0
    record = wait_until(lambda: (r := run_record(stack, run_id))["state"] != "running" and r,
                        5, "the run to end")
    assert record["state"] == "cancelled"
    if behaviour == "steps":
        assert record["reason"] == "stopped by the worker (SIGTERM)"  # the run ended itself
    else:
        assert record["reason"] == "stopped (exit code -9)"


@pytest.mark.parametrize(("run_file", "message"), [
    ('command = ""\n', "command: is empty"),
    ("command = []\n", "command: is empty"),
    ("command = 5\n", "command: expected a list of strings"),
    ('command = ["python", 3]\n', "command: expected a list of strings"),
    ('command = "python x.py"\nepisodes = 3\n', "episodes: does not apply to a command run"),
])
def test_a_bad_command_is_refused_naming_the_field(
    stack: Stack, tmp_path: Path, run_file: str, message: str,
) -> None:
    (tmp_path / "run.toml").write_text(run_file)
    exit_code, _, stderr = submit(stack, tmp_path, str(tmp_path / "run.toml"), wait=False,
                                  as_json=False)
    assert exit_code == ExitCode.BAD_INPUT
    assert message in stderr


def test_a_program_that_cannot_start_fails_the_run_at_once(stack: Stack, tmp_path: Path) -> None:
    exit_code, printed, stderr = submit(stack, tmp_path, "--command", "no-such-program --seed 1")
    assert exit_code == ExitCode.RUN_NOT_COMPLETED, stderr
    assert printed["status"] == "failed"
    assert printed["reason"] == (f"could not start 'no-such-program' in {tmp_path}: "
                                 "No such file or directory")
