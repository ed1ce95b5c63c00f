"""The BDI agent: AgentSpeak plans decide, routes are cached and dropped, plan errors fail early."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_agents import Recorder
from test_child import ChildRun, check_complete, sink, start  # noqa: F401 - fixtures
from test_emitter import FrameSink

from gymbus.services.controller.validation import check_environment
from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import FrameKind
from gymbus.shared.runconfig import BdiParams, parse_config
from gymbus.worker import training
from gymbus.worker.agents.asl import SHIPPED_PLANS, PlanError
from gymbus.worker.agents.bdi import BdiAgent, Grid, Memory
from gymbus.worker.child import RunExit

NON_SLIPPERY = {"env": "FrozenLake-v1", "algo": "bdi", "episodes": 300, "seed": 1,
                "env_kwargs": {"is_slippery": False}}


class LabelRecorder(Recorder):
    """Counts each step's label (the plan that chose the action)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: Counter[str] = Counter()

    def step(self, *row: Any) -> None:
        self.labels[row[-1]] += 1


def train_bdi(config: dict[str, Any]) -> tuple[BdiAgent, LabelRecorder]:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg)
    rec = LabelRecorder()
    agent = training.make_agent(cfg, env, rng, rec)
    assert isinstance(agent, BdiAgent)
    training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed,
                          evaluation=training.make_evaluation(cfg, agent, rec))
    return agent, rec


def write_plans(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.asl"
    path.write_text(text)
    return str(path)


def test_a_cached_route_solves_the_non_slippery_lake() -> None:
    agent, rec = train_bdi({**NON_SLIPPERY, "eval_every": 100, "eval_episodes": 3})
    assert agent.memory.route and agent.memory.route_drops == 0  # no route ever led into a hole
    assert agent.memory.route_return == 1.0 and agent.memory.holes  # holes found on the way
    assert {"follow_route", "explore:random", "explore:greedy"} <= set(rec.labels)
    evals = [v for n, _, v in rec.metrics if n == "eval/mean_return"]
    assert evals == [1.0, 1.0, 1.0]  # greedy, the plans follow the route to the goal
    assert sum(1 for n, _, _ in rec.metrics if n == "bdi/decisions") == 300
    names = [a.filename for a in agent.artifacts()]
    assert names == ["bdi_memory.json", "q_table.npy"]
    saved = Memory.from_json(agent.artifacts()[0].data)
    assert saved.route == agent.memory.route and saved.holes == agent.memory.holes


def test_routes_that_lead_into_holes_are_dropped_on_slippery_ice() -> None:
    agent, rec = train_bdi({"env": "FrozenLake-v1", "algo": "bdi", "episodes": 1500, "seed": 2})
    assert agent.memory.route_drops == 3 and not agent.memory.route  # routes no longer trusted
    assert rec.labels["follow_route"] > 0  # but they were followed before
    assert len(agent.memory.holes) == 4  # every hole of the 4x4 map was found


def test_same_seed_same_returns() -> None:
    config = {"env": "FrozenLake-v1", "algo": "bdi", "episodes": 400, "seed": 9}
    _, first = train_bdi(config)
    _, again = train_bdi(config)
    _, other = train_bdi({**config, "seed": 10})
    assert first.returns == again.returns and first.lengths == again.lengths
    assert first.labels == again.labels
    assert (first.returns, first.lengths) != (other.returns, other.lengths)


def test_on_the_cliff_a_better_route_replaces_a_worse_one() -> None:
    agent, rec = train_bdi({"env": "CliffWalking-v1", "algo": "bdi", "episodes": 300, "seed": 1})
    assert agent.memory.route_return is not None and agent.memory.route_return >= -17
    assert agent.memory.holes and all(row == 3 for row, _ in agent.memory.holes)  # the cliff
    assert max(rec.returns[-20:]) >= -17


def test_the_grid_of_each_world() -> None:
    lake = Grid.of(training.make_env(parse_config({**NON_SLIPPERY, "env_kwargs": {
        "desc": ["SFH", "FFF", "HFG"], "is_slippery": False}})))
    assert (lake.nrow, lake.ncol, lake.goal) == (3, 3, (2, 2))
    assert lake.target(0, 0) == (0, 0) and lake.target(0, 1) == (1, 0)  # left at the wall; down
    cliff = Grid.of(training.make_env(parse_config({**NON_SLIPPERY, "env": "CliffWalking-v1",
                                                    "env_kwargs": {}})))
    assert (cliff.nrow, cliff.ncol, cliff.goal, cliff.cliff_reward) == (4, 12, (3, 11), -100.0)


def test_a_custom_plan_file_labels_the_steps_with_its_plans(tmp_path: Path) -> None:
    plans = write_plans(tmp_path, "@careful\n+!decide <- .exploit.\n")
    agent, rec = train_bdi({**NON_SLIPPERY, "episodes": 20, "agent": {"plans": plans}})
    assert set(rec.labels) == {"careful"} and not agent.memory.route


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("+!decide <- .explore\n", r"syntax error in .*mine\.asl: mine\.asl:1:\d+: unexpected end of file"),
        ("+!decide <- .fly(north).\n", r"mine\.asl:1:13: unknown action \.fly/1 .*\.explore/0"),
        ("+!decide : pos(_, _) <- .explore.\n", "no plan for \\+!decide without a context"),
        ("+!goal_reached <- .cache_route.\n", "no plan for \\+!decide"),
    ],
)
def test_a_broken_plan_file_is_refused_before_training(tmp_path: Path, text: str,
                                                       message: str) -> None:
    plans = write_plans(tmp_path, text)
    with pytest.raises(PlanError, match=message):
        train_bdi({**NON_SLIPPERY, "agent": {"plans": plans}})


def test_a_plan_that_chooses_nothing_fails_with_its_reason(tmp_path: Path) -> None:
    plans = write_plans(tmp_path, '+!decide <- .print("thinking").\n')
    with pytest.raises(PlanError, match="chose no way to act"):
        train_bdi({**NON_SLIPPERY, "agent": {"plans": plans}})
    plans = write_plans(tmp_path, "+!decide <- .follow_route.\n")
    with pytest.raises(PlanError, match="not on a cached route"):
        train_bdi({**NON_SLIPPERY, "agent": {"plans": plans}})


def test_bdi_config_is_checked_at_submit() -> None:
    assert check_environment(parse_config({**NON_SLIPPERY, "env": "FrozenLake8x8-v1"})) == "discrete"
    assert parse_config({**NON_SLIPPERY, "agent": {"plans": "grid.asl"}}).params() == BdiParams(
        plans="grid.asl")
    cases = [({"env": "Taxi-v4", "env_kwargs": {}}, "algo", "needs a grid world"),
             ({"env": "CartPole-v1", "env_kwargs": {}}, "algo", "needs a grid world"),
             ({"agent": {"plans": "relative/mine.asl"}}, "agent.plans", "absolute path"),
             ({"agent": {"plans": "/nowhere/mine.asl"}}, "agent.plans", "no such file"),
             ({"agent": {"gamma": 2}}, "agent.gamma", "between 0 and 1")]
    for changes, field, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            check_environment(parse_config({**NON_SLIPPERY, **changes}))
        assert info.value.field == field
    assert (SHIPPED_PLANS / "grid.asl").is_file()


def test_the_run_fails_at_start_on_a_bad_plan_file(start: Any, sink: FrameSink,  # noqa: F811
                                                   tmp_path: Path) -> None:
    plans = write_plans(tmp_path, "+!decide <- .teleport.\n")
    run: ChildRun = start({**NON_SLIPPERY, "agent": {"plans": plans}})
    code, out = run.wait()
    assert code == RunExit.FAILED, out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    assert last.body["status"] == "failed" and last.body["steps"] == 0  # before any step
    assert last.body["reason"].startswith("PlanError: ")
    assert "unknown action .teleport/0" in last.body["reason"]
    assert not any(f.kind is FrameKind.STEP for f in frames)
