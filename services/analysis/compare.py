"""`gymbus compare`'s model: which runs, grouped by configuration, and their aggregates.

A configuration is a run's config without the fields that tell seeds of one experiment apart
(`SEED_FIELDS`); runs whose configs are equal but for those are seeds of one configuration. For
each configuration: the final performance of each run (the mean return of its last N episodes)
aggregated as mean, median and IQM with 95% stratified bootstrap intervals, and a learning curve:
each run's smoothed episode returns interpolated at common environment-step points, the IQM
across runs at each point with its 95% band. Runs on no thread of their own; the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gymbus.services.analysis import stats
from gymbus.services.ingest.client import StoreClient
from gymbus.shared.errors import GymbusError, NotFound, ServiceUnavailable
from gymbus.shared.protocol import Command
from gymbus.shared.queries import sql_strs
from gymbus.shared.transport import Client

#: config fields that differ between the seeds of one configuration (and the group, a label
#: of the sweep that made them)
SEED_FIELDS = frozenset({"seed", "name", "tags", "group", "agent_id"})
DEFAULT_LAST = 100
DEFAULT_POINTS = 50
DEFAULT_SMOOTH = 10
#: longest description of a configuration (a legend entry, a table line)
DESCRIBE_WIDTH = 60


class NothingToCompare(GymbusError):
    """The runs named have no stored episodes: wait until they have finished some, or name
    other runs (`gymbus runs`)."""

    exit_code = NotFound.exit_code


@dataclass
class RunEpisodes:
    """One run's episode returns and the environment steps at each episode's end."""

    run_id: str
    config: dict[str, Any]
    returns: stats.Array
    step_ends: stats.Array


@dataclass
class Configuration:
    """The runs of one configuration and what is computed from them."""

    label: str
    config: dict[str, Any]
    runs: list[RunEpisodes] = field(default_factory=list)
    describe: str = ""


def configuration_of(config: dict[str, Any]) -> str:
    """The configuration a run belongs to, as a canonical JSON string."""
    kept = {k: v for k, v in config.items() if k not in SEED_FIELDS}
    return json.dumps(kept, sort_keys=True, default=repr)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe(configs: Sequence[dict[str, Any]]) -> list[str]:
    """What tells each configuration apart from the others (`agent.learning_rate=0.5 ...`);
    env and algo when there is nothing to tell apart."""
    flats = [_flat({k: v for k, v in c.items() if k not in SEED_FIELDS}) for c in configs]
    keys = sorted({k for f in flats for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), default=repr) for f in flats}) > 1]
    out = []
    for flat, config in zip(flats, configs, strict=True):
        text = " ".join(f"{k}={flat.get(k)}" for k in differ) if differ else (
            f"{config.get('env')} {config.get('algo')}")
        out.append(text if len(text) <= DESCRIBE_WIDTH else text[:DESCRIBE_WIDTH - 1] + "…")
    return out


# --- which runs --------------------------------------------------------------------------------


def select(targets: Iterable[str], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run records that the targets name: a run id, or a group id (its runs), in order and
    each once. NotFound naming a target that matches nothing."""
    by_id = {r["run_id"]: r for r in records}
    chosen: dict[str, dict[str, Any]] = {}
    for target in targets:
        if target in by_id:
            chosen.setdefault(target, by_id[target])
            continue
        members = [r for r in records if target and _group(r) == target]
        if not members:
            raise NotFound(f"{target!r} is neither a run id nor a group id that is stored "
                           "(`gymbus runs` lists them)")
        for record in members:
            chosen.setdefault(record["run_id"], record)
    return list(chosen.values())


def _group(record: dict[str, Any]) -> str:
    return str(record.get("group") or (record.get("config") or {}).get("group") or "")


def stored_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run records from the store's `runs` rows (run_id, config as JSON): for runs that the
    controller does not know (imported, or fed to the ingest directly)."""
    out = []
    for row in rows:
        try:
            config = json.loads(row["config"]) if row.get("config") else {}
        except json.JSONDecodeError:
            config = {}
        out.append({"run_id": row["run_id"], "config": config,
                    "group": config.get("group", "") if isinstance(config, dict) else ""})
    return out


def episodes_sql(run_ids: Sequence[str]) -> str:
    """Every episode of the runs, in the order they ended."""
    return ('SELECT run_id, "return", length FROM episodes WHERE run_id IN '
            f"{sql_strs(run_ids)} ORDER BY run_id, ts, seq, episode")


def run_episodes(records: Sequence[dict[str, Any]],
                 rows: Iterable[dict[str, Any]]) -> tuple[list[RunEpisodes], list[str]]:
    """The runs with their episodes from `episodes_sql`'s rows, and the ids of those without."""
    returns: dict[str, list[float]] = {}
    lengths: dict[str, list[int]] = {}
    for row in rows:
        returns.setdefault(row["run_id"], []).append(float(row["return"]))
        lengths.setdefault(row["run_id"], []).append(int(row["length"]))
    runs, empty = [], []
    for record in records:
        run_id = record["run_id"]
        if run_id not in returns:
            empty.append(run_id)
            continue
        runs.append(RunEpisodes(run_id, dict(record.get("config") or {}),
                                np.array(returns[run_id], np.float64),
                                np.cumsum(np.array(lengths[run_id], np.float64))))
    return runs, empty


def run_records(controller: Client, store: StoreClient) -> list[dict[str, Any]]:
    """Every run record the controller holds, then the stored runs it does not know (their
    config from the store's `runs` table); the store's alone when the controller is down."""
    try:
        records: list[dict[str, Any]] = controller.request(Command.LIST_RUNS)["runs"]
    except ServiceUnavailable:
        records = []
    known = {r["run_id"] for r in records}
    stored = stored_records(store.rows("SELECT run_id, config FROM runs"))
    return records + [r for r in stored if r["run_id"] not in known]


def gather(controller: Client, store: StoreClient,
           targets: Iterable[str]) -> tuple[list[Configuration], list[str]]:
    """The named runs with their episodes, grouped by configuration, and the ids of the runs
    named that have no stored episode. NothingToCompare when none has one."""
    chosen = select(targets, run_records(controller, store))
    rows = store.rows(episodes_sql([r["run_id"] for r in chosen]))
    runs, empty = run_episodes(chosen, rows)
    if not runs:
        raise NothingToCompare(f"none of the {len(chosen)} run(s) named has a stored episode")
    return configurations(runs), empty


def configurations(runs: Sequence[RunEpisodes]) -> list[Configuration]:
    """Runs grouped by configuration, in the order each configuration first appears, labelled
    A, B, ... (AA after Z)."""
    groups: dict[str, Configuration] = {}
    for run in runs:
        key = configuration_of(run.config)
        if key not in groups:
            groups[key] = Configuration(_label(len(groups)), run.config)
        groups[key].runs.append(run)
    found = list(groups.values())
    for conf, text in zip(found, describe([c.config for c in found]), strict=True):
        conf.describe = text
    return found


def _label(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


# --- the numbers -------------------------------------------------------------------------------


def _estimate(est: stats.Estimate, i: int) -> dict[str, float]:
    return {"value": float(est.value[i]), "low": float(est.low[i]), "high": float(est.high[i])}


def compare(confs: Sequence[Configuration], last: int = DEFAULT_LAST,
            points: int = DEFAULT_POINTS, smooth: int = DEFAULT_SMOOTH,
            reps: int = stats.DEFAULT_REPS, seed: int = stats.DEFAULT_SEED) -> dict[str, Any]:
    """Final performance and learning curves of each configuration, JSON-ready."""
    finals = {c.label: np.array([[stats.final_score(r.returns, last)] for r in c.runs])
              for c in confs}
    final_est = stats.interval_estimates(finals, stats.final_aggregates, reps, seed)
    curves: dict[str, stats.Array] = {}
    grids: dict[str, stats.Array] = {}
    for c in confs:
        grids[c.label] = stats.common_steps([r.step_ends for r in c.runs], points)
        curves[c.label] = np.stack([
            stats.curve_at(r.step_ends, stats.smoothed(r.returns, smooth), grids[c.label])
            for r in c.runs])[:, None, :]
    curve_est = stats.interval_estimates(curves, stats.iqm_per_point, reps, seed)
    out = []
    for c in confs:
        est, band = final_est[c.label], curve_est[c.label]
        out.append({
            "label": c.label, "describe": c.describe, "config": c.config,
            "runs": [{"run_id": r.run_id, "seed": r.config.get("seed"),
                      "episodes": int(r.returns.size),
                      "final": stats.final_score(r.returns, last)} for r in c.runs],
            "final": {name: _estimate(est, i) for i, name in enumerate(stats.AGGREGATES)},
            "curve": {"steps": grids[c.label].tolist(), "iqm": band.value.tolist(),
                      "low": band.low.tolist(), "high": band.high.tolist()},
        })
    return {"last": last, "smooth": smooth, "points": points, "reps": reps, "seed": seed,
            "confidence": stats.CONFIDENCE, "configurations": out}
