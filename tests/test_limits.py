"""Resource limits: `cpus`, `memory`, `gpus` and `timeout` of a run, validated, placed by the
controller where they fit, and held by the worker (affinity, a memory cgroup or RLIMIT_AS,
CUDA_VISIBLE_DEVICES, a deadline on the process group).

The unit tests drive the parsing, the placement and a worker's allocations directly, with real
child processes for the memory limits; the rest runs real command runs through a real stack
whose worker says it has 2 cpus, 4 GiB and no GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STACK_ENV, gymbus_cli, gymbus_cli_json, make_stack, wait_until

from gymbus.services.controller.placement import Resources, unplaceable
from gymbus.services.controller.scheduler import Scheduler, WorkerView
from gymbus.services.stack.launcher import Stack
from gymbus.shared.config_values import format_duration, format_size
from gymbus.shared.errors import ConfigError, ExitCode
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.runconfig import parse_config
from gymbus.shared.transport import Client
from gymbus.worker.child import LOG_FILE
from gymbus.worker.limits import Capacity, MemoryCgroups, RunLimits

MiB = 2**20
BASE = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 1}
#: allocates (and touches) 400 MiB: past a 200 MiB limit under a cgroup and under RLIMIT_AS
ALLOCATE = "b = bytearray(400 * 2**20); print('allocated', len(b))"


# --- the fields -----------------------------------------------------------------------------------


def test_limit_fields_parse_from_strings_and_numbers() -> None:
    config = parse_config({**BASE, "cpus": 2, "memory": "2GiB", "gpus": 0, "timeout": "30m"})
    assert (config.cpus, config.memory, config.gpus, config.timeout) == (2, 2 * 2**30, 0, 1800.0)
    assert parse_config(config.to_dict()) == config  # the wire form reads back the same
    assert parse_config({**BASE, "memory": 1500 * 10**6, "timeout": 90}).memory == 1500 * 10**6
    assert parse_config({**BASE, "memory": "512M", "timeout": "1h30m"}).timeout == 5400.0
    command_run = parse_config({"command": ["python", "x.py"], "memory": "200MiB", "cpus": 1})
    assert (command_run.memory, command_run.cpus) == (200 * MiB, 1)
    assert parse_config(BASE).cpus is None  # no limit given: none enforced


@pytest.mark.parametrize(("field", "value", "says"), [
    ("memory", "lots", "expected a size such as 512MiB"),
    ("memory", 0, "more than 0 bytes"),
    ("memory", "2 parsecs", "expected a size"),
    ("cpus", -1, "must be > 0"),
    ("cpus", 1.5, "expected an integer"),
    ("gpus", -1, "must be >= 0"),
    ("timeout", "soon", "expected a duration such as 90s"),
    ("timeout", -3, "more than 0 seconds"),
])
def test_a_bad_limit_is_an_error_naming_its_field(field: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, field: value})
    assert caught.value.field == field and says in caught.value.message


def test_sizes_and_durations_read_as_people_write_them() -> None:
    assert [format_size(n) for n in (2 * 2**30, 200 * MiB, 3 * 2**29, 512)] == [
        "2 GiB", "200 MiB", "1.5 GiB", "512 B"]
    assert [format_duration(s) for s in (1800, 2, 5400, 0.5)] == ["30m", "2s", "1h30m", "0.5s"]


# --- placement ------------------------------------------------------------------------------------


def view(worker_id: str, slots: int, capacity: dict[str, int] | None) -> WorkerView:
    record: dict[str, Any] = {"worker_id": worker_id, "slots": slots, "busy": 0, "runs": []}
    if capacity is not None:
        record["capacity"] = capacity
    return WorkerView(worker_id, slots, 0, frozenset(), record)


def test_a_run_that_fits_no_worker_says_what_it_needs_and_what_the_largest_has() -> None:
    small = {"a": Resources(2, 4 * 2**30, 0), "b": Resources(1, 8 * 2**30, 0)}
    assert unplaceable(Resources(cpus=4), small) == "needs 4 cpus; the largest worker has 2"
    assert unplaceable(Resources(memory=16 * 2**30), small) == (
        "needs 16 GiB memory; the largest worker has 8 GiB")
    assert unplaceable(Resources(gpus=1), small) == "needs 1 gpu; the largest worker has 0"
    assert unplaceable(Resources(2, 8 * 2**30, 0), small) == (
        "needs 2 cpus, 8 GiB memory on one worker; no worker has all of them")
    assert unplaceable(Resources(cpus=2), small) is None
    assert unplaceable(Resources(cpus=2), {}) is None  # no worker at all: the CLI says so


def test_the_scheduler_places_a_run_where_its_resources_are_left() -> None:
    s = Scheduler(interval=1.0, liveness=3)
    s.update_view([view("a", 4, {"cpus": 2, "memory": 2**30, "gpus": 0}),
                   view("b", 2, {"cpus": 8, "memory": 2**30, "gpus": 1}),
                   view("old", 9, None)], now=0.0)
    # b's 8 cores are half taken by a run already on it
    placement = s.placement([("b", {"cpus": 4}), (None, {"cpus": 64})])
    asked = Resources.asked({"cpus": 4})
    assert s.pick_worker(lambda w: placement.fits(w, asked)) == "b"
    placement.placed("r1", "b", {"cpus": 4})
    assert s.pick_worker(lambda w: placement.fits(w, asked)) is None  # b's cores are all taken
    placement.wait("r2", {"cpus": 4})
    gpu = Resources.asked({"gpus": 1})
    assert s.pick_worker(lambda w: placement.fits(w, gpu)) == "b"
    assert s.pick_worker(lambda w: placement.fits(w, Resources())) == "old"  # most free slots
    placement.wait("r3", {"cpus": 16})
    s.settle(placement, ["r1", "r2", "r3"])
    assert s.waiting == {"r2": "waiting for a worker with 4 cpus free",
                         "r3": "needs 16 cpus; the largest worker has 8"}
    queued = {"run_id": "r3", "state": RunState.QUEUED.value, "reason": None}
    assert s.annotate(queued)["reason"] == "needs 16 cpus; the largest worker has 8"
    assert s.annotate({**queued, "state": RunState.RUNNING.value})["reason"] is None
    s.settle(s.placement([]), ["r3"])  # r2 was cancelled: its reason goes
    assert list(s.waiting) == ["r3"]


def test_the_worker_hands_out_distinct_cores_and_gpus_and_refuses_what_it_lacks(
        tmp_path: Path) -> None:
    limits = RunLimits(Capacity((0, 1, 2), 2**30, ("3", "5")), cgroups=None)
    two = parse_config({**BASE, "cpus": 2, "gpus": 1, "memory": "512MiB"})
    first = limits.allocate("r1", two, tmp_path)
    assert len(first.cores) == 2 and first.gpus == ("3",)
    assert first.env()["CUDA_VISIBLE_DEVICES"] == "3" and first.env()["OMP_NUM_THREADS"] == "2"
    assert limits.refusal(two) == "needs 2 cpus; 1 free on this worker"
    one = limits.allocate("r2", parse_config({**BASE, "cpus": 1, "gpus": 0}), tmp_path)
    assert one.cores.isdisjoint(first.cores) and one.env()["CUDA_VISIBLE_DEVICES"] == ""
    assert limits.refusal(parse_config({**BASE, "memory": "1GiB"})) == (
        "needs 1 GiB memory; 512 MiB free on this worker")
    assert limits.refusal(parse_config({**BASE, "gpus": 3})) == "needs 3 gpus; this worker has 2"
    assert limits.finish("r1", RunState.COMPLETED, None) == (RunState.COMPLETED, None)
    assert limits.refusal(two) is None  # r1's cores, GPU and memory are free again


def test_capacity_is_detected_and_overridden_by_the_worker_variables() -> None:
    real = Capacity.detect({})
    assert len(real.cores) == len(os.sched_getaffinity(0)) and real.memory > 0
    assert Capacity.detect({"CUDA_VISIBLE_DEVICES": "0,1"}).gpus == ("0", "1")
    assert Capacity.detect({"CUDA_VISIBLE_DEVICES": ""}).gpus == ()
    given = Capacity.detect({"GYMBUS_WORKER_CPUS": "3", "GYMBUS_WORKER_MEMORY": "4GiB",
                             "GYMBUS_WORKER_GPUS": "2"})
    assert given.to_wire() == {"cpus": 3, "memory": 4 * 2**30, "gpus": 2}
    assert set(given.cores) <= os.sched_getaffinity(0)
    with pytest.raises(ConfigError, match="GYMBUS_WORKER_MEMORY"):
        Capacity.detect({"GYMBUS_WORKER_MEMORY": "plenty"})


# --- memory limits on real processes --------------------------------------------------------------


def run_over_memory(limits: RunLimits, run_dir: Path) -> tuple[int, tuple[RunState, str | None]]:
    """Run ALLOCATE under a 200 MiB limit as the daemon would: (exit code, judged outcome)."""
    allocation = limits.allocate("r-mem", parse_config({**BASE, "memory": "200MiB"}), run_dir)
    with open(run_dir / LOG_FILE, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", ALLOCATE], stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=allocation.preexec())  # noqa: PLW1509
        code = process.wait(timeout=60)
    return code, limits.finish("r-mem", RunState.FAILED, f"exited with code {code}")


def test_rlimit_as_stops_a_run_past_its_memory_and_says_so(tmp_path: Path) -> None:
    limits = RunLimits(Capacity((0,), 2**33, ()), cgroups=None)
    code, outcome = run_over_memory(limits, tmp_path)
    assert code == 1 and "MemoryError" in (tmp_path / LOG_FILE).read_text()
    assert outcome == (RunState.FAILED, "memory limit 200 MiB exceeded")


def test_a_memory_cgroup_kills_a_run_past_its_memory_and_is_removed(tmp_path: Path) -> None:
    cgroups = MemoryCgroups.find(os.environ)
    if cgroups is None:
        pytest.skip("no memory cgroup can be made here (RLIMIT_AS is tested above)")
    limits = RunLimits(Capacity((0,), 2**33, ()), cgroups)
    folder = cgroups.parent / "gymbus-r-mem"
    code, outcome = run_over_memory(limits, tmp_path)
    assert code == -9  # the kernel's OOM killer, inside the run's cgroup
    assert outcome == (RunState.FAILED, "memory limit 200 MiB exceeded")
    wait_until(lambda: (limits.enforce(0.0), not folder.exists())[1], 10, "run cgroup removed")


# --- through the real stack -----------------------------------------------------------------------

AFFINITY = """
    import json, os, gymbus
    with gymbus.run(name="affinity"):
        pass
    print(json.dumps({"cores": sorted(os.sched_getaffinity(0)),
                      "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""
#: waits for a signal, with a process of its own in its group, until the timeout stops both
#: (each ends by itself after 120 s: SIGALRM's default action)
SLEEPER = """
    import pathlib, signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal; signal.alarm(120); signal.pause()"])
    pathlib.Path("grandchild.pid").write_text(str(child.pid))
    signal.alarm(120)
    signal.pause()
"""
#: holds its run (and its cores) until the file `release` appears
HOLDER = """
    import pathlib, time, gymbus
    with gymbus.run(name="holder"):
        deadline = time.monotonic() + 60
        while not pathlib.Path("release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # poll for the file, until the deadline above
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose one worker offers 2 cpus, 4 GiB and no GPUs, and finds this interpreter
    as `python`."""
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    with make_stack(tmp_path_factory.mktemp("limits") / "home", **STACK_ENV, PATH=path,
                    GYMBUS_WORKER_CPUS="2", GYMBUS_WORKER_MEMORY="4GiB",
                    GYMBUS_WORKER_GPUS="0") as s:
        s.start()
        yield s


def submit(stack: Stack, folder: Path, script: str, *args: str) -> tuple[int, dict[str, Any]]:
    """`gymbus submit --command "python script.py" ARGS --json` from `folder`."""
    (folder / "script.py").write_text(textwrap.dedent(script))
    result = subprocess.run(
        [sys.executable, "-m", "gymbus.services.cli", "submit", "--command", "python script.py",
         *args, "--json"], env=stack.process_env(), cwd=folder, capture_output=True, text=True,
        timeout=120, check=False)
    assert result.stdout.strip(), result.stderr
    printed: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, printed


def status(stack: Stack, run_id: str) -> dict[str, Any]:
    """The controller's record of the run, as `gymbus status` reads it (without a process)."""
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        run: dict[str, Any] = client.request(Command.GET_RUN, {"run_id": run_id})["run"]
    return {**run, "status": run["state"]}


def test_the_worker_advertises_its_capacity(stack: Stack) -> None:
    records = gymbus_cli_json(stack.process_env(), "workers")
    assert [r["capacity"] for r in records] == [{"cpus": 2, "memory": 4 * 2**30, "gpus": 0}]


def test_a_run_that_fits_no_worker_stays_queued_saying_why(stack: Stack, tmp_path: Path) -> None:
    code, printed = submit(stack, tmp_path, AFFINITY, "--cpus", "4")
    assert code == 0
    run_id = printed["run_id"]
    wait_until(lambda: status(stack, run_id)["reason"], 10, "a reason")
    record = gymbus_cli_json(stack.process_env(), "status", run_id)
    assert record["status"] == "queued"
    assert record["reason"] == "needs 4 cpus; the largest worker has 2"
    listed = {r["run_id"]: r for r in gymbus_cli_json(stack.process_env(), "runs")}
    assert listed[run_id]["reason"] == "needs 4 cpus; the largest worker has 2"
    assert gymbus_cli(stack.process_env(), "cancel", run_id).returncode == 0


def test_a_run_is_pinned_to_its_cores_and_sees_only_its_gpus(stack: Stack, tmp_path: Path) -> None:
    code, printed = submit(stack, tmp_path, AFFINITY, "--cpus", "1", "--gpus", "0", "--wait")
    assert code == 0 and printed["status"] == "completed", printed
    log = stack.settings.run_dir(printed["run_id"]) / LOG_FILE
    seen = json.loads(log.read_text().strip().splitlines()[-1])
    assert len(seen["cores"]) == 1 and set(seen["cores"]) <= os.sched_getaffinity(0)
    assert seen["cuda"] == ""


def test_a_run_waits_while_the_runs_on_the_worker_hold_its_cores(stack: Stack,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = submit(stack, tmp_path / "a", HOLDER, "--cpus", "2")
    wait_until(lambda: status(stack, first["run_id"])["status"] == "running", 20, "first running")
    _, second = submit(stack, tmp_path / "b", AFFINITY, "--cpus", "2")
    waiting = wait_until(lambda: (r := status(stack, second["run_id"]))["reason"] and r, 10,
                         "the second run's reason")
    assert waiting["status"] == "queued"  # a free slot, but not the cores
    assert waiting["reason"] == "waiting for a worker with 2 cpus free"
    (tmp_path / "a" / "release").touch()
    wait_until(lambda: status(stack, second["run_id"])["status"] == "completed", 30,
               "the second run completed once the first let its cores go")
    assert status(stack, first["run_id"])["status"] == "completed"


def test_a_run_past_its_time_fails_with_its_whole_process_group_stopped(
        stack: Stack, tmp_path: Path) -> None:
    code, printed = submit(stack, tmp_path, SLEEPER, "--timeout", "2s", "--wait")
    assert code == ExitCode.RUN_NOT_COMPLETED
    assert (printed["status"], printed["reason"]) == ("failed", "timeout 2s")
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    wait_until(lambda: not alive(grandchild), 10, "the script's own child stopped too")


def test_a_run_past_its_memory_fails_saying_so(stack: Stack, tmp_path: Path) -> None:
    code, printed = submit(stack, tmp_path, ALLOCATE, "--memory", "200MiB", "--wait")
    assert code == ExitCode.RUN_NOT_COMPLETED
    assert (printed["status"], printed["reason"]) == ("failed", "memory limit 200 MiB exceeded")


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_without_a_cgroup_a_run_past_its_memory_fails_saying_so(tmp_path: Path) -> None:
    """The RLIMIT_AS fallback through a stack of its own, whose worker makes no cgroups."""
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    with make_stack(tmp_path / "home", **STACK_ENV, PATH=path, GYMBUS_WORKER_CGROUP="none") as s:
        s.start()
        code, printed = submit(s, tmp_path, ALLOCATE, "--memory", "200MiB", "--wait")
        assert "memory limits by RLIMIT_AS" in (s.settings.home / "logs" / "worker.log").read_text()
        log = (s.settings.run_dir(printed["run_id"]) / LOG_FILE).read_text()
    assert code == ExitCode.RUN_NOT_COMPLETED and "MemoryError" in log
    assert (printed["status"], printed["reason"]) == ("failed", "memory limit 200 MiB exceeded")
