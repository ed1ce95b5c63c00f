"""The run-config schema: what a researcher submits, validated field by field.

`parse_config` checks names, types and ranges, from the config alone, and raises ConfigError
naming the field. Whether the environment exists and the policy of an evaluation run fits is
the controller's check (services/controller/validation.py); where policies are saved is
shared/policy_files.py. A command run (`command`) launches a user's own script on a worker
instead of a built-in agent: its script decides the environment, the budget and the seed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from gymbus.shared.config_values import (
    INT_MAX,
    checked,
    count,
    duration,
    integer,
    label,
    memory_size,
    positive_int,
    string,
    table,
    tags,
)
from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import TelemetryMode


@dataclass(frozen=True)
class QLearningParams:
    """Tabular Q-learning with an epsilon-greedy behaviour policy."""

    learning_rate: float = 0.1
    """step size of the temporal-difference update at the first episode"""
    learning_rate_end: float = 0.01
    """step size at the end of the budget: it falls linearly from learning_rate (equal: constant)"""
    gamma: float = 0.99
    """discount factor"""
    epsilon_start: float = 1.0
    """exploration rate at the first episode"""
    epsilon_end: float = 0.01
    """exploration rate once the decay is over"""
    epsilon_decay: float = 0.5
    """fraction of the episode budget over which epsilon falls linearly from start to end"""


@dataclass(frozen=True)
class BdiParams(QLearningParams):
    """A BDI agent: AgentSpeak plans choose between a cached route and its Q-learner (the fields
    above are the Q-learner's)."""

    plans: str = ""
    """AgentSpeak plan file: empty for the shipped grid.asl, a shipped file's name, or an
    absolute path to your own"""


@dataclass(frozen=True)
class DqnParams:
    """A deep Q-network in CleanRL's shape: replay buffer, target network, linear epsilon."""

    learning_rate: float = 1e-3
    """Adam's step size"""
    buffer_size: int = 50_000
    """transitions the replay buffer holds"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 1.0
    """target-network update rate (1.0: a hard copy)"""
    target_network_frequency: int = 500
    """environment steps between target-network updates"""
    batch_size: int = 64
    """transitions per gradient step"""
    epsilon_start: float = 1.0
    """exploration rate at the first step"""
    epsilon_end: float = 0.02
    """exploration rate once the decay is over"""
    exploration_fraction: float = 0.2
    """fraction of total_steps over which epsilon falls linearly from start to end"""
    learning_starts: int = 1000
    """environment steps before learning starts (the buffer fills with random actions)"""
    train_frequency: int = 4
    """environment steps between two training phases"""
    gradient_steps: int = 1
    """gradient steps per training phase"""
    hidden_sizes: tuple[int, ...] = (120, 84)
    """widths of the Q-network's hidden layers"""


@dataclass(frozen=True)
class RandomParams:
    """Uniformly random actions: a baseline, and a policy that leaves the env and telemetry alone."""


ALGO_PARAMS: dict[str, type] = {
    "q-learning": QLearningParams, "bdi": BdiParams, "dqn": DqnParams, "random": RandomParams,
}
#: algo -> the observation-space kinds it accepts ("discrete", "box": a 1-D Box, "other")
ALGO_OBSERVATIONS: dict[str, frozenset[str]] = {
    "q-learning": frozenset({"discrete"}),
    "bdi": frozenset({"discrete"}),
    "dqn": frozenset({"box"}),
    "random": frozenset({"discrete", "box", "other"}),
}
#: algos that act in any action space (the others need a Discrete one)
ANY_SPACE_ALGOS = frozenset({"random"})
#: algo -> the environment families (ids without their version) it is limited to
ALGO_FAMILIES: dict[str, frozenset[str]] = {
    "bdi": frozenset({"FrozenLake", "FrozenLake8x8", "CliffWalking"}),
}
#: the algo of a command run: a user's script, not a built-in agent
COMMAND_ALGO = "command"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: a dotted module name (env_module, and the module part of an entry point)
MODULE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class RunConfig:
    """One run: training, or the evaluation of a saved policy (`eval_from` or `policy`).
    Field names are the keys of a run file and of `gymbus submit`."""

    env: str
    """Gymnasium environment id (FrozenLake-v1, or module:EnvId-v0), or an entry point
    module:Attr naming an Env class or a function that makes one; a command run's is a label"""
    algo: str
    """q-learning, bdi, dqn or random; command for a command run"""
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
    tags: dict[str, str] = field(default_factory=dict)
    """labels to filter runs by, e.g. {lr = "0.1", arm = "baseline"} (a sweep's say its point)"""
    group: str = ""
    """the id of the group the run belongs to (a sweep gives all its runs one)"""
    eval_from: str | None = None
    """evaluate the policy saved by this run (a run id): greedy episodes, nothing trained or saved"""
    policy: str | None = None
    """evaluate the policy at this absolute path (a q_table.npy, a q_network.pt or a folder)"""
    eval_every: int | None = None
    """while training, evaluate the greedy policy every N episodes (metrics eval/*)"""
    eval_episodes: int = 100
    """episodes of each evaluation made by eval_every"""
    env_module: str | None = None
    """a module imported before gymnasium.make, which registers the environment ids it names"""
    command: list[str] | None = None
    """a command run: the program and its arguments, launched on a worker (its gymbus.run()
    records the run)"""
    cwd: str | None = None
    """a command run's working directory, where it was submitted from (the run folder where the
    worker has no such directory)"""
    cpus: int | None = None
    """CPU cores the run needs; it is pinned to that many distinct cores of its worker"""
    memory: int | None = None
    """memory limit in bytes (a run file or the CLI may say 512MiB, 2GiB); past it the run fails"""
    gpus: int | None = None
    """GPUs the run needs, given to it by CUDA_VISIBLE_DEVICES (0: it sees none)"""
    timeout: float | None = None
    """time limit in seconds (a run file or the CLI may say 90s, 30m, 2h); past it the run fails"""

    @property
    def evaluates(self) -> bool:
        """An evaluation run: it loads a policy (eval_from or policy) instead of training one."""
        return self.eval_from is not None or self.policy is not None

    @property
    def launches(self) -> bool:
        """A command run: a user's script runs, not a built-in agent."""
        return self.command is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["telemetry"] = self.telemetry.value
        return out

    def params(self) -> Any:
        """The algorithm's hyperparameters as its params dataclass."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.agent.items()}
        return ALGO_PARAMS[self.algo](**values)


_FIELDS = {f.name: f for f in fields(RunConfig)}


def parse_config(raw: Any) -> RunConfig:
    """Validate a config mapping (from the CLI, a TOML file or the wire) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"expected a table of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    values = {k: v for k, v in raw.items() if v is not None}
    if "command" in values or values.get("algo") == COMMAND_ALGO:
        return _parse_command_run(values)
    if "cwd" in values:
        raise ConfigError("cwd", "only applies to a command run")
    for name in ("env", "algo"):
        if name not in values:
            raise ConfigError(name, "is required")
    env = string(values, "env")
    algo = string(values, "algo")
    if algo not in ALGO_PARAMS:
        raise ConfigError("algo", f"unknown algorithm {algo!r} (known: {', '.join(ALGO_PARAMS)})")
    episodes = positive_int(values, "episodes")
    total_steps = positive_int(values, "total_steps")
    if episodes is None and total_steps is None:
        raise ConfigError("episodes", "give a budget: episodes, total_steps or both")
    seed = integer(values, "seed", 0, lo=0)
    if seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {seed}")
    telemetry, every = _telemetry(values)
    agent = table(values, "agent")
    _check_params(algo, agent)
    agent_id = string(values, "agent_id", "agent-0")
    if not _NAME_RE.match(agent_id):
        raise ConfigError("agent_id", "use 1 to 64 letters, digits, and . _ : -")
    eval_from, policy, eval_every = _check_evaluation(values, algo, total_steps)
    return RunConfig(
        env=env,
        algo=algo,
        episodes=episodes,
        total_steps=total_steps,
        seed=seed,
        telemetry=telemetry,
        every=every,
        max_episode_steps=positive_int(values, "max_episode_steps"),
        env_kwargs=checked(table(values, "env_kwargs"), "env_kwargs"),
        agent=agent,
        agent_id=agent_id,
        name=string(values, "name", ""),
        tags=tags(values, "tags"),
        group=label(values, "group"),
        eval_from=eval_from,
        policy=policy,
        eval_every=eval_every,
        eval_episodes=positive_int(values, "eval_episodes") or 100,
        env_module=_module_name(values, "env_module"),
        **_limits(values),
    )


#: fields a command run's script decides for itself: given with a value of their own, refused
_SCRIPT_DECIDES = ("episodes", "total_steps", "seed", "max_episode_steps", "env_kwargs",
                   "env_module", "agent", "agent_id", "eval_from", "policy", "eval_every",
                   "eval_episodes")


def _parse_command_run(values: dict[str, Any]) -> RunConfig:
    """A command run: the program and its arguments, where to run it, a label and telemetry."""
    command = values.get("command")
    if command is None:
        raise ConfigError("command", f"is required with algo = {COMMAND_ALGO}")
    if not isinstance(command, list | tuple) or not all(isinstance(a, str) for a in command):
        raise ConfigError("command", "expected a list of strings (the program and its "
                                     f"arguments), got {command!r}")
    if not command or not command[0]:
        raise ConfigError("command", 'is empty: give the program and its arguments, e.g. '
                                     '["python", "train.py"]')
    algo = string(values, "algo", COMMAND_ALGO)
    if algo != COMMAND_ALGO:
        raise ConfigError("algo", f"a command run's script is its algorithm: give algo = "
                                  f"{COMMAND_ALGO} or none, not {algo!r}")
    for name in _SCRIPT_DECIDES:
        spec = _FIELDS[name]
        default = {} if spec.default_factory is not dataclasses.MISSING else spec.default
        if name in values and values[name] != default:
            raise ConfigError(name, "does not apply to a command run: its script decides "
                                    "(give it as an argument in the command)")
    cwd = string(values, "cwd") if "cwd" in values else None
    if cwd is not None and not os.path.isabs(cwd):
        raise ConfigError("cwd", f"give an absolute path, got {cwd!r}")
    telemetry, every = _telemetry(values)
    return RunConfig(env=string(values, "env", ""), algo=COMMAND_ALGO, telemetry=telemetry,
                     every=every, name=string(values, "name", ""), tags=tags(values, "tags"),
                     group=label(values, "group"), command=list(command), cwd=cwd,
                     **_limits(values))


def _limits(values: dict[str, Any]) -> dict[str, Any]:
    """The resource limits, each optional (an absent one is not enforced)."""
    return {"cpus": positive_int(values, "cpus"), "memory": memory_size(values, "memory"),
            "gpus": count(values, "gpus"), "timeout": duration(values, "timeout")}


def _telemetry(values: dict[str, Any]) -> tuple[TelemetryMode, int | None]:
    """The telemetry mode, and `every` with sampled (required there, refused elsewhere)."""
    try:
        telemetry = TelemetryMode(values.get("telemetry", TelemetryMode.FULL.value))
    except ValueError:
        modes = ", ".join(m.value for m in TelemetryMode)
        raise ConfigError("telemetry", f"must be one of {modes}, got {values['telemetry']!r}") from None
    every = positive_int(values, "every")
    if telemetry is TelemetryMode.SAMPLED and every is None:
        raise ConfigError("every", "is required with telemetry = sampled")
    if telemetry is not TelemetryMode.SAMPLED and every is not None:
        raise ConfigError("every", "only applies with telemetry = sampled")
    return telemetry, every


def _module_name(values: dict[str, Any], name: str) -> str | None:
    if name not in values:
        return None
    value = string(values, name)
    if not MODULE_NAME_RE.match(value):
        raise ConfigError(name, f"expected a module name such as my_pkg.envs, got {value!r}")
    return value


def _check_evaluation(
    values: dict[str, Any], algo: str, total_steps: int | None
) -> tuple[str | None, str | None, int | None]:
    """eval_from, policy and eval_every: at most one policy source; no in-run evaluation there."""
    eval_from = string(values, "eval_from") if "eval_from" in values else None
    policy = string(values, "policy") if "policy" in values else None
    eval_every = positive_int(values, "eval_every")
    if eval_from is not None and not _RUN_ID_RE.match(eval_from):
        raise ConfigError("eval_from", f"expected a run id, got {eval_from!r}")
    if policy is not None and not os.path.isabs(policy):
        raise ConfigError("policy", f"give an absolute path (the worker reads it), got {policy!r}")
    if eval_from is not None and policy is not None:
        raise ConfigError("policy", "give eval_from or policy, not both")
    evaluates = eval_from is not None or policy is not None
    if evaluates and algo == "random":
        raise ConfigError("algo", "random has no policy to evaluate")
    if evaluates and eval_every is not None:
        raise ConfigError("eval_every", "only applies to training runs, not to evaluation")
    if algo == "dqn" and not evaluates and total_steps is None:
        raise ConfigError("total_steps", "dqn trains for a number of environment steps: give it")
    return eval_from, policy, eval_every


def _check_params(algo: str, agent: dict[str, Any]) -> None:
    """Each hyperparameter by its default's type: numbers in [0, 1], counts > 0, layer widths."""
    params_cls = ALGO_PARAMS[algo]
    known = {f.name: f for f in fields(params_cls)}
    for key, value in agent.items():
        name = f"agent.{key}"
        if key not in known:
            names = ", ".join(known) or "none"
            raise ConfigError(name, f"unknown hyperparameter for {algo} (known: {names})")
        default = known[key].default
        if isinstance(default, float):
            if type(value) not in (int, float):
                raise ConfigError(name, f"expected a number, got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(name, f"must be between 0 and 1, got {value}")
            agent[key] = float(value)
        elif isinstance(default, tuple):
            if (not isinstance(value, list | tuple) or not value
                    or any(type(v) is not int or not 0 < v <= INT_MAX for v in value)):
                raise ConfigError(name, f"expected a list of integers between 1 and {INT_MAX}, "
                                        f"got {value!r}")
            agent[key] = list(value)
        elif type(value) is not type(default):
            raise ConfigError(name, f"expected {type(default).__name__}, got {value!r}")
        elif isinstance(value, int) and value < (0 if key in _MAY_BE_ZERO else 1):
            raise ConfigError(name, f"must be >= {0 if key in _MAY_BE_ZERO else 1}, got {value}")
        elif isinstance(value, int) and value > INT_MAX:
            raise ConfigError(name, f"must be between {0 if key in _MAY_BE_ZERO else 1} and "
                                    f"{INT_MAX}, got {value}")
        elif isinstance(value, str) and value and key == "plans" and not _PLAN_RE.match(
                value) and not (os.path.isabs(value) and value.endswith(".asl")):
            raise ConfigError(name, "give a shipped plan file's name (e.g. grid.asl) or an "
                              f"absolute path to an .asl file, got {value!r}")


_MAY_BE_ZERO = frozenset({"learning_starts"})
_PLAN_RE = re.compile(r"^[A-Za-z0-9_.-]+\.asl$")

