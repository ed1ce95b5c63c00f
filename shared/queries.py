"""The statements gymbus's own readers send to the store, each named and built from its parameters.

The viewers, replay, the demo and `import-tb` read the tables declared in `gymbus.shared.schema`
through these functions instead of writing SQL of their own. The ingest's query API takes one
statement and no parameters, so values are written into it as literals: strings quoted by
`sql_str`, numbers through `int()` (a value that is not a number fails here, not in the store).
Each function returns the statement; `StoreClient.rows` (gymbus.services.ingest.client) runs it.
"""

from __future__ import annotations

from collections.abc import Iterable

from gymbus.shared.protocol import FrameKind


def sql_str(value: str) -> str:
    """A SQL string literal: quoted, with its quotes doubled."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_strs(values: Iterable[str]) -> str:
    """A parenthesised list of string literals, for `IN` (`(NULL)`, matching nothing, if empty)."""
    return "(" + (", ".join(sql_str(v) for v in values) or "NULL") + ")"


def _seqs(run_id: str, lo: int, hi: int) -> str:
    """The rows of one run whose frame seq lies in lo..hi."""
    return f"run_id = {sql_str(run_id)} AND seq BETWEEN {int(lo)} AND {int(hi)}"


# --- a run ----------------------------------------------------------------------------------------


def run(run_id: str) -> str:
    """The run's stored row: run_id, agent_id, env, algo, telemetry, config (JSON text)."""
    return ("SELECT run_id, agent_id, env, algo, telemetry, config FROM runs "
            f"WHERE run_id = {sql_str(run_id)}")


def runs_started(limit: int) -> str:
    """The `limit` runs started last, the oldest of them first: run_id, agent_id, env, algo,
    telemetry, config, name, status (NULL while it runs), reason, frames_emitted."""
    columns = "run_id, agent_id, env, algo, telemetry, config, name, status, reason, frames_emitted"
    return (f"SELECT {columns} FROM (SELECT {columns}, started_at FROM runs "
            f"ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT {int(limit)}) "
            "ORDER BY started_at NULLS FIRST, run_id")


def run_config(run_id: str) -> str:
    """The run's config (JSON text) alone: one column, no row when the run is not stored."""
    return f"SELECT config FROM runs WHERE run_id = {sql_str(run_id)}"


# --- what a viewer loads of a run by seq range (its snapshot, then backfill) -------------------


def stored_seqs(run_id: str, lo: int, hi: int) -> str:
    """The seqs stored of the run's frames in lo..hi, ascending (column `seq`)."""
    return f"SELECT seq FROM frames WHERE {_seqs(run_id, lo, hi)} ORDER BY seq"


def lifecycle_events(run_id: str, lo: int, hi: int) -> str:
    """The run's lifecycle rows in lo..hi: seq, event, status, reason, frames_emitted."""
    return ("SELECT seq, event, status, reason, frames_emitted FROM lifecycle "
            f"WHERE {_seqs(run_id, lo, hi)}")


def latest_episodes(run_id: str, lo: int, hi: int, limit: int) -> str:
    """The run's `limit` last episodes from frames in lo..hi, the newest first: seq, episode,
    return, length."""
    return (f'SELECT seq, episode, "return", length FROM episodes WHERE {_seqs(run_id, lo, hi)} '
            f"ORDER BY episode DESC LIMIT {int(limit)}")


def latest_metric(run_id: str, lo: int, hi: int, name: str) -> str:
    """The last value of metric `name` from the run's frames in lo..hi: seq, value (no row or
    one)."""
    return (f"SELECT seq, value FROM metrics WHERE {_seqs(run_id, lo, hi)} "
            f"AND name = {sql_str(name)} ORDER BY seq DESC, step DESC LIMIT 1")


def latest_step(run_id: str, lo: int, hi: int) -> str:
    """The last step of the last step frame in lo..hi of the run: seq, episode, step, action,
    action_vec, obs, obs_vec, reward, terminated, truncated, label (no row or one)."""
    where = _seqs(run_id, lo, hi)
    return ("SELECT seq, episode, step, action, action_vec, obs, obs_vec, reward, terminated, "
            "truncated, "
            f"label FROM steps WHERE {where} AND seq = (SELECT max(seq) FROM frames "
            f"WHERE {where} AND kind = {sql_str(FrameKind.STEP.value)}) "
            "ORDER BY episode DESC, step DESC LIMIT 1")


# --- one stored episode (replay) ----------------------------------------------------------------


def episode(run_id: str, episode: int) -> str:
    """One episode of the run: episode, return, length, terminated, truncated (no row or one)."""
    return ('SELECT episode, "return", length, terminated, truncated FROM episodes '
            f"WHERE run_id = {sql_str(run_id)} AND episode = {int(episode)} LIMIT 1")


def episode_span(run_id: str) -> str:
    """How many episodes of the run are stored, and the first and last: n, lo, hi (one row)."""
    return ("SELECT count(*) AS n, min(episode) AS lo, max(episode) AS hi "
            f"FROM episodes WHERE run_id = {sql_str(run_id)}")


def episode_steps(run_id: str, episode: int) -> str:
    """The stored steps of one episode, in order: step, action, action_vec, obs, obs_vec,
    reward, terminated, truncated, label (none when its steps were not stored)."""
    return ("SELECT step, action, action_vec, obs, obs_vec, reward, terminated, truncated, "
            "label FROM steps "
            f"WHERE run_id = {sql_str(run_id)} AND episode = {int(episode)} ORDER BY step")


def _metric_series(run_id: str) -> str:
    """Every metric point of the run (name, step, seq, value); `charts/episodic_return` and
    `charts/episodic_length` made from its episode rows, at the global step of each episode's
    end, unless its metrics hold them already (a run imported from TensorBoard files)."""
    run = sql_str(run_id)
    return (
        f"(SELECT name, step, seq, value FROM metrics WHERE run_id = {run} UNION ALL "
        "SELECT unnest(['charts/episodic_return', 'charts/episodic_length']) AS name, "
        "sum(length) OVER (ORDER BY episode) AS step, seq, "
        "unnest([\"return\", length::DOUBLE]) AS value "
        f"FROM episodes WHERE run_id = {run} AND NOT EXISTS (SELECT 1 FROM metrics "
        f"WHERE run_id = {run} AND name = 'charts/episodic_return'))")


def metric_summary(run_id: str) -> str:
    """Per metric of the run (episodic return and length included), by name: name, n, lo, hi,
    last (the value at the highest step)."""
    return ("SELECT name, count(*) AS n, min(value) AS lo, max(value) AS hi, "
            f"arg_max(value, step) AS last FROM {_metric_series(run_id)} "
            "GROUP BY name ORDER BY name")


def metric_curves(run_id: str, points: int) -> str:
    """Each metric of the run as `points` bucket means in step order: name, bucket, v, and step
    (the bucket's mean step, where its curve is drawn)."""
    return (f"SELECT name, bucket, avg(value) AS v, avg(step) AS step FROM (SELECT name, value, "
            f"step, ntile({int(points)}) OVER (PARTITION BY name ORDER BY step, seq) AS bucket FROM "
            f"{_metric_series(run_id)}) GROUP BY name, bucket ORDER BY name, bucket")


# --- several runs (the demo's summary) ----------------------------------------------------------


def returns(run_id: str) -> str:
    """Every episode's return of the run, in episode order (column `return`)."""
    return f'SELECT "return" FROM episodes WHERE run_id = {sql_str(run_id)} ORDER BY episode'


def run_summaries(run_ids: Iterable[str]) -> str:
    """Per run named, by run id: run_id, env, telemetry, status, complete, episodes,
    steps_stored, mean_return_last_100 (the mean return of its last 100 episodes)."""
    return f"""
SELECT r.run_id, r.env, r.telemetry, r.status, r.complete,
       (SELECT count(*) FROM episodes e WHERE e.run_id = r.run_id) AS episodes,
       (SELECT count(*) FROM steps s WHERE s.run_id = r.run_id) AS steps_stored,
       (SELECT avg(ret) FROM (SELECT e.return AS ret FROM episodes e WHERE e.run_id = r.run_id
                              ORDER BY e.episode DESC LIMIT 100)) AS mean_return_last_100
FROM runs r WHERE r.run_id IN {sql_strs(run_ids)} ORDER BY r.run_id
"""


def steps_taken(run_ids: Iterable[str]) -> str:
    """Per run named that stored an episode: run_id, steps (the lengths of its stored episodes
    summed: what it took in them, in any telemetry mode)."""
    return (f"SELECT run_id, sum(length) AS steps FROM episodes "
            f"WHERE run_id IN {sql_strs(run_ids)} GROUP BY run_id ORDER BY run_id")


def stored_runs(run_ids: Iterable[str]) -> str:
    """The stored rows of the runs named, in the shape of the controller's run records: run_id,
    name, env, algo, telemetry, status, reason, frames_emitted, steps, episodes, started_ns."""
    return ("SELECT run_id, name, env, algo, telemetry, status, reason, frames_emitted, steps, "
            "episodes, epoch_ns(started_at) AS started_ns FROM runs "
            f"WHERE run_id IN {sql_strs(run_ids)} ORDER BY started_at NULLS LAST, run_id")
