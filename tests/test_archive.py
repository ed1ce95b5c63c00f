"""Archiving finished runs' step rows to Parquet and back: the store alone on a real DuckDB file,
the real `gymbus archive` / `gymbus restore` through a real ingest process, and that process
killed (SIGKILL) at each stage of an archive or a restore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import zmq
from conftest import gymbus_cli, gymbus_cli_json, wait_until
from test_ingest_service import answers, subscribed

from gymbus.services.ingest.archive import LIVE, PARTS, PAUSE_ENV
from gymbus.services.ingest.client import StoreClient
from gymbus.services.ingest.query import run_query
from gymbus.services.ingest.store import Store
from gymbus.shared.codec import Frame, decode_frame, encode_frame, encode_message
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import Command, ErrorCode, FrameKind
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

DONE, DONE_TOO, LIVE_RUN = "run-done", "run-done-too", "run-live"
#: every step row, in an order that does not depend on where it is stored
ALL_STEPS = ("SELECT run_id, seq, episode, step, action, obs, obs_vec, reward, label FROM steps "
             "ORDER BY run_id, seq, step")


def encoded(kind: FrameKind, run_id: str, seq: int, body: dict[str, Any]) -> tuple[bytes, bytes]:
    return encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="w1")


def run_parts(run_id: str, frames: int = 4, rows: int = 50,
              finished: bool = True) -> list[tuple[bytes, bytes]]:
    """A run's frames: started, `frames` step frames of `rows` rows, completed when finished."""
    parts = [encoded(FrameKind.LIFECYCLE, run_id, 0, {
        "event": "run_started", "config": {"env": "FrozenLake-v1", "algo": "random"}})]
    for seq in range(1, frames + 1):
        vector = seq % 2 == 0
        parts.append(encoded(FrameKind.STEP, run_id, seq, {
            "episode": [seq] * rows, "step": list(range(rows)),
            "action": [i % 4 for i in range(rows)],
            "obs": [[0.5 * i, -1.0] for i in range(rows)] if vector else list(range(rows)),
            "reward": [0.25 * i for i in range(rows)], "terminated": [False] * rows,
            "truncated": [False] * rows, "label": ["explore"] * rows}))
    if finished:
        parts.append(encoded(FrameKind.LIFECYCLE, run_id, frames + 1, {
            "event": "run_completed", "status": "completed", "frames_emitted": frames + 2}))
    return parts


def frames_of(*runs: list[tuple[bytes, bytes]]) -> list[Frame]:
    return [decode_frame(list(p)) for run in runs for p in run]


def rows(conn: duckdb.DuckDBPyConnection, sql: str = ALL_STEPS) -> list[list[Any]]:
    result: list[list[Any]] = run_query(conn, sql, 1_000_000)["rows"]
    return result


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    (tmp_path / "home").mkdir()
    s = Store(tmp_path / "home" / "gymbus.duckdb")
    for frame in frames_of(run_parts(DONE), run_parts(DONE_TOO), run_parts(LIVE_RUN,
                                                                           finished=False)):
        s.add(frame)
    s.flush()
    yield s
    s.close()


def test_archived_rows_read_as_before_everywhere_and_come_back(store: Store) -> None:
    before = rows(store.cursor())
    assert len(before) == 3 * 4 * 50
    reply = store.archive.archive_run(DONE)
    part = store.path.parent / "archive" / "steps" / f"run_id={DONE}" / "part-0.parquet"
    assert (reply["rows"], reply["path"]) == (200, str(part)) and part.is_file()
    db = store.cursor()
    assert db.execute(f"SELECT count(*) FROM {LIVE} WHERE run_id = ?", [DONE]).fetchone() == (0,)
    assert rows(db) == before  # through the view, on the ingest's connection (no external access)
    # a frame arriving after the archive goes to the base table and is seen too
    late = encoded(FrameKind.STEP, LIVE_RUN, 9, {
        "episode": [9], "step": [0], "reward": [1.0], "terminated": [True], "truncated": [False]})
    store.add(decode_frame(list(late)))
    store.flush()
    assert len(rows(store.cursor())) == len(before) + 1
    assert store.archive.archive_run(DONE_TOO)["rows"] == 200
    after = rows(store.cursor())
    store.close()
    # any connection that opens the file, read-only too, sees them through the stored view
    with duckdb.connect(str(store.path), read_only=True) as reader:
        assert rows(reader) == after
        assert reader.execute(f"SELECT count(*) FROM {PARTS}").fetchone() == (2,)

    reopened = Store(store.path)
    try:
        assert rows(reopened.cursor()) == after
        assert reopened.archive.restore_run(DONE)["rows"] == 200
        assert not part.exists()
        assert rows(reopened.cursor()) == after
        reopened.archive.restore_run(DONE_TOO)
        kind = reopened.cursor().execute("SELECT table_type FROM information_schema.tables "
                                         "WHERE table_name = 'steps'").fetchone()
        assert kind == ("BASE TABLE",)  # the last part restored: `steps` is the table again
        assert rows(reopened.cursor()) == after
    finally:
        reopened.close()


def test_only_finished_stored_runs_are_archived(store: Store) -> None:
    with pytest.raises(RequestError) as unfinished:
        store.archive.check_finished(LIVE_RUN)
    assert unfinished.value.code is ErrorCode.BAD_REQUEST and "not finished" in str(unfinished.value)
    with pytest.raises(RequestError) as unknown:
        store.archive.check_finished("no-such-run")
    assert unknown.value.code is ErrorCode.UNKNOWN_RUN
    assert store.archive.finished_before(2**62) == [DONE, DONE_TOO]
    assert store.archive.finished_before(0) == []


# --- through the real ingest process ---------------------------------------------------------------


class Feed:
    """A test-owned XPUB in the broker's place, and the ingest process it feeds."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.xpub.bind(env["GYMBUS_TELEMETRY_OUT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra: str) -> Client:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.ingest"],
                                         env={**os.environ, **self.env, **extra},
                                         stdout=log, stderr=subprocess.STDOUT)
        client = Client(self.env["GYMBUS_INGEST"], "ingest", timeout=10.0, ctx=self.ctx)
        wait_until(lambda: subscribed(self.xpub), timeout=20, what="the ingest's subscription")
        wait_until(lambda: answers(client), timeout=20, what="the ingest to answer ping")
        return client

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        self.xpub.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def feed(gymbus_env: dict[str, str], tmp_path: Path) -> Iterator[Feed]:
    f = Feed(gymbus_env, tmp_path / "ingest.log")
    yield f
    f.close()


def stored(client: Client, sql: str) -> list[list[Any]]:
    result: list[list[Any]] = client.request(Command.QUERY, {"sql": sql})["rows"]
    return result


def fill(feed: Feed, client: Client) -> list[list[Any]]:
    for run in (run_parts(DONE), run_parts(LIVE_RUN, finished=False)):
        for parts in run:
            feed.xpub.send_multipart(list(parts))
    wait_until(lambda: stored(client, "SELECT count(*) FROM frames") == [[11]],
               what="both runs stored")
    return stored(client, ALL_STEPS)


def test_gymbus_archive_and_restore(feed: Feed) -> None:
    client = feed.start()
    before = fill(feed, client)
    env = {**os.environ, **feed.env}
    planned = gymbus_cli_json(env, "archive", "--older-than", "0s", "--dry-run")
    assert planned == {"runs": [{"run_id": DONE}], "dry_run": True}
    done = gymbus_cli(env, "archive", "--older-than", "0s", "--json")
    assert done.returncode == 0, done.stderr
    assert f"archived 1/1: {DONE} (200 step rows)" in done.stderr  # progress on stderr
    assert stored(client, ALL_STEPS) == before
    assert stored(client, f"SELECT count(*) FROM {LIVE} WHERE run_id = '{DONE}'") == [[0]]
    refused = gymbus_cli(env, "archive", LIVE_RUN, "--json")
    assert refused.returncode == 2 and "has not finished" in refused.stdout
    assert gymbus_cli_json(env, "restore", DONE) == {"runs": [{"run_id": DONE, "rows": 200,
                                                               "parts": 1}]}
    assert stored(client, ALL_STEPS) == before


@pytest.mark.slow
def test_gymbus_archive_refuses_what_it_cannot_do(feed: Feed) -> None:
    client = feed.start()
    fill(feed, client)
    env = {**os.environ, **feed.env}
    both = gymbus_cli(env, "archive", "--older-than", "7d", LIVE_RUN)
    assert both.returncode == 2 and "one of the two" in both.stderr
    bad = gymbus_cli(env, "archive", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    unknown = gymbus_cli(env, "restore", "no-such-run", "--json")
    assert unknown.returncode == 4 and "no archived rows" in unknown.stdout
    nothing = gymbus_cli(env, "archive", "--older-than", "7d")
    assert nothing.returncode == 0 and "no finished run to archive" in nothing.stderr


def killed_at(feed: Feed, stage: str) -> None:
    """Fill the store, archive (and, for a restore stage, restore) with the ingest told to
    hold at `stage`, SIGKILL it there, restart it, and check that every step row is there once."""
    restoring = stage.startswith("restore")
    client = feed.start(**({} if restoring else {PAUSE_ENV: stage}))
    before = fill(feed, client)
    cmd = Command.ARCHIVE
    if restoring:
        client.request(Command.ARCHIVE, {"run_ids": [DONE]})
        feed.kill()
        client = feed.start(**{PAUSE_ENV: stage})
        cmd = Command.RESTORE

    asker = feed.ctx.socket(zmq.DEALER)  # a request never answered: the ingest holds, then dies
    asker.setsockopt(zmq.LINGER, 0)
    asker.connect(feed.env["GYMBUS_INGEST"])
    asker.send(encode_message(cmd, {"run_ids": [DONE]}, 1))
    marker = Path(feed.env["GYMBUS_HOME"]) / "archive" / f"paused-{stage}"
    wait_until(marker.exists, timeout=30, what=f"the ingest to hold at {stage}")
    feed.kill()
    asker.close()
    marker.unlink()
    client = feed.start()
    assert stored(client, ALL_STEPS) == before, stage
    live = stored(client, "SELECT count(*) FROM steps_live WHERE run_id = 'run-done'"
                  if stored(client, "SELECT count(*) FROM information_schema.tables WHERE "
                                    "table_name = 'steps_live'") == [[1]]
                  else "SELECT count(*) FROM steps WHERE run_id = 'run-done'")
    parts = stored(client, f"SELECT coalesce(sum(rows), 0) FROM {PARTS}")
    assert live[0][0] + parts[0][0] == 200 and 0 in (live[0][0], parts[0][0]), stage
    files = list((Path(feed.env["GYMBUS_HOME"]) / "archive").rglob("*.parquet*"))
    assert len(files) == (1 if parts[0][0] else 0), (stage, files)


def test_a_kill_inside_the_archive_transaction_loses_and_doubles_nothing(feed: Feed) -> None:
    killed_at(feed, "deleted")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["written", "renamed", "committed", "restored",
                                   "restore_committed"])
def test_a_kill_at_any_stage_loses_and_doubles_nothing(feed: Feed, stage: str) -> None:
    killed_at(feed, stage)


def test_readers_without_an_ingest_see_archived_rows(gymbus_settings: Settings) -> None:
    store = Store(gymbus_settings.db_path)
    for frame in frames_of(run_parts(DONE), run_parts(LIVE_RUN, finished=False)):
        store.add(frame)
    store.flush()
    before = rows(store.cursor())
    store.archive.archive_run(DONE)
    store.close()
    with StoreClient(gymbus_settings, timeout=0.5) as client:  # no ingest: the file, read-only
        assert client.query(ALL_STEPS, 1_000_000)["rows"] == before
        assert not client.ask_ingest
