"""Replay of a stored episode: its steps read back from DuckDB, with the board of grid worlds.

`load_episode` reads a run, one of its episodes and that episode's steps through a `StoreClient`
(the ingest's query API, or the file when no ingest runs); `print_replay` prints it step by step
for `gymbus replay`; the Qt viewer steps through the same `Replay` with a slider. A fast-mode run
stored no steps: `Replay.steps` is empty and `fallback_metrics` gives what was stored instead.
Plain functions, run on the caller's thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

from gymbus.services.cli.output import sparkline
from gymbus.services.ingest.client import StoreClient
from gymbus.services.viewers.grid import GridWorld, Scene, action_name, to_rich
from gymbus.shared import queries
from gymbus.shared.errors import NotFound, RemoteError
from gymbus.shared.protocol import ErrorCode, TelemetryMode

#: buckets of a metric curve in the fast-mode fallback
CURVE_POINTS = 40


@dataclass
class Replay:
    """One stored episode of a run, and its steps (none for fast mode)."""

    run_id: str
    env: str
    algo: str
    agent_id: str
    telemetry: str
    config: dict[str, Any]
    episode: int
    ret: float
    length: int
    terminated: bool
    truncated: bool
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def world(self) -> GridWorld | None:
        try:
            return GridWorld.for_env(self.env, self.config.get("env_kwargs") or {})
        except ValueError:
            return None

    def scene(self, index: int) -> Scene | None:
        """The board after step `index` (grid worlds only)."""
        world = self.world
        obs = self.steps[index]["obs"] if 0 <= index < len(self.steps) else None
        if world is None or not isinstance(obs, int):
            return None
        try:
            return world.scene(obs)
        except ValueError:
            return None

    @property
    def label_name(self) -> str:
        """What the `label` column means for this agent."""
        return "intention" if "bdi" in self.algo.lower() else "choice"

    def why_no_steps(self) -> str:
        """Why `steps` is empty."""
        if self.telemetry == TelemetryMode.FAST.value:
            return f"run {self.run_id} ran in fast mode: no steps were stored"
        every = self.config.get("every")
        if self.telemetry == TelemetryMode.SAMPLED.value and every:
            near = self.episode - self.episode % int(every)
            return (f"run {self.run_id} stored the steps of one episode in {every} only "
                    f"(e.g. episode {near}); episode {self.episode} has none")
        return f"no steps of episode {self.episode} are stored"


def load_episode(store: StoreClient, run_id: str, episode: int) -> Replay:
    """The run's episode and its steps; RemoteError unknown_run when the run is absent, NotFound
    when the episode is."""
    run = store.rows(queries.run(run_id))
    if not run:
        raise RemoteError(ErrorCode.UNKNOWN_RUN.value, f"no run {run_id} is stored")
    r = run[0]
    rows = store.rows(queries.episode(run_id, episode))
    if not rows:
        span = store.rows(queries.episode_span(run_id))[0]
        held = f"episodes {span['lo']} to {span['hi']}" if span["n"] else "no episodes"
        raise NotFound(f"episode {episode} of run {run_id} is not stored ({held} are)")
    e = rows[0]
    try:
        config = json.loads(r["config"] or "{}")
    except ValueError:
        config = {}
    steps = store.rows(queries.episode_steps(run_id, episode))
    for step in steps:  # one value each: the int column's, else the vector column's
        for name in ("obs", "action"):
            vector = step.pop(f"{name}_vec")
            if step[name] is None:
                step[name] = vector
    return Replay(run_id, r["env"] or "", r["algo"] or "", r["agent_id"] or "",
                  r["telemetry"] or "", config if isinstance(config, dict) else {},
                  int(e["episode"]), float(e["return"]), int(e["length"]),
                  bool(e["terminated"]), bool(e["truncated"]), steps)


def fallback_metrics(store: StoreClient, run_id: str) -> list[dict[str, Any]]:
    """Every metric of the run: name, count, min, max, last value, a curve of CURVE_POINTS
    bucket means and the mean step of each bucket, where its point is drawn (what a fast-mode run
    stored instead of steps). `charts/episodic_return` and `charts/episodic_length` come from the
    episode rows (at the global step of each episode's end), unless the run's metrics hold them
    (a run imported from TensorBoard files)."""
    summary = store.rows(queries.metric_summary(run_id))
    curves: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    for row in store.rows(queries.metric_curves(run_id, CURVE_POINTS)):
        curves.setdefault(row["name"], []).append(float(row["v"]))
        steps.setdefault(row["name"], []).append(float(row["step"]))
    return [{**row, "curve": curves.get(row["name"], []), "steps": steps.get(row["name"], [])}
            for row in summary]


# --- printing -------------------------------------------------------------------------------------


def step_line(replay: Replay, index: int) -> Text:
    """One step: index, action, reward, the label (intention / choice), the end of the episode."""
    s = replay.steps[index]
    text = Text(f"step {s['step']:>3}  ", style="bold")
    text.append(f"action {action_name(replay.env, s['action'])}  reward {s['reward']:g}")
    if s["label"]:
        text.append(f"  {replay.label_name} {s['label']}", style="italic")
    if s["terminated"] or s["truncated"]:
        text.append("  terminated" if s["terminated"] else "  truncated", style="bold")
    if replay.world is None:
        text.append(f"  obs {s['obs']}", style="dim")
    return text


def header(replay: Replay) -> Text:
    end = "terminated" if replay.terminated else "truncated" if replay.truncated else "cut short"
    agent = f" (agent {replay.agent_id})" if replay.agent_id else ""
    return Text(f"run {replay.run_id}  {replay.env}  {replay.algo}{agent}\n"
                f"episode {replay.episode}: return {replay.ret:g}, {replay.length} steps, {end}",
                style="bold")


def print_replay(replay: Replay, console: Console, delay: float = 0.0) -> None:
    """The episode step by step: the step's line, then the board after it (grid worlds)."""
    console.print(header(replay))
    for i in range(len(replay.steps)):
        console.print(step_line(replay, i))
        scene = replay.scene(i)
        if scene is not None:
            console.print(to_rich(scene))
        if delay > 0:
            time.sleep(delay)  # the pace a person asked for with --delay


def print_fallback(replay: Replay, metrics: list[dict[str, Any]], console: Console) -> None:
    """What a run without stored steps has: the episode's numbers and the run's metric curves."""
    console.print(Text(replay.why_no_steps() + "; what was stored instead:", style="bold yellow"))
    console.print(header(replay))
    if not metrics:
        console.print("no metrics were stored")
        return
    width = max(len(m["name"]) for m in metrics)
    for m in metrics:
        console.print(f"{m['name']:<{width}}  {sparkline(m['curve'], CURVE_POINTS):<{CURVE_POINTS}}"
                      f"  last {m['last']:.4g}  min {m['lo']:.4g}  max {m['hi']:.4g}"
                      f"  ({m['n']} points)")


def to_json(replay: Replay, metrics: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The replay as JSON: the episode, its steps (with the board as text), or the fallback."""
    out: dict[str, Any] = {
        "run_id": replay.run_id, "env": replay.env, "algo": replay.algo,
        "agent_id": replay.agent_id, "telemetry": replay.telemetry, "episode": replay.episode,
        "return": replay.ret, "length": replay.length, "terminated": replay.terminated,
        "truncated": replay.truncated, "steps_stored": bool(replay.steps),
    }
    if replay.steps:
        out["steps"] = []
        for i, s in enumerate(replay.steps):
            scene = replay.scene(i)
            out["steps"].append({**s, "action_name": action_name(replay.env, s["action"]),
                                 "board": to_rich(scene).plain if scene else None})
    else:
        out["reason"] = replay.why_no_steps()
        out["metrics"] = metrics or []
    return out
