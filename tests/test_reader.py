"""The Python reader (`gymbus.store()`, `gymbus.steps()` ...) and docs/data.md, on a real DuckDB
file written by the ingest's Store from real Gymnasium episodes: read through a real ingest
process (its Arrow replies), then from the file read-only once the ingest is stopped."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from conftest import make_stack
from recorded_runs import BUILT, build_store

import gymbus
from gymbus.services.ingest.client import StoreClient
from gymbus.services.ingest.export import export_tables
from gymbus.services.stack.launcher import Stack
from gymbus.shared import schema
from gymbus.shared.errors import NotFound, RemoteError

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An ingest serving a file of the runs of BUILT; GYMBUS_* set for the reader."""
    home = tmp_path_factory.mktemp("reader") / "home"
    with make_stack(home, GYMBUS_REQUEST_TIMEOUT="2") as s, pytest.MonkeyPatch.context() as mp:
        home.mkdir(parents=True, exist_ok=True)
        build_store(s.settings.db_path)
        s.start(("ingest",))
        for key, value in s.env.items():
            mp.setenv(key, value)
        yield s


def test_the_reader_returns_frames_and_arrow_tables(stack: Stack) -> None:
    runs = gymbus.runs()
    assert isinstance(runs, pd.DataFrame)
    assert sorted(runs["run_id"]) == sorted(BUILT)
    table = gymbus.runs(arrow=True)
    assert isinstance(table, pa.Table) and table.num_rows == len(BUILT)
    episodes = gymbus.episodes("lake")
    assert list(episodes["episode"]) == list(range(300))
    assert list(episodes["seed"]) == [3000 + i for i in range(300)]
    assert len(gymbus.episodes()) == sum(b[2] for b in BUILT.values())
    metrics = gymbus.metrics("cart-1")
    assert list(metrics["value"]) == [1.0 / (i + 1) for i in range(12)]


def test_steps_of_a_run_and_of_one_episode_in_order(stack: Stack) -> None:
    lengths = gymbus.episodes("cart-2").set_index("episode")["length"]
    steps = gymbus.steps("cart-2")
    assert len(steps) == lengths.sum()
    assert list(steps[["episode", "step"]].itertuples(index=False, name=None)) == \
        [(e, s) for e, n in lengths.items() for s in range(n)]
    one = gymbus.steps("cart-2", episode=3, arrow=True)
    assert one.column("step").to_pylist() == list(range(lengths[3]))
    assert all(len(v) == 4 for v in one.column("obs_vec").to_pylist())
    assert one.column("terminated").to_pylist()[-1] or one.column("truncated").to_pylist()[-1]
    with gymbus.store() as db:
        assert db.steps("cart-2", episode=3).equals(one.to_pandas())


def test_sql_is_read_only_and_unknown_runs_are_named(stack: Stack) -> None:
    counted = gymbus.sql("SELECT telemetry, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1")
    assert counted.to_dict("records") == [{"telemetry": "fast", "n": 1},
                                          {"telemetry": "full", "n": 3}]
    with pytest.raises(RemoteError) as refused:
        gymbus.sql("DELETE FROM runs")
    assert refused.value.code == "read_only"
    with pytest.raises(NotFound, match="no-such-run"):
        gymbus.steps("no-such-run")


def test_the_query_api_answers_in_arrow(stack: Stack) -> None:
    with StoreClient(stack.settings) as client:
        reply = client.query("SELECT run_id, steps FROM runs ORDER BY run_id", 2, "arrow")
        assert client.ask_ingest  # the ingest answered it
        assert reply["rows"] == 2 and reply["truncated"] and reply["types"] == ["VARCHAR",
                                                                                 "BIGINT"]
        table = pa.ipc.open_stream(reply["arrow"]).read_all()
        assert table.column("run_id").to_pylist() == ["cart-1", "cart-2"]
        with pytest.raises(RemoteError) as bad:
            client.query("SELECT 1", 1, "xml")
        assert bad.value.code == "bad_request" and "arrow" in str(bad.value)


def test_export_pages_whole_frames(stack: Stack, tmp_path: Path) -> None:
    with StoreClient(stack.settings) as client:
        done = export_tables(client, ["lake"], tmp_path, "parquet", page_rows=50)
    assert done.rows["steps"] == stored_steps("lake")
    got = pd.read_parquet(tmp_path / "steps")
    assert list(got[["episode", "step"]].itertuples(index=False, name=None)) == \
        list(gymbus.steps("lake")[["episode", "step"]].itertuples(index=False, name=None))


def stored_steps(run_id: str) -> int:
    return int(gymbus.sql(f"SELECT steps FROM runs WHERE run_id = '{run_id}'")["steps"][0])


# --- docs/data.md -------------------------------------------------------------------------------


def documented_columns() -> dict[str, set[str]]:
    """table -> the columns docs/data.md describes under `### table`."""
    tables: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            tables[current] = set()
        elif current and (m := re.match(r"\| `([a-z_]+)` \| ([A-Z\[\]]+) \|", line)):
            tables[current].add(f"{m.group(1)} {m.group(2)}")
    return tables


def test_every_column_of_the_schema_is_documented_with_its_type() -> None:
    documented = documented_columns()
    for table, columns in schema.TABLES.items():
        want = {f"{name} {sql.split()[0]}" for name, sql in columns}
        assert documented.get(table) == want, table


def worked_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_worked_queries_of_the_docs_answer_on_a_real_store(stack: Stack) -> None:
    curve, success, histogram, episode, seeds = worked_queries()
    run = {"curve": "cart-1", "success": "lake", "histogram": "lake", "episode": "cart-1"}

    def ask(sql: str, run_id: str = "") -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = gymbus.sql(sql.replace("RUN_ID", run_id)).to_dict("records")
        return rows

    lengths = list(gymbus.episodes("cart-1")["length"])
    points = ask(curve, run["curve"])
    assert [p["global_step"] for p in points] == [sum(lengths[:i + 1]) for i in range(12)]
    assert points[0]["return_avg10"] == points[0]["return"]
    blocks = ask(success, run["success"])
    assert [(b["block"], b["episodes"]) for b in blocks] == [(0, 100), (1, 100), (2, 100)]
    wins = gymbus.sql("SELECT count(*) AS n FROM episodes WHERE run_id = 'lake' "
                      'AND "return" > 0')["n"][0]
    assert sum(b["success_rate"] * 100 for b in blocks) == pytest.approx(wins)
    counts = ask(histogram, run["histogram"])
    assert sum(c["n"] for c in counts) == stored_steps("lake")
    assert {c["state"] for c in counts} <= set(range(16)) and {c["action"] for c in counts} \
        == {0, 1, 2, 3}
    starts = [c for c in counts if c["state"] == 0]  # every episode starts in state 0
    assert sum(c["n"] for c in starts) >= 300
    steps = ask(episode, run["episode"])
    assert [s["step"] for s in steps] == list(range(lengths[3]))
    compared = ask(seeds)
    assert [(c["seed"], c["run_id"], c["episodes"]) for c in compared] == \
        [(1, "cart-1", 12), (2, "cart-2", 12), (4, "fast", 5)]


def test_the_reader_reads_the_file_when_the_ingest_is_stopped(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Last in this module: it stops the ingest."""
    before = {"runs": gymbus.runs(), "steps": gymbus.steps("lake", episode=7),
              "episodes": gymbus.episodes("cart-1"), "metrics": gymbus.metrics("cart-2")}
    assert stack.stop_one("ingest") == 143
    monkeypatch.setenv("GYMBUS_REQUEST_TIMEOUT", "0.3")
    with gymbus.store() as db:
        after = {"runs": db.runs(), "steps": db.steps("lake", episode=7),
                 "episodes": db.episodes("cart-1"), "metrics": db.metrics("cart-2")}
        assert not db.client.ask_ingest  # read from the file
        with pytest.raises(RemoteError) as refused:
            db.sql("DROP TABLE steps")
        assert refused.value.code == "read_only"
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame)
    assert len(gymbus.steps("cart-1")) == stored_steps("cart-1")  # the shortcuts too
