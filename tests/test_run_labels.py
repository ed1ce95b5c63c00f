"""Labels and honest waiting: `--name` and `--tag` on submit and in run files, the filters of
`gymbus runs` (client and controller side), `status` showing them, `--timeout` bounding a wait
with its own exit code, the notice that no worker is connected, and a registry written before
runs had labels still opening. The stack here has no worker: every run stays queued."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import STACK_ENV, gymbus_cli, stack_fixture

from gymbus.services.controller.registry import Registry
from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import ExitCode, RemoteError
from gymbus.shared.protocol import Command
from gymbus.shared.transport import Client

pytestmark = pytest.mark.integration

stack = stack_fixture("labels", start=lambda s: s.start(("ingest", "broker", "controller")),
                      **STACK_ENV)

LAKE = ["--env", "FrozenLake-v1", "--algo", "q-learning", "--episodes", "5", "--fast"]


def gymbus(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args],
                          env=stack.process_env({"COLUMNS": "200"}), cwd=cwd,
                          capture_output=True, text=True, timeout=90, check=False)


def gymbus_json(stack: Stack, *args: str) -> Any:
    result = gymbus(stack, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def labelled(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three queued runs: one with a name and tags from flags and its run file, two others."""
    folder = tmp_path_factory.mktemp("runfile")
    (folder / "run.toml").write_text('env = "FrozenLake-v1"\nalgo = "q-learning"\nepisodes = 5\n'
                                     'name = "from-file"\n[tags]\nsource = "file"\narm = "a"\n')
    tagged = gymbus_json(stack, "submit", str(folder / "run.toml"), "--name", "lake-labelled",
                         "--tag", "arm=b", "--tag", "lr=0.1")["run_id"]
    plain = gymbus_json(stack, "submit", *LAKE)["run_id"]
    other = gymbus_json(stack, "submit", "--env", "CliffWalking-v1", "--algo", "bdi",
                        "--episodes", "5", "--tag", "arm=c")["run_id"]
    return {"tagged": tagged, "plain": plain, "other": other}


def listed(stack: Stack, *filters: str) -> set[str]:
    return {r["run_id"] for r in gymbus_json(stack, "runs", *filters)}


def test_name_and_tags_come_from_flags_over_the_run_file(stack: Stack,
                                                         labelled: dict[str, str]) -> None:
    record = gymbus_json(stack, "status", labelled["tagged"])
    assert record["name"] == "lake-labelled"
    assert record["tags"] == {"source": "file", "arm": "b", "lr": "0.1"}
    assert record["group"] is None
    text = gymbus(stack, "status", labelled["tagged"]).stdout
    assert "tags  arm=b lr=0.1 source=file" in text and "name  lake-labelled" in text


def test_runs_filters_by_tag_status_env_algo_and_age(stack: Stack,
                                                     labelled: dict[str, str]) -> None:
    tagged, plain, other = labelled["tagged"], labelled["plain"], labelled["other"]
    assert listed(stack, "--tag", "arm=b") == {tagged}
    assert listed(stack, "--tag", "arm=b", "--tag", "lr=0.2") == set()
    assert listed(stack, "--tag", "lr=0.1", "--status", "queued") == {tagged}
    assert {tagged, plain, other} <= listed(stack, "--status", "queued", "--since", "1h")
    assert other not in listed(stack, "--algo", "q-learning") >= {tagged, plain}
    table = gymbus(stack, "runs", "--env", "CliffWalking-v1").stdout.splitlines()
    assert "MEAN RET" in table[0] and len(table) == 2 and table[1].startswith(other)


def test_bad_filters_are_refused(stack: Stack) -> None:
    result = gymbus(stack, "runs", "--since", "yesterday")
    assert result.returncode == ExitCode.BAD_INPUT and "not a duration" in result.stderr
    result = gymbus(stack, "runs", "--tag", "novalue", "--json")
    assert result.returncode == ExitCode.BAD_INPUT
    assert json.loads(result.stdout)["error"]["field"] == "--tag"
    with Client(stack.settings.controller, "controller", timeout=5.0) as client, \
            pytest.raises(RemoteError) as caught:
        client.request(Command.LIST_RUNS, {"filter": {"states": ["sleeping"]}})
    assert "filter.states" in str(caught.value)


def test_the_controller_filters_list_runs_itself(stack: Stack, labelled: dict[str, str]) -> None:
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        runs = client.request(Command.LIST_RUNS, {"filter": {"tags": {"arm": "c"}}})["runs"]
        every = client.request(Command.LIST_RUNS)["runs"]
    assert [r["run_id"] for r in runs] == [labelled["other"]]
    assert runs[0]["tags"] == {"arm": "c"} and runs[0]["group"] == ""
    assert len(every) >= 3


def test_submit_wait_says_no_worker_at_once_and_times_out_with_exit_6(stack: Stack) -> None:
    started = time.monotonic()
    result = gymbus(stack, "submit", *LAKE, "--wait", "--wait-timeout", "2s", "--json")
    assert result.returncode == ExitCode.TIMED_OUT, result.stderr
    assert time.monotonic() - started < 60  # it did not wait for a worker
    assert "no worker is connected" in result.stderr
    assert "still queued after 2s (--wait-timeout)" in result.stderr
    printed = json.loads(result.stdout)
    assert printed["timed_out"] is True and printed["status"] == "queued"


def test_sweep_wait_says_no_worker_at_once_and_times_out_with_exit_6(stack: Stack,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "sweep.toml").write_text(
        'seeds = [0, 1]\n[run]\nenv = "FrozenLake-v1"\nalgo = "q-learning"\nepisodes = 5\n')
    result = gymbus(stack, "sweep", str(tmp_path / "sweep.toml"), "--wait", "--wait-timeout", "1",
                    "--json")
    assert result.returncode == ExitCode.TIMED_OUT, result.stderr
    assert "no worker is connected" in result.stderr and "the sweep's runs stay queued" in \
        result.stderr
    assert "0/2 done, 0 failed, 0 running, 2 queued" in result.stderr
    printed = json.loads(result.stdout)
    assert printed["timed_out"] is True
    assert {r["status"] for r in printed["runs"]} == {"queued"}
    usage = gymbus_cli(stack.process_env(), "sweep", str(tmp_path / "sweep.toml"), "--wait",
                       "--wait-timeout", "0")
    assert usage.returncode == ExitCode.BAD_INPUT and "more than 0 seconds" in usage.stderr


def test_a_registry_from_before_labels_opens_with_its_runs_unlabelled(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, env TEXT NOT NULL,
            algo TEXT NOT NULL, telemetry TEXT NOT NULL, config BLOB NOT NULL,
            state TEXT NOT NULL, created_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL,
            started_ns INTEGER, ended_ns INTEGER, worker_id TEXT, reason TEXT,
            frames_emitted INTEGER, episodes INTEGER, steps INTEGER,
            idempotency_key TEXT UNIQUE, dispatch_failures INTEGER NOT NULL DEFAULT 0,
            last_dispatch_error TEXT);
        PRAGMA user_version = 1;
    """)
    db.execute("INSERT INTO runs (run_id, name, env, algo, telemetry, config, state, created_ns,"
               " updated_ns) VALUES ('old', 'n', 'FrozenLake-v1', 'q-learning', 'full', ?,"
               " 'completed', 1, 1)", (msgpack.packb({"env": "FrozenLake-v1"}),))
    db.commit()
    db.close()
    registry = Registry(path)
    try:
        (old,) = registry.runs()
        assert (old.run_id, old.tags, old.group) == ("old", {}, "")
        assert registry.runs(group="") == [old] and registry.runs(group="g") == []
    finally:
        registry.close()
