"""A stored run as a Minari dataset: its episodes' observations, actions, rewards, terminations,
truncations and seeds, with the environment's spec, written by the real `minari` package.

An episode of N steps has N+1 observations: the one its reset returned (the episodes table's
`reset_obs`/`reset_obs_vec`) and each step's (`obs`/`obs_vec`). Only episodes whose every step
is stored become dataset episodes, in the order (env_index, episode); a run that stored no step
(fast telemetry) is refused with what to do instead. Reads go through `table_pages`
(`gymbus.services.ingest.export`), like every other export.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from gymbus.services.ingest.client import StoreClient
from gymbus.services.ingest.export import PAGE_ROWS, Progress, table_pages
from gymbus.shared.errors import GymbusError
from gymbus.shared.queries import sql_str


class NotExportable(GymbusError):
    """The run cannot become a Minari dataset; the message says why and what to do instead
    (record it with full telemetry, or export it as Parquet)."""


def dataset_id(run_id: str) -> str:
    """The Minari id of a run's dataset: `gymbus/<run id>-v0`."""
    return f"gymbus/{run_id.lower()}-v0"


def env_spec(run: dict[str, Any]) -> gym.envs.registration.EnvSpec:
    """The run's environment spec: its env id with the config's env_kwargs and episode limit."""
    env_id = run.get("env") or ""
    config = json.loads(run.get("config") or "{}")
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    kwargs = dict(config.get("env_kwargs") or inner.get("env_kwargs") or {})
    limit = config.get("max_episode_steps") or inner.get("max_episode_steps")
    if limit:
        kwargs["max_episode_steps"] = int(limit)
    if not env_id:
        raise NotExportable(f"run {run['run_id']} names no environment id (a script's run names "
                            "it as `env` in gymbus.run(config=...)); export it as Parquet")
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an env's own code may raise anything
        raise NotExportable(f"run {run['run_id']}: cannot make {env_id!r} with {kwargs} "
                            f"({type(exc).__name__}: {exc}); export it as Parquet") from None
    try:
        if env.spec is None:
            raise NotExportable(f"{env_id!r} has no spec; export it as Parquet")
        return env.spec
    finally:
        env.close()


def _values(space: gym.Space[Any], ints: pa.ChunkedArray, vecs: pa.ChunkedArray,
            what: str) -> np.ndarray:
    """A column pair (obs, obs_vec) as the space's array: ints for Discrete, rows for Box."""
    if isinstance(space, gym.spaces.Discrete):
        if ints.null_count:
            raise ValueError(f"{what} not stored")
        values: np.ndarray = ints.to_numpy().astype(space.dtype)
        return values
    if isinstance(space, gym.spaces.Box):
        if vecs.null_count:
            raise ValueError(f"{what} not stored")
        flat = pa.concat_arrays([c.flatten() for c in vecs.chunks]) if vecs.chunks else []
        return np.asarray(flat, dtype=np.float64).reshape(-1, *space.shape).astype(space.dtype)
    raise NotExportable(f"{what}: a {type(space).__name__} space; Minari export takes Discrete "
                        "and Box spaces: export the run as Parquet")


@contextmanager
def _datasets_path(out: Path) -> Any:
    """MINARI_DATASETS_PATH set to `out` for the call (Minari reads it on each call)."""
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(out)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def export_minari(client: StoreClient, run_id: str, out: Path, progress: Progress,
                  page_rows: int = PAGE_ROWS) -> dict[str, Any]:
    """Write run `run_id` as the Minari dataset `dataset_id(run_id)` under `out` (HDF5); returns
    its id, path, episodes, steps, episodes left out, size and seconds."""
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.utils import create_dataset_from_buffers

    started = time.perf_counter()
    runs = client.rows(f"SELECT run_id, env, algo, telemetry, config, obs_not_stored FROM runs "
                       f"WHERE run_id = {sql_str(run_id)}")
    if not runs:
        raise NotExportable(f"run {run_id} is not stored")
    run = runs[0]
    name = dataset_id(run_id)
    if (out / name).exists():
        raise NotExportable(f"{out / name} exists already: remove it, or export to another --out")
    counted = client.rows(f"SELECT count(*) AS n FROM steps WHERE run_id = {sql_str(run_id)}")
    if not counted[0]["n"]:
        raise NotExportable(
            f"run {run_id} stored no steps (telemetry: {run.get('telemetry') or 'unknown'}): a "
            "Minari dataset holds every step's observation and action. Record the run again with "
            "full telemetry (gymbus submit --telemetry full, or gymbus.run(telemetry='full')), "
            "or export what it stored (episodes, metrics) with --format parquet")
    spec = env_spec(run)
    env = gym.make(spec)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    episodes = pa.concat_tables(table_pages(
        client, "episodes", run_id, select="episode, env_index, seed, length, reset_obs, "
        "reset_obs_vec", page_rows=page_rows)).sort_by(
        [("env_index", "ascending"), ("episode", "ascending")])
    steps = pa.concat_tables(table_pages(
        client, "steps", run_id, select="episode, env_index, step, action, action_vec, obs, "
        "obs_vec, reward, terminated, truncated", page_rows=page_rows))
    progress(f"{run_id}: {steps.num_rows:,} steps of {episodes.num_rows:,} episodes read")
    steps = steps.sort_by([("env_index", "ascending"), ("episode", "ascending"),
                           ("step", "ascending")])
    buffers, skipped = _episode_buffers(EpisodeBuffer, episodes, steps, obs_space, act_space)
    if not buffers:
        raise NotExportable(f"run {run_id}: no episode has every step stored (its steps were "
                            "sampled, or their observations too large to store); record it "
                            "with full telemetry, or export it as Parquet")
    progress(f"{run_id}: writing {len(buffers):,} episodes ({skipped} left out, their steps "
             "not all stored)")
    with _datasets_path(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # author and code link: gymbus knows neither
        create_dataset_from_buffers(
            name, buffers, env=spec, algorithm_name=run.get("algo") or None,
            author="gymbus", description=f"gymbus run {run_id}", data_format="hdf5")
    path = out / name
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"run_id": run_id, "dataset_id": name, "path": str(path), "episodes": len(buffers),
            "steps": sum(len(b.rewards) for b in buffers), "left_out": skipped, "bytes": size,
            "seconds": round(time.perf_counter() - started, 3)}


def _episode_buffers(buffer_type: Any, episodes: pa.Table, steps: pa.Table,
                     obs_space: gym.Space[Any], act_space: gym.Space[Any]) -> tuple[list[Any], int]:
    """One EpisodeBuffer per episode whose every step and observation is stored; and how many
    episodes were left out."""
    keys = np.stack([steps.column("env_index").fill_null(-1).to_numpy(),
                     steps.column("episode").to_numpy()]) if steps.num_rows else np.zeros((2, 0))
    starts: dict[tuple[int, int], tuple[int, int]] = {}
    if steps.num_rows:
        change = np.flatnonzero((np.diff(keys, axis=1) != 0).any(axis=0)) + 1
        bounds = np.concatenate([[0], change, [steps.num_rows]])
        for lo, hi in itertools.pairwise(bounds):
            starts[(int(keys[0, lo]), int(keys[1, lo]))] = (int(lo), int(hi))
    buffers: list[Any] = []
    skipped = 0
    env_index = episodes.column("env_index").fill_null(-1).to_pylist()
    for i, (index, number, length, seed) in enumerate(zip(
            env_index, episodes.column("episode").to_pylist(),
            episodes.column("length").to_pylist(), episodes.column("seed").to_pylist(),
            strict=True)):
        span = starts.get((index, number))
        if span is None or span[1] - span[0] != length or not length:
            skipped += 1
            continue
        rows = steps.slice(span[0], span[1] - span[0])
        if rows.column("step").to_pylist() != list(range(length)):
            skipped += 1
            continue
        one = episodes.slice(i, 1)
        try:
            first = _values(obs_space, one.column("reset_obs"), one.column("reset_obs_vec"),
                            "reset observation")
            obs = _values(obs_space, rows.column("obs"), rows.column("obs_vec"), "observation")
            actions = _values(act_space, rows.column("action"), rows.column("action_vec"),
                              "action")
        except ValueError:
            skipped += 1
            continue
        buffers.append(buffer_type(
            id=len(buffers), seed=seed, observations=np.concatenate([first, obs]),
            actions=actions, rewards=rows.column("reward").to_numpy(),
            terminations=rows.column("terminated").to_numpy(zero_copy_only=False),
            truncations=rows.column("truncated").to_numpy(zero_copy_only=False)))
    return buffers, skipped
