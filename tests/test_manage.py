"""`gymbus rm`, `du` and `gc` on a real stack: a run removed from every table, folder and
registry while every other run stays exactly as it was; refusals; disk usage; garbage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gymbus.services.controller.registry import Registry
from gymbus.services.controller.removal import delete_run as delete_record
from gymbus.services.ingest.client import StoreClient
from gymbus.services.ingest.delete import RUN_TABLES, delete_run
from gymbus.services.ingest.store import Store
from gymbus.services.stack.launcher import Stack
from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import Frame, decode_frame, encode_frame
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import Command, ErrorCode, FrameKind, RunState
from gymbus.shared.runconfig import parse_config
from gymbus.shared.transport import Client
from tests.conftest import (
    STACK_ENV,
    gymbus_cli,
    gymbus_cli_json,
    stack_fixture,
    store_query,
    stored_run,
    wait_until,
)

stack = stack_fixture("manage", **STACK_ENV)
#: the tests on the stack: real runs and a dozen CLI calls (~20 s)
on_stack = pytest.mark.integration


def rows_of(stack: Stack, sql: str) -> list[dict[str, Any]]:
    """A read-only statement through the ingest's query API, in this process (faster than
    `store_query`'s `gymbus query`, for the many statements of a snapshot)."""
    with StoreClient(stack.settings) as store:
        return store.rows(sql)


def submit(stack: Stack, *args: str) -> str:
    reply = gymbus_cli_json(stack.process_env(), "submit", "--env", "FrozenLake-v1", "--algo",
                            "q-learning", *args)
    run_id: str = reply["run_id"]
    return run_id


def snapshot(stack: Stack, run_id: str) -> dict[str, Any]:
    """Every row of the run in every table, in a fixed order, and the ingest's accounting."""
    rows = {table: rows_of(stack, f"SELECT * FROM {table} WHERE run_id = '{run_id}' "
                                  "ORDER BY ALL")
            for table in RUN_TABLES}
    with StoreClient(stack.settings) as store:
        rows["run_stats"] = [store.run_stats(run_id)[run_id]]
    return rows


def ingest_stats(stack: Stack) -> dict[str, Any]:
    with Client(stack.settings.ingest, "ingest", 5.0) as client:
        return client.request(Command.INGEST_STATS)


@pytest.fixture(scope="module")
def two_runs(stack: Stack) -> tuple[str, str]:
    """Two completed runs with step rows."""
    first = submit(stack, "--episodes", "40", "--seed", "1")
    second = submit(stack, "--episodes", "30", "--seed", "2")
    for run_id in (first, second):
        stored_run(stack, run_id, timeout=60)
        wait_until(lambda r=run_id: (stack.settings.run_dir(r) / "spool" / "confirmed").exists(),
                   30, f"the spool of {run_id} confirmed")
    return first, second


@on_stack
@pytest.mark.integration
def test_rm_removes_a_run_everywhere_and_leaves_every_other_run_as_it_was(
        stack: Stack, two_runs: tuple[str, str]) -> None:
    gone, kept = two_runs
    assert store_query(stack, f"SELECT count(*) AS n FROM steps WHERE run_id = '{gone}'")[0]["n"]
    before, stats_before = snapshot(stack, kept), ingest_stats(stack)
    assert stack.settings.run_dir(gone).is_dir()

    removed = gymbus_cli_json(stack.process_env(), "rm", gone, "--yes")
    assert [(r["run_id"], r["record"]) for r in removed] == [(gone, True)]
    assert removed[0]["rows"]["steps"] > 0 and removed[0]["rows"]["runs"] == 1

    for table in RUN_TABLES:
        assert rows_of(stack, f"SELECT count(*) AS n FROM {table} "
                              f"WHERE run_id = '{gone}'") == [{"n": 0}], table
    assert not stack.settings.run_dir(gone).exists()
    status = gymbus_cli(stack.process_env(), "status", gone)
    assert status.returncode == 4, status.stdout + status.stderr
    assert gone not in {r["run_id"] for r in gymbus_cli_json(stack.process_env(), "runs")}
    assert snapshot(stack, kept) == before
    stats_after = ingest_stats(stack)
    for key in ("frames_received", "frames_stored", "duplicates", "dead_letters", "rows"):
        assert stats_after[key] == stats_before[key], key
    assert stats_after["runs"] == stats_before["runs"] - 1


@on_stack
@pytest.mark.integration
def test_rm_refuses_a_run_that_has_not_ended_and_removes_nothing(
        stack: Stack, two_runs: tuple[str, str]) -> None:
    busy = submit(stack, "--episodes", "5000000", "--fast")
    try:
        result = gymbus_cli(stack.process_env(), "rm", busy, two_runs[1], "--yes", "--json")
        assert result.returncode == 5, result.stdout + result.stderr
        message = json.loads(result.stdout)["error"]["message"]
        assert busy in message and "cancel them first" in message
        assert gymbus_cli_json(stack.process_env(), "status", two_runs[1])["status"] \
            == "completed"
    finally:
        gymbus_cli(stack.process_env(), "cancel", busy)
    wait_until(lambda: gymbus_cli_json(stack.process_env(), "status", busy)["status"]
               == "cancelled", 30, "the busy run cancelled")


@on_stack
@pytest.mark.integration
def test_rm_asks_first_and_refuses_without_a_terminal(stack: Stack,
                                                      two_runs: tuple[str, str]) -> None:
    result = gymbus_cli(stack.process_env(), "rm", two_runs[1])
    assert result.returncode == 2 and "give --yes" in result.stderr
    missing = gymbus_cli(stack.process_env(), "rm", "01NOSUCHRUN", "--yes")
    assert missing.returncode == 4 and "no run '01NOSUCHRUN'" in missing.stderr
    assert gymbus_cli(stack.process_env(), "rm", "--yes").returncode == 2


@on_stack
@pytest.mark.integration
def test_du_shows_each_run_s_share_and_the_total(stack: Stack,
                                                 two_runs: tuple[str, str]) -> None:
    usage = gymbus_cli_json(stack.process_env(), "du")
    by_run = {r["run_id"]: r for r in usage["runs"]}
    kept = by_run[two_runs[1]]
    rows = sum(rows_of(stack, f"SELECT count(*) AS n FROM {t} WHERE run_id = "
                              f"'{two_runs[1]}'")[0]["n"]
               for t in ("steps", "episodes", "metrics", "lifecycle", "frames", "gaps"))
    assert kept["rows"] == rows and kept["db_bytes"] > 0 and kept["folder_bytes"] > 0
    assert usage["db_file_bytes"] == pytest.approx(sum(r["db_bytes"] for r in usage["runs"]),
                                                   abs=len(usage["runs"]))
    assert usage["total_bytes"] >= usage["db_file_bytes"] + kept["folder_bytes"]
    table = gymbus_cli(stack.process_env(), "du")
    assert table.returncode == 0
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    assert table.stdout.splitlines()[-1].startswith("total")


OFFLINE = """
    import json, gymnasium as gym, gymbus
    with gymbus.run(name="gc-offline") as run:
        env = run.record(gym.make("FrozenLake-v1"))
        for episode in range(5):
            env.reset(seed=episode)
            done = False
            while not done:
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                done = terminated or truncated
    print(json.dumps({"run_id": run.run_id}))
"""


@on_stack
@pytest.mark.integration
def test_gc_removes_confirmed_spools_and_folders_of_no_run(stack: Stack, tmp_path: Path) -> None:
    env = stack.process_env({"GYMBUS_MODE": "offline"})
    made = subprocess.run([sys.executable, "-c", textwrap.dedent(OFFLINE)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    run_id = json.loads(made.stdout.splitlines()[-1])["run_id"]
    folder = stack.settings.run_dir(run_id)
    frames = folder / "spool" / "frames.bin"
    kept = tmp_path / "frames.bin"
    shutil.copy(frames, kept)
    synced = gymbus_cli_json(stack.process_env(), "sync", run_id, timeout=90)
    assert synced[0]["stored"] is True and not frames.exists()
    # as a worker leaves it when it stops after the ingest stored the run, before confirming
    shutil.copy(kept, frames)
    (folder / "spool" / "confirmed").unlink()
    orphan = stack.settings.runs_dir / "01ORPHANFOLDER"
    orphan.mkdir()
    (orphan / "left.txt").write_text("x" * 1000)
    unsynced = stack.settings.runs_dir / "01UNSYNCED"
    shutil.copytree(folder, unsynced)  # an unconfirmed spool of a run nobody knows: kept

    dry = gymbus_cli_json(stack.process_env(), "gc", "--dry-run")
    assert dry["removed"] == []
    assert sorted((i["kind"], i["run_id"]) for i in dry["would_remove"]) == [
        ("folder", "01ORPHANFOLDER"), ("spool", run_id)]
    assert frames.exists() and orphan.exists()

    done = gymbus_cli_json(stack.process_env(), "gc")
    assert sorted((i["kind"], i["run_id"]) for i in done["removed"]) == [
        ("folder", "01ORPHANFOLDER"), ("spool", run_id)]
    assert not frames.exists() and (folder / "spool" / "confirmed").exists()
    assert not orphan.exists() and (unsynced / "spool" / "frames.bin").exists()
    assert stored_run(stack, run_id)["complete"]
    assert gymbus_cli_json(stack.process_env(), "gc", "--dry-run")["would_remove"] == []


@on_stack
@pytest.mark.integration
def test_rm_refuses_when_the_ingest_is_down_and_leaves_the_file_alone(
        stack: Stack, two_runs: tuple[str, str]) -> None:
    stack.stop_one("ingest")
    db = stack.settings.db_path
    before = (db.stat().st_size, db.stat().st_mtime_ns)
    try:
        result = gymbus_cli(stack.process_env({"GYMBUS_REQUEST_TIMEOUT": "1"}), "rm",
                            two_runs[1], "--yes")
        assert result.returncode == 3, result.stdout + result.stderr
        assert "the ingest does not answer" in result.stderr
        assert "never opens the DuckDB file" in result.stderr
        assert (db.stat().st_size, db.stat().st_mtime_ns) == before
        assert stack.settings.run_dir(two_runs[1]).is_dir()
        assert os.path.exists(stack.settings.registry_path)
    finally:
        stack.start_one("ingest")
        stack.wait_ready(("ingest",), 30)
    assert gymbus_cli_json(stack.process_env(), "status", two_runs[1])["status"] == "completed"


# --- the ingest's delete and the controller's, without a stack -----------------------------------


def frames_of(run_id: str, episodes: int) -> list[Frame]:
    """A whole run as the ingest gets it: run_started, steps, episodes, a metric, run_completed."""
    def frame(kind: FrameKind, seq: int, body: dict[str, Any]) -> Frame:
        return decode_frame(list(encode_frame(kind, run_id, seq, body, agent_id="agent-0",
                                              worker_id="w1", ts_ns=1_700_000_000 * 10**9)))
    config = {"env": "FrozenLake-v1", "algo": "q-learning", "seed": 1, "telemetry": "full"}
    out = [frame(FrameKind.LIFECYCLE, 0, {"event": "run_started", "config": config})]
    for e in range(episodes):
        out.append(frame(FrameKind.STEP, len(out), {
            "episode": [e] * 3, "step": [0, 1, 2], "action": [1, 2, 1], "obs": [1, 2, 3],
            "reward": [0.0, 0.0, 1.0], "terminated": [False, False, True],
            "truncated": [False] * 3}))
        out.append(frame(FrameKind.EPISODE, len(out), {
            "episode": [e], "return": [1.0], "length": [3], "terminated": [True],
            "truncated": [False], "ts_ns": [1_700_000_000 * 10**9 + e]}))
    out.append(frame(FrameKind.METRIC, len(out), {"name": ["loss"], "step": [1], "value": [0.5],
                                                  "ts_ns": [1_700_000_000 * 10**9]}))
    out.append(frame(FrameKind.LIFECYCLE, len(out), {
        "event": "run_completed", "status": "completed", "frames_emitted": len(out) + 1,
        "reason": None, "episodes": episodes, "steps": 3 * episodes}))
    return out


def table_rows(store: Store, run_id: str) -> dict[str, list[Any]]:
    cursor = store.cursor()
    try:
        return {t: cursor.execute(f"SELECT * FROM {t} WHERE run_id = ? ORDER BY ALL",
                                  [run_id]).fetchall() for t in RUN_TABLES}
    finally:
        cursor.close()


def test_the_ingest_deletes_one_run_s_rows_and_nothing_of_another(tmp_path: Path) -> None:
    store = Store(tmp_path / "gymbus.duckdb")
    try:
        for f in frames_of("run-a", 4) + frames_of("run-b", 3):
            store.add(f)
        store.flush()
        kept_rows, kept_stats = table_rows(store, "run-b"), store.run_stats("run-b")
        counters = dict(store.counters)
        reply = delete_run(store, {"run_id": "run-a"})
        assert reply["rows"]["steps"] == 12 and reply["rows"]["episodes"] == 4
        assert reply["rows"]["runs"] == 1 and reply["rows"]["frames"] == 11
        assert all(not rows for rows in table_rows(store, "run-a").values())
        assert table_rows(store, "run-b") == kept_rows
        assert store.run_stats("run-b") == kept_stats and store.run_stats("run-a") == []
        assert store.counters == counters
        with pytest.raises(RequestError) as unknown:
            delete_run(store, {"run_id": "run-a"})
        assert unknown.value.code is ErrorCode.UNKNOWN_RUN
        with pytest.raises(RequestError, match="run_id must be a string"):
            delete_run(store, {"run_id": 7})
    finally:
        store.close()
    reopened = Store(tmp_path / "gymbus.duckdb")  # the accounting rebuilt from the file agrees
    try:
        assert set(reopened.runs) == {"run-b"}
        assert reopened.run_stats("run-b") == kept_stats
    finally:
        reopened.close()


def test_the_controller_removes_an_ended_run_s_record_and_folder_only(tmp_path: Path) -> None:
    settings = settings_mod.load({"GYMBUS_HOME": str(tmp_path)})
    registry = Registry(settings.registry_path)
    try:
        config = parse_config({"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 3})
        queued, _ = registry.submit(config)
        ended, _ = registry.submit(config)
        registry.mark_dispatched(ended.run_id, "w1")
        registry.finish(ended.run_id, RunState.COMPLETED)
        for run in (queued, ended):
            settings.run_dir(run.run_id).mkdir(parents=True)
            (settings.run_dir(run.run_id) / "result.json").write_text("{}")
        with pytest.raises(RequestError, match="is queued: cancel it first") as refused:
            delete_record(registry, settings, {"run_id": queued.run_id})
        assert refused.value.code is ErrorCode.RUN_ACTIVE
        assert registry.get(queued.run_id) is not None
        assert settings.run_dir(queued.run_id).is_dir()
        assert registry.delete(queued.run_id) is False
        reply = delete_record(registry, settings, {"run_id": ended.run_id})
        assert reply["record"] is True and reply["folder_bytes"] == 2
        assert registry.get(ended.run_id) is None
        assert not settings.run_dir(ended.run_id).exists()
        with pytest.raises(RequestError) as unknown:
            delete_record(registry, settings, {"run_id": ended.run_id})
        assert unknown.value.code is ErrorCode.UNKNOWN_RUN
        assert delete_record(registry, settings, {"run_id": ended.run_id, "missing_ok": True}) \
            == {"run_id": ended.run_id, "record": False, "folder": None, "folder_bytes": 0}
        with pytest.raises(RequestError, match="is not a run id"):
            delete_record(registry, settings, {"run_id": "../x", "missing_ok": True})
    finally:
        registry.close()
