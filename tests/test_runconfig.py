"""Run-config validation: every bad field gets an error naming it; good configs keep their values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gymbus.services.controller.validation import check_environment, check_run
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import QLearningParams, parse_config

BASE = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10}


def test_a_minimal_config_gets_defaults() -> None:
    config = parse_config(dict(BASE))
    assert (config.seed, config.telemetry, config.agent_id) == (0, TelemetryMode.FULL, "agent-0")
    assert config.params() == QLearningParams()
    assert check_environment(config) == "discrete"
    assert parse_config(config.to_dict()) == config


def test_hyperparameters_and_env_kwargs_pass_through() -> None:
    config = parse_config({**BASE, "agent": {"learning_rate": 1, "gamma": 0.9},
                           "env_kwargs": {"is_slippery": False, "map_name": "8x8"},
                           "telemetry": "sampled", "every": 10})
    assert config.params().learning_rate == 1.0
    assert config.params().gamma == 0.9
    assert check_environment(config) == "discrete"


def test_a_vector_environment_suits_the_random_agent() -> None:
    config = parse_config({"env": "CartPole-v1", "algo": "random", "total_steps": 100})
    assert check_environment(config) == "box"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"episodes": -5}, "episodes", "must be > 0"),
        ({"episodes": 0}, "episodes", "must be > 0"),
        ({"episodes": "ten"}, "episodes", "expected an integer"),
        ({"episodes": 2.5}, "episodes", "expected an integer"),
        ({"episodes": True}, "episodes", "expected an integer"),
        ({"episodes": None}, "episodes", "give a budget"),
        ({"seed": -1}, "seed", "must be >= 0"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"algo": "sarsa"}, "algo", "unknown algorithm 'sarsa'"),
        ({"algo": 3}, "algo", "expected a string"),
        ({"telemetry": "loud"}, "telemetry", "must be one of full, fast, sampled"),
        ({"telemetry": "sampled"}, "every", "is required with telemetry = sampled"),
        ({"every": 3}, "every", "only applies with telemetry = sampled"),
        ({"agent": {"alpha": 0.1}}, "agent.alpha", "unknown hyperparameter"),
        ({"agent": {"gamma": 1.5}}, "agent.gamma", "between 0 and 1"),
        ({"agent": {"gamma": "high"}}, "agent.gamma", "expected a number"),
        ({"agent": [1]}, "agent", "expected a table"),
        ({"agent_id": "has space"}, "agent_id", "letters, digits"),
        ({"max_episode_steps": -1}, "max_episode_steps", "must be > 0"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({**BASE, **changes})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"algo": "q-learning", "episodes": 3})
    assert info.value.field == "env"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"env": "NoSuchEnv-v0"}, "env", "'NoSuchEnv-v0' is not a registered environment"),
        ({"env": "Taxi-v3"}, "env", "use 'Taxi-v4'"),
        ({"env": "CliffWalking-v0"}, "env", "use 'CliffWalking-v1'"),
        ({"env": "CartPole-v1"}, "algo", "q-learning cannot learn CartPole-v1"),
        ({"env_kwargs": {"map_name": "9x9"}}, "env_kwargs.map_name",
         "has no map_name '9x9' \\(it has '4x4', '8x8'\\)"),
        ({"env_kwargs": {"no_such_arg": 1}}, "env_kwargs.no_such_arg",
         "takes no argument no_such_arg"),
    ],
)
def test_environment_problems_are_named(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        check_environment(parse_config({**BASE, **changes}))
    assert info.value.field == field


def test_an_evaluation_run_is_checked_against_the_settings_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller's own settings say where policies are, whatever this process's GYMBUS_HOME."""
    given = settings_mod.load({"GYMBUS_HOME": str(tmp_path / "given")})
    environ = settings_mod.load({"GYMBUS_HOME": str(tmp_path / "environ")})
    monkeypatch.setenv("GYMBUS_HOME", str(environ.home))
    config = parse_config({**BASE, "eval_from": "01QL"})

    def save_policy(settings: settings_mod.Settings) -> None:
        folder = settings.run_dir("01QL") / "artifacts"
        folder.mkdir(parents=True)
        np.save(folder / "q_table.npy", np.zeros((16, 4)))

    save_policy(given)  # only where the settings given point
    assert check_run(config, given) == "discrete"
    with pytest.raises(ConfigError, match="saved no policy") as info:
        check_run(config, environ)
    assert info.value.field == "eval_from"

    save_policy(environ)  # only where the environment points
    elsewhere = settings_mod.load({"GYMBUS_HOME": str(tmp_path / "elsewhere")})
    with pytest.raises(ConfigError, match="saved no policy"):
        check_run(config, elsewhere)
    with pytest.raises(ValueError, match="runs folder"):
        check_environment(config)  # no runs folder given: no guess from the environment


def test_settings_come_from_prefixed_variables(tmp_path: Any) -> None:
    s = settings_mod.load({"GYMBUS_HOME": str(tmp_path), "GYMBUS_TELEMETRY_IN": "tcp://h:1",
                           "GYMBUS_WORKER_SLOTS": "4"})
    assert (s.home, s.telemetry_in, s.worker_slots) == (tmp_path, "tcp://h:1", 4)
    assert s.db_path == tmp_path / "gymbus.duckdb"
    assert settings_mod.load(settings_mod.env_for(s)) == s


@pytest.mark.parametrize(("var", "value"), [("GYMBUS_WORKER_SLOTS", "many"),
                                            ("GYMBUS_HEARTBEAT_INTERVAL", "0"),
                                            ("GYMBUS_INGEST_THREADS", "0")])
def test_bad_settings_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_mod.load({var: value})
    assert info.value.field == var
