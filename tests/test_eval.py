"""Evaluation runs: a saved policy is found, checked against the env, and played greedily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import STACK_ENV, stack_fixture
from test_agents import Recorder, train
from test_child import check_complete, sink, start  # noqa: F401 - fixtures
from test_emitter import FrameSink
from test_integration import gymbus, gymbus_json, query

from gymbus.services.controller.validation import check_environment
from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import ConfigError
from gymbus.shared.policy_files import guess_policy_algo, policy_path
from gymbus.shared.protocol import FrameKind, LifecycleEvent
from gymbus.shared.runconfig import parse_config
from gymbus.worker import training
from gymbus.worker.agents.policies import PolicyError, write_artifact
from gymbus.worker.child import RunExit

LAKE = {"env": "FrozenLake-v1", "env_kwargs": {"is_slippery": False}}


def save_trained(runs_dir: Path, run_id: str, algo: str = "q-learning", seed: int = 1) -> Any:
    """Train FrozenLake (non-slippery) and save the agent's artifacts as run `run_id` did."""
    agent, *_ = train({**LAKE, "algo": algo, "episodes": 300, "seed": seed})
    for artifact in agent.artifacts():
        write_artifact(runs_dir / run_id / "artifacts", artifact)
    return agent


def evaluate(config: dict[str, Any], runs_dir: Path) -> Recorder:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg, greedy=True)
    rec = Recorder()
    agent = training.make_agent(cfg, env, rng, rec, runs_dir=runs_dir)
    assert agent.artifacts() == []  # an evaluation saves nothing
    training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed)
    return rec


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"eval_from": "../../etc"}, "eval_from", "expected a run id"),
        ({"policy": "relative/q_table.npy"}, "policy", "absolute path"),
        ({"eval_from": "01RUN", "policy": "/x/q_table.npy"}, "policy", "not both"),
        ({"eval_from": "01RUN", "eval_every": 10}, "eval_every", "only applies to training"),
        ({"eval_from": "01RUN", "algo": "random"}, "algo", "no policy to evaluate"),
        ({"eval_every": 0}, "eval_every", "must be > 0"),
        ({"eval_episodes": -1}, "eval_episodes", "must be > 0"),
    ],
)
def test_evaluation_fields_are_named(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({**LAKE, "algo": "q-learning", "episodes": 5, **changes})
    assert info.value.field == field


def test_the_policy_file_is_found_by_run_folder_or_path(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    save_trained(runs, "01QL")
    save_trained(runs, "01BDI", algo="bdi")
    table = runs / "01QL" / "artifacts" / "q_table.npy"
    for policy in (table, table.parent, runs / "01QL"):
        config = parse_config({**LAKE, "algo": "q-learning", "episodes": 5, "policy": str(policy)})
        assert policy_path(config, runs) == table
        assert config.evaluates and config.to_dict()["policy"] == str(policy)
    config = parse_config({**LAKE, "algo": "q-learning", "episodes": 5, "eval_from": "01QL"})
    assert policy_path(config, runs) == table
    assert guess_policy_algo(table) == guess_policy_algo(runs / "01QL") == "q-learning"
    assert guess_policy_algo(runs / "01BDI") == "bdi"
    assert guess_policy_algo(tmp_path) is None
    refusals = [({"algo": "dqn", "eval_from": "01QL"}, "eval_from", "dqn loads q_network.pt"),
                ({"eval_from": "01NONE"}, "eval_from", "saved no policy"),
                ({"algo": "dqn", "policy": str(table)}, "policy", "not a dqn policy"),
                ({"policy": str(tmp_path / "nothing.npy")}, "policy", "no such file"),
                ({"eval_from": "01QL", "env": "FrozenLake8x8-v1", "env_kwargs": {}}, "eval_from",
                 r"is \(16, 4\), but FrozenLake8x8-v1 has 64 states and 4 actions")]
    for changes, field, message in refusals:
        raw = {**LAKE, "algo": "q-learning", "episodes": 5, **changes}
        if raw["algo"] == "dqn":
            raw.update(env="CartPole-v1", env_kwargs={})
        with pytest.raises(ConfigError, match=message) as info:
            check_environment(parse_config(raw), runs)
        assert info.value.field == field


def test_greedy_episodes_replay_the_saved_q_table(tmp_path: Path) -> None:
    agent = save_trained(tmp_path / "runs", "01QL")
    config = {**LAKE, "algo": "q-learning", "episodes": 20, "eval_from": "01QL", "seed": 5}
    rec = evaluate(config, tmp_path / "runs")
    assert rec.returns == [1.0] * 20 and set(rec.lengths) == {6}
    assert {row[-1] for row in rec.steps} == {"greedy"}
    actions = [row[2] for row in rec.steps[:6]]
    state, path = 0, []
    for _ in range(6):
        path.append(agent.greedy_action(state))
        state = int(rec.steps[len(path) - 1][3])
    assert actions == path
    assert [v for n, _, v in rec.metrics if n == "charts/epsilon"] == [0.0] * 20
    again = evaluate(config, tmp_path / "runs")
    assert again.returns == rec.returns and again.steps == rec.steps


def test_a_bdi_policy_is_evaluated_with_its_plans_and_route(tmp_path: Path) -> None:
    save_trained(tmp_path / "runs", "01BDI", algo="bdi")
    memory = json.loads((tmp_path / "runs" / "01BDI" / "artifacts" / "bdi_memory.json").read_text())
    assert memory["route"] and memory["route_drops"] == 0
    rec = evaluate({**LAKE, "algo": "bdi", "episodes": 5, "eval_from": "01BDI"}, tmp_path / "runs")
    assert rec.returns == [1.0] * 5 and {row[-1] for row in rec.steps} == {"follow_route"}
    # the saved memory is what the evaluation used, and is left as it was
    after = json.loads((tmp_path / "runs" / "01BDI" / "artifacts" / "bdi_memory.json").read_text())
    assert after == memory


def test_a_broken_policy_fails_at_load(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "01BAD" / "artifacts"
    folder.mkdir(parents=True)
    np.save(folder / "q_table.npy", np.full((16, 4), np.nan))
    config = {**LAKE, "algo": "q-learning", "episodes": 1, "eval_from": "01BAD"}
    with pytest.raises(PolicyError, match="NaN"):
        evaluate(config, tmp_path / "runs")
    np.save(folder / "q_table.npy", np.zeros((16, 4, 1)))
    with pytest.raises(PolicyError, match=r"is \(16, 4, 1\)"):
        evaluate(config, tmp_path / "runs")


def test_an_evaluation_child_saves_nothing_and_a_mismatch_fails_at_start(
    start: Any, sink: FrameSink, gymbus_env: dict[str, str]  # noqa: F811
) -> None:
    runs = Path(gymbus_env["GYMBUS_HOME"]) / "runs"
    save_trained(runs, "01TRAINED")
    run = start({**LAKE, "algo": "q-learning", "episodes": 30, "eval_from": "01TRAINED"})
    code, out = run.wait()
    assert code == RunExit.COMPLETED, out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    assert not [f for f in frames if f.kind is FrameKind.LIFECYCLE
                and f.body["event"] == LifecycleEvent.ARTIFACT]
    assert not (run.run_dir / "artifacts").exists()
    returns = np.concatenate([f.body["return"] for f in frames if f.kind is FrameKind.EPISODE])
    assert returns.tolist() == [1.0] * 30 and last.body["episodes"] == 30

    mismatch = start({"env": "FrozenLake8x8-v1", "algo": "q-learning", "episodes": 5,
                      "eval_from": "01TRAINED"}, run_id="01MISMATCH")
    code, _ = mismatch.wait()
    assert code == RunExit.FAILED
    last = sink.wait_completed("01MISMATCH")
    assert last.body["status"] == "failed" and last.body["steps"] == 0
    assert "PolicyError: the Q-table q_table.npy is (16, 4), but FrozenLake8x8-v1 has 64 " \
           "states and 4 actions" == last.body["reason"]


stack = stack_fixture("eval", **STACK_ENV)


@pytest.mark.integration
def test_submit_eval_from_through_the_stack(stack: Stack) -> None:
    trained = gymbus_json(stack, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                          "--episodes", "300", "--seed", "1", "--env-arg", "is_slippery=false",
                          "--fast", "--wait")
    assert trained["status"] == "completed"
    source = trained["run_id"]
    evaluated = gymbus_json(stack, "submit", "--eval-from", source, "--episodes", "50", "--wait")
    assert evaluated["status"] == "completed" and evaluated["episodes"] == 50
    run_id = evaluated["run_id"]
    config = gymbus_json(stack, "status", run_id)
    assert (config["env"], config["algo"]) == ("FrozenLake-v1", "q-learning")  # from the source
    rows = query(stack, f"SELECT avg(return) AS mean, count(*) AS n FROM episodes "
                        f"WHERE run_id = '{run_id}'")
    assert rows == [{"mean": 1.0, "n": 50}]
    labels = query(stack, f"SELECT DISTINCT label FROM steps WHERE run_id = '{run_id}'")
    assert labels == [{"label": "greedy"}]
    artifacts = query(stack, f"SELECT run_id FROM lifecycle WHERE event = 'artifact' "
                             f"AND run_id IN ('{source}', '{run_id}')")
    assert artifacts == [{"run_id": source}]  # the training saved its Q-table, the evaluation none

    table = stack.settings.run_dir(source) / "artifacts" / "q_table.npy"
    by_path = gymbus_json(stack, "submit", "--env", "FrozenLake-v1", "--env-arg",
                          "is_slippery=false", "--policy", str(table), "--episodes", "10", "--wait")
    assert by_path["status"] == "completed" and by_path["episodes"] == 10

    refused = [(["--eval-from", "01NOSUCHRUN0000000000000000", "--episodes", "5"], 4, "no run"),
               (["--eval-from", source, "--env", "FrozenLake8x8-v1", "--episodes", "5"], 2,
                "eval_from: the Q-table q_table.npy is (16, 4)"),
               (["--eval-from", run_id, "--episodes", "5"], 2, "is an evaluation run")]
    for args, code, message in refused:
        result = gymbus(stack, "submit", *args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, result.stderr


def test_the_cli_makes_paths_absolute_and_names_the_algo(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from gymbus.services.cli.runs import absolute_plans, complete_evaluation

    save_trained(tmp_path / "runs", "01QL")
    monkeypatch.chdir(tmp_path)
    config = complete_evaluation(None, {**LAKE, "policy": "runs/01QL", "episodes": 5})  # type: ignore[arg-type]
    assert config["policy"] == str(tmp_path / "runs" / "01QL") and config["algo"] == "q-learning"
    assert parse_config(config).evaluates
    for policy, message in [("nope.npy", "no such file"), (".", "holds no policy gymbus knows")]:
        with pytest.raises(ConfigError, match=message) as info:
            complete_evaluation(None, {**LAKE, "policy": policy})  # type: ignore[arg-type]
        assert info.value.field == "policy"
    (tmp_path / "mine.asl").write_text("+!decide <- .explore.\n")
    config = {"agent": {"plans": "mine.asl"}}
    absolute_plans(config)
    assert config["agent"]["plans"] == str(tmp_path / "mine.asl")
    shipped = {"agent": {"plans": "grid.asl"}}
    absolute_plans(shipped)
    assert shipped["agent"]["plans"] == "grid.asl"  # not a file here: a shipped plan's name
