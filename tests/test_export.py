"""`gymbus export`: real runs recorded through `import gymbus` into a private stack, exported by
the real command as Parquet, CSV and Minari while the ingest runs and after it stopped, and read
back with DuckDB, pandas, pyarrow (Polars if installed) and the real `minari` package."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import STACK_ENV, gymbus_cli, gymbus_cli_json, make_stack
from recorded_runs import ROLES, record_runs, rows

from gymbus.services.ingest.export import EXPORT_TABLES
from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import ExitCode


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    with make_stack(tmp_path_factory.mktemp("export") / "home", **STACK_ENV) as stack:
        stack.start(ROLES)
        yield stack, record_runs(stack)


def export(stack: Stack, *args: str) -> Any:
    return gymbus_cli_json(stack.process_env(), "export", *args)


def stored(stack: Stack, table: str, run_ids: list[str]) -> pd.DataFrame:
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    order = {"steps": "run_id, episode, step", "episodes": "run_id, episode",
             "metrics": "run_id, seq, name, step"}[table]
    return pd.DataFrame(rows(stack, f"SELECT * FROM {table} WHERE run_id IN ({quoted}) "
                                    f"ORDER BY {order}"))


def missing(value: Any) -> bool:
    """NULL as any reader gives it: None, NaN, NaT or pandas' NA."""
    return value is None or (not isinstance(value, list | str) and bool(pd.isna(value)))


def same_rows(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    """Every stored row exported, value for value (lists compared as lists)."""
    got = got.assign(run_id=got["run_id"].astype(str)).sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want) > 0
    for column in want.columns:
        mine = [v.tolist() if isinstance(v, np.ndarray) else v for v in got[column]]
        theirs = list(want[column])
        for a, b in zip(mine, theirs, strict=True):
            if missing(b):
                assert missing(a), (column, a)
            else:
                assert a == b, (column, a, b)


def test_parquet_is_one_dataset_per_table_partitioned_by_run(
        recorded: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, ids = recorded
    runs = [ids["cart-1"], ids["lake"]]
    summary = export(stack, *runs, "--format", "parquet", "--out", str(tmp_path))
    assert summary["runs"] == runs and summary["files"] == len(EXPORT_TABLES) * 2
    for table in EXPORT_TABLES:
        for run_id in runs:
            assert (tmp_path / table / f"run_id={run_id}" / "part-0.parquet").is_file()
    want = stored(stack, "steps", runs)
    assert summary["rows"]["steps"] == len(want)
    # DuckDB, pandas and pyarrow read the folders as they are
    con = duckdb.connect()
    got = con.sql(f"SELECT * FROM read_parquet('{tmp_path}/steps/*/*.parquet', "
                  "hive_partitioning = true)").df()
    same_rows(got[list(want.columns)], want, ["run_id", "episode", "step"])
    same_rows(pd.read_parquet(tmp_path / "steps")[list(want.columns)], want,
              ["run_id", "episode", "step"])
    table = ds.dataset(tmp_path / "episodes", format="parquet", partitioning="hive").to_table()
    episodes = stored(stack, "episodes", runs)
    assert table.num_rows == len(episodes) and set(table.column("run_id").to_pylist()) == set(runs)
    assert pq.read_table(tmp_path / "metrics").num_rows == len(stored(stack, "metrics", runs))
    joined = con.sql(f"""
        SELECT r.env, count(*) AS n FROM read_parquet('{tmp_path}/runs/*/*.parquet',
            hive_partitioning = true) r
        JOIN read_parquet('{tmp_path}/steps/*/*.parquet', hive_partitioning = true) s
        USING (run_id) GROUP BY r.env ORDER BY r.env""").fetchall()
    assert joined == [("CartPole-v1", int((want["run_id"] == ids["cart-1"]).sum())),
                      ("FrozenLake-v1", int((want["run_id"] == ids["lake"]).sum()))]


def test_polars_reads_the_parquet_export(recorded: tuple[Stack, dict[str, str]],
                                         tmp_path: Path) -> None:
    pl = pytest.importorskip("polars")
    stack, ids = recorded
    export(stack, ids["cart-2"], "--out", str(tmp_path))
    frame = pl.read_parquet(tmp_path / "steps", hive_partitioning=True)
    assert frame.height == len(stored(stack, "steps", [ids["cart-2"]]))


def test_csv_is_one_file_per_table_per_run(recorded: tuple[Stack, dict[str, str]],
                                           tmp_path: Path) -> None:
    stack, ids = recorded
    runs = [ids["cart-1"], ids["cart-2"]]
    summary = export(stack, "--group", "cartpole-seeds", "--format", "csv", "--out",
                     str(tmp_path))
    assert summary["runs"] == [*runs, ids["lake"], ids["fast"]]
    want = stored(stack, "steps", runs)
    got = duckdb.connect().sql(f"SELECT * FROM read_csv('{tmp_path}/steps/*/*.csv', "
                               "hive_partitioning = true) WHERE run_id IN "
                               f"('{runs[0]}', '{runs[1]}')").df()
    got["obs_vec"] = got["obs_vec"].map(json.loads)  # a list column is its text in CSV
    same_rows(got[list(want.columns)].replace({np.nan: None}), want,
              ["run_id", "episode", "step"])
    one = pd.read_csv(tmp_path / "episodes" / f"run_id={runs[0]}" / "part-0.csv")
    assert list(one["return"]) == list(stored(stack, "episodes", [runs[0]])["return"])
    csv = ds.dataset(tmp_path / "metrics", format="csv", partitioning="hive").to_table()
    assert csv.num_rows == summary["rows"]["metrics"]
    assert pacsv.read_csv(tmp_path / "runs" / f"run_id={runs[1]}" / "part-0.csv").num_rows == 1


def minari_episodes(path: Path, dataset_id: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return minari.load_dataset(dataset_id)


@pytest.fixture(scope="module")
def minari_out(recorded: tuple[Stack, dict[str, str]],
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One Minari dataset per full run, from one `gymbus export --format minari`."""
    stack, ids = recorded
    out = tmp_path_factory.mktemp("minari")
    made = export(stack, ids["cart-1"], ids["lake"], "--format", "minari", "--out", str(out))
    return out, {d["run_id"]: d for d in made["datasets"]}


@pytest.mark.parametrize("name", ["cart-1", "lake"])
def test_minari_dataset_round_trips_every_episode(recorded: tuple[Stack, dict[str, str]],
                                                  minari_out: tuple[Path, dict[str, Any]],
                                                  name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    stack, ids = recorded
    run_id = ids[name]
    out, made = minari_out
    assert made[run_id]["left_out"] == 0
    dataset = minari_episodes(out, made[run_id]["dataset_id"], monkeypatch)
    episodes = rows(stack, f"SELECT * FROM episodes WHERE run_id = '{run_id}' ORDER BY episode")
    steps = stored(stack, "steps", [run_id])
    assert dataset.total_episodes == len(episodes) and dataset.total_steps == len(steps)
    env = "CartPole-v1" if name.startswith("cart") else "FrozenLake-v1"
    assert dataset.spec.env_spec.id == env
    if name == "lake":
        assert dataset.spec.env_spec.kwargs["is_slippery"] is False
    seeds = [m["seed"] for m in dataset.storage.get_episode_metadata(range(len(episodes)))]
    assert seeds == [e["seed"] for e in episodes]
    for got, episode in zip(dataset.iterate_episodes(), episodes, strict=True):
        mine = steps[steps["episode"] == episode["episode"]]
        if env == "CartPole-v1":
            want_obs = [episode["reset_obs_vec"], *mine["obs_vec"]]
            want_actions = list(mine["action"])
        else:
            want_obs = [episode["reset_obs"], *mine["obs"]]
            want_actions = list(mine["action"])
        assert len(got.observations) == episode["length"] + 1
        assert np.asarray(got.observations, dtype=np.float64).tolist() == want_obs
        assert got.actions.tolist() == want_actions
        assert got.rewards.tolist() == list(mine["reward"])
        assert got.terminations.tolist() == list(mine["terminated"])
        assert got.truncations.tolist() == list(mine["truncated"])
        assert bool(got.terminations[-1]) == episode["terminated"]


def test_a_fast_mode_run_is_refused_as_minari_with_what_to_do(
        recorded: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, ids = recorded
    result = gymbus_cli(stack.process_env(), "export", ids["fast"], "--format", "minari",
                        "--out", str(tmp_path), "--json")
    assert result.returncode == ExitCode.REFUSED
    message = json.loads(result.stdout)["error"]["message"]
    assert "stored no steps" in message and "telemetry: fast" in message
    assert "full telemetry" in message and "--format parquet" in message
    assert not list(tmp_path.rglob("*.hdf5"))


def test_bad_requests_name_what_is_wrong(recorded: tuple[Stack, dict[str, str]],
                                         tmp_path: Path) -> None:
    stack, ids = recorded
    env = stack.process_env()
    missing = gymbus_cli(env, "export", "NO-SUCH-RUN", "--out", str(tmp_path))
    assert missing.returncode == ExitCode.NOT_FOUND and "NO-SUCH-RUN" in missing.stderr
    both = gymbus_cli(env, "export", ids["cart-1"], "--group", "g", "--out", str(tmp_path))
    assert both.returncode == ExitCode.BAD_INPUT and "not both" in both.stderr


def test_export_reads_the_file_once_the_ingest_is_stopped(
        recorded: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    """Last in this module: it stops the ingest."""
    stack, ids = recorded
    live = export(stack, ids["cart-1"], "--out", str(tmp_path / "live"))
    assert stack.stop_one("ingest") == 143
    env = stack.process_env({"GYMBUS_REQUEST_TIMEOUT": "0.5"})
    result = gymbus_cli(env, "export", ids["cart-1"], "--out", str(tmp_path / "file"), "--json")
    assert result.returncode == 0, result.stderr
    assert "steps" in result.stderr  # progress on stderr, the summary alone on stdout
    from_file = json.loads(result.stdout)
    assert from_file["rows"] == live["rows"]
    a = pq.read_table(tmp_path / "live" / "steps").to_pandas()
    b = pq.read_table(tmp_path / "file" / "steps").to_pandas()
    pd.testing.assert_frame_equal(a, b)
