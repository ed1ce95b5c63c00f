"""The run-config schema: what a researcher submits, validated field by field.

`parse_config` checks names, types and ranges; `check_environment` builds the environment once
to check that it exists here and suits the algorithm. Both raise ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any

from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import TelemetryMode


@dataclass(frozen=True)
class QLearningParams:
    """Tabular Q-learning with an epsilon-greedy behaviour policy."""

    learning_rate: float = 0.1
    """step size of the temporal-difference update"""
    gamma: float = 0.99
    """discount factor"""
    epsilon_start: float = 1.0
    """exploration rate at the first episode"""
    epsilon_end: float = 0.05
    """exploration rate once the decay is over"""
    epsilon_decay: float = 0.5
    """fraction of the episode budget over which epsilon falls linearly from start to end"""


@dataclass(frozen=True)
class RandomParams:
    """Uniformly random actions: a baseline, and a policy that leaves the env and telemetry alone."""


ALGO_PARAMS: dict[str, type] = {"q-learning": QLearningParams, "random": RandomParams}
#: algo -> the observation-space kinds it accepts ("discrete" or "box")
ALGO_OBSERVATIONS: dict[str, frozenset[str]] = {
    "q-learning": frozenset({"discrete"}),
    "random": frozenset({"discrete", "box"}),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class RunConfig:
    """One training run. Field names are the keys of a run file and of `gymbus submit`."""

    env: str
    """Gymnasium environment id, e.g. FrozenLake-v1"""
    algo: str
    """q-learning or random"""
    episodes: int | None = None
    """episode budget"""
    total_steps: int | None = None
    """environment-step budget; with `episodes` too, whichever comes first ends the run"""
    seed: int = 0
    """seeds the environment, the agent and every random generator of the run"""
    telemetry: TelemetryMode = TelemetryMode.FULL
    """full (every step), fast (no step frames) or sampled (every Nth episode's steps)"""
    every: int | None = None
    """with telemetry = sampled: store the steps of every Nth episode"""
    max_episode_steps: int | None = None
    """truncate episodes at this length (the environment's own limit otherwise)"""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """keyword arguments for gymnasium.make, e.g. {is_slippery = false}"""
    agent: dict[str, Any] = field(default_factory=dict)
    """the algorithm's hyperparameters (see its params class)"""
    agent_id: str = "agent-0"
    """names the agent in telemetry (viewers open one tab per agent)"""
    name: str = ""
    """a label for people; not unique"""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["telemetry"] = self.telemetry.value
        return out

    def params(self) -> Any:
        """The algorithm's hyperparameters as its params dataclass."""
        return ALGO_PARAMS[self.algo](**self.agent)


_FIELDS = {f.name: f for f in fields(RunConfig)}


def parse_config(raw: Any) -> RunConfig:
    """Validate a config mapping (from the CLI, a TOML file or the wire) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"expected a table of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    values = {k: v for k, v in raw.items() if v is not None}
    for name in ("env", "algo"):
        if name not in values:
            raise ConfigError(name, "is required")
    env = _string(values, "env")
    algo = _string(values, "algo")
    if algo not in ALGO_PARAMS:
        raise ConfigError("algo", f"unknown algorithm {algo!r} (known: {', '.join(ALGO_PARAMS)})")
    episodes = _positive_int(values, "episodes")
    total_steps = _positive_int(values, "total_steps")
    if episodes is None and total_steps is None:
        raise ConfigError("episodes", "give a budget: episodes, total_steps or both")
    seed = _int(values, "seed", 0)
    if seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {seed}")
    try:
        telemetry = TelemetryMode(values.get("telemetry", TelemetryMode.FULL.value))
    except ValueError:
        modes = ", ".join(m.value for m in TelemetryMode)
        raise ConfigError("telemetry", f"must be one of {modes}, got {values['telemetry']!r}") from None
    every = _positive_int(values, "every")
    if telemetry is TelemetryMode.SAMPLED and every is None:
        raise ConfigError("every", "is required with telemetry = sampled")
    if telemetry is not TelemetryMode.SAMPLED and every is not None:
        raise ConfigError("every", "only applies with telemetry = sampled")
    agent = _table(values, "agent")
    _check_params(algo, agent)
    agent_id = _string(values, "agent_id", "agent-0")
    if not _NAME_RE.match(agent_id):
        raise ConfigError("agent_id", "use 1 to 64 letters, digits, and . _ : -")
    return RunConfig(
        env=env,
        algo=algo,
        episodes=episodes,
        total_steps=total_steps,
        seed=seed,
        telemetry=telemetry,
        every=every,
        max_episode_steps=_positive_int(values, "max_episode_steps"),
        env_kwargs=_table(values, "env_kwargs"),
        agent=agent,
        agent_id=agent_id,
        name=_string(values, "name", ""),
    )


def _string(values: dict[str, Any], name: str, default: str | None = None) -> str:
    value = values.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}")
    return value


def _int(values: dict[str, Any], name: str, default: int) -> int:
    value = values.get(name, default)
    if type(value) is not int:
        raise ConfigError(name, f"expected an integer, got {value!r}")
    return value


def _positive_int(values: dict[str, Any], name: str) -> int | None:
    if name not in values:
        return None
    value = _int(values, name, 0)
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value}")
    return value


def _table(values: dict[str, Any], name: str) -> dict[str, Any]:
    value = values.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(name, f"expected a table of named values, got {value!r}")
    return dict(value)


def _check_params(algo: str, agent: dict[str, Any]) -> None:
    params_cls = ALGO_PARAMS[algo]
    known = {f.name: f for f in fields(params_cls)}
    for key, value in agent.items():
        if key not in known:
            names = ", ".join(known) or "none"
            raise ConfigError(f"agent.{key}", f"unknown hyperparameter for {algo} (known: {names})")
        default = known[key].default
        if isinstance(default, float):
            if type(value) not in (int, float):
                raise ConfigError(f"agent.{key}", f"expected a number, got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"agent.{key}", f"must be between 0 and 1, got {value}")
            agent[key] = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"agent.{key}", f"expected {type(default).__name__}, got {value!r}")


# --- the environment ------------------------------------------------------------------------


def check_environment(config: RunConfig) -> str:
    """Build the environment once; return its observation kind ("discrete" or "box").

    Raises ConfigError for an id this Gymnasium lacks (naming the current version when only
    the version is off), bad env_kwargs, or spaces the algorithm cannot handle.
    """
    import gymnasium as gym

    if config.env not in gym.envs.registry:
        raise ConfigError("env", _unknown_env_message(config.env, tuple(gym.envs.registry)))
    key = (config.env, repr(sorted(config.env_kwargs.items())), config.algo)
    if key not in _KIND_CACHE:
        _KIND_CACHE[key] = _spaces_kind(config.env, config.env_kwargs, config.algo)
    return _KIND_CACHE[key]


_KIND_CACHE: dict[tuple[str, str, str], str] = {}


def _unknown_env_message(env_id: str, known: tuple[str, ...]) -> str:
    base = env_id.rsplit("-v", 1)[0]
    same_base = sorted(k for k in known if k.rsplit("-v", 1)[0] == base)
    if same_base:
        return f"{env_id!r} is not in this Gymnasium; use {same_base[-1]!r}"
    return f"unknown environment {env_id!r}"


def _spaces_kind(env_id: str, kwargs: dict[str, Any], algo: str) -> str:
    import gymnasium as gym
    from gymnasium import spaces

    try:
        env = gym.make(env_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - an environment may raise anything for bad kwargs
        raise ConfigError("env_kwargs", f"{env_id} refused them: {exc}") from None
    try:
        if not isinstance(env.action_space, spaces.Discrete):
            raise ConfigError("env", f"{env_id} has a {env.action_space} action space; "
                              f"{algo} needs a discrete one")
        obs_space = env.observation_space
        if isinstance(obs_space, spaces.Discrete):
            kind = "discrete"
        elif isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1:
            kind = "box"
        else:
            kind = "other"
        if kind not in ALGO_OBSERVATIONS[algo]:
            raise ConfigError("algo", f"{algo} cannot learn {env_id}: its observations are "
                              f"{obs_space}, and {algo} needs {' or '.join(ALGO_OBSERVATIONS[algo])}")
        return kind
    finally:
        env.close()
