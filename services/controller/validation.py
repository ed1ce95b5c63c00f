"""The controller's checks of a submitted run against this host: the environment and the policy.

`check_run` builds the environment once to check that it exists here and suits the algorithm
(found as a run child finds it: worker/envs.py, importing the config's env_module or entry
point), and finds an evaluation run's saved policy under the controller's runs folder and checks
that it fits. Both raise ConfigError naming the field. A command run's environments are its
script's: nothing is built for it. Building an environment or reading a policy may
take a while, so `Validator` runs the checks on threads of its own and hands the results back
to the controller's loop.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gymbus.services.controller import env_args
from gymbus.shared.errors import ConfigError
from gymbus.shared.policy_files import policy_path, read_network_meta
from gymbus.shared.runconfig import ALGO_FAMILIES, ALGO_OBSERVATIONS, ANY_SPACE_ALGOS, RunConfig
from gymbus.shared.settings import Settings

if TYPE_CHECKING:
    from gymbus.worker.envs import EnvSource

log = logging.getLogger("gymbus.controller")

#: checks that may run at once: a slow environment holds up one of them, not every submission
VALIDATION_THREADS = 4


def check_run(config: RunConfig, settings: Settings) -> str:
    """Everything the controller checks before it stores a run; the observation kind.

    An evaluation run's policy is looked for under `settings.runs_dir`: the runs folder of the
    controller's home, where the runs it scheduled saved theirs.
    """
    return check_environment(config, settings.runs_dir)


def check_environment(config: RunConfig, runs_dir: Path | None = None) -> str:
    """Build the environment once; return its observation kind ("discrete" or "box"; "" for a
    command run, whose environment is not built).

    Raises ConfigError for an id this Gymnasium lacks (naming the current version when only
    the version is off, else the closest ids), an env_module or entry point that does not
    import or lacks the attribute, bad env_kwargs, spaces or an environment the algorithm
    cannot handle, and, for an evaluation run, a policy that is missing or does not fit the
    environment (looked for under `runs_dir`, which an evaluation run needs).
    """
    if config.launches:
        return ""
    from gymbus.worker import envs  # gymnasium, imported on the validation threads only

    source = envs.resolve(config)
    env_args.check(config, source)
    families = ALGO_FAMILIES.get(config.algo)
    if families is not None and _family(config.env) not in families:
        raise ConfigError("algo", f"{config.algo} needs a grid world ({', '.join(sorted(families))}"
                                  f"); {config.env} is not one")
    key = (config.env, config.env_module or "", repr(sorted(config.env_kwargs.items())),
           config.algo)
    if key not in _SPACES_CACHE:
        _SPACES_CACHE[key] = _spaces(config, source)
    found = _SPACES_CACHE[key]
    plans = config.agent.get("plans", "")
    if plans and os.path.isabs(plans) and not os.path.isfile(plans):
        raise ConfigError("agent.plans", f"no such file: {plans}")
    if config.evaluates:
        if runs_dir is None:
            raise ValueError("checking an evaluation run needs the runs folder its policy is in")
        _check_policy_fits(config, policy_path(config, runs_dir), found)
    return found.kind


@dataclass(frozen=True)
class _Spaces:
    kind: str
    #: states of a Discrete observation space, or the length of a Box observation
    n_obs: int
    n_actions: int


#: (env, env_module, env_kwargs, algo) -> its spaces; shared by the validation threads (a lost
#: race only builds the environment twice)
_SPACES_CACHE: dict[tuple[str, str, str, str], _Spaces] = {}


def _family(env_id: str) -> str:
    return env_id.split(":")[-1].rsplit("-v", 1)[0]


def _spaces(config: RunConfig, source: EnvSource) -> _Spaces:
    from gymnasium import spaces

    from gymbus.worker import envs

    env_id, algo = config.env, config.algo
    try:
        env = envs.build(config, source)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an environment may raise anything for bad kwargs
        if config.env_kwargs:
            raise env_args.refusal(config, source, exc) from None
        raise ConfigError("env", f"{env_id} could not be built: {type(exc).__name__}: "
                                 f"{exc}") from None
    try:
        actions = env.action_space
        if not isinstance(actions, spaces.Discrete) and algo not in ANY_SPACE_ALGOS:
            raise ConfigError("env", f"{env_id} has a {actions} action space; "
                              f"{algo} needs a discrete one (random acts in any)")
        obs_space = env.observation_space
        if isinstance(obs_space, spaces.Discrete):
            kind, n_obs = "discrete", int(obs_space.n)
        elif isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 1:
            kind, n_obs = "box", int(obs_space.shape[0])
        else:
            kind, n_obs = "other", 0
        if kind not in ALGO_OBSERVATIONS[algo]:
            raise ConfigError("algo", f"{algo} cannot learn {env_id}: its observations are "
                              f"{obs_space}, and {algo} needs {' or '.join(ALGO_OBSERVATIONS[algo])}")
        return _Spaces(kind, n_obs, int(actions.n) if isinstance(actions, spaces.Discrete) else 0)
    finally:
        env.close()


def _check_policy_fits(config: RunConfig, path: Path, env: _Spaces) -> None:
    """The saved Q-table's shape, or the network's input and output sizes, match the env's."""
    field_name = "eval_from" if config.eval_from is not None else "policy"
    if path.suffix == ".npy":
        import numpy as np

        try:
            shape = tuple(np.load(path, mmap_mode="r").shape)
        except (OSError, ValueError) as exc:
            raise ConfigError(field_name, f"cannot read the Q-table {path}: {exc}") from None
        if shape != (env.n_obs, env.n_actions):
            raise ConfigError(field_name, f"the Q-table {path.name} is {shape}, but {config.env} "
                              f"has {env.n_obs} states and {env.n_actions} actions")
        return
    meta = read_network_meta(path, field_name)
    if (meta.get("obs_size"), meta.get("n_actions")) != (env.n_obs, env.n_actions):
        raise ConfigError(field_name, f"the network {path.name} takes {meta.get('obs_size')} "
                          f"inputs and has {meta.get('n_actions')} actions, but {config.env} "
                          f"has {env.n_obs} and {env.n_actions}")


# --- off the loop thread ------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """A submitted run whose config parsed: who asked (the API's peer identity and request
    number), its idempotency key, and the config to check."""

    identity: bytes
    req: int
    key: str
    config: RunConfig


class Validator:
    """Runs `check` on a few threads of its own, so that the loop keeps serving meanwhile.

    `start`, `finished` and `close` run on the loop thread, which owns every ZeroMQ socket: the
    threads only put results on a queue and write a byte to `wakeup_fd`, a plain socket that the
    loop's poller watches. The threads are daemons and `close` does not wait for them, so that a
    check that never returns cannot hold up shutdown (an executor's threads are joined at exit).
    """

    def __init__(
        self,
        settings: Settings,
        check: Callable[[RunConfig, Settings], object] = check_run,
        threads: int = VALIDATION_THREADS,
    ) -> None:
        self.settings = settings
        self.check = check
        self._jobs: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Submission, Exception | None]] = queue.SimpleQueue()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        #: held while the write end is used or closed (a thread may finish as the loop closes)
        self._wake_lock = threading.Lock()
        self.in_flight = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"validation-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def wakeup_fd(self) -> int:
        """Readable when a result is waiting in `finished()`."""
        return self._wake_in.fileno()

    def start(self, submission: Submission) -> None:
        """Queue a submission's check. Loop thread."""
        if self._closed:
            raise RuntimeError("the validator is closed")
        self.in_flight += 1
        self._jobs.put(submission)

    def finished(self) -> list[tuple[Submission, Exception | None]]:
        """The submissions checked since the last call, each with the error its check raised
        (None: it passed). Loop thread."""
        try:
            while self._wake_in.recv(4096):
                pass
        except OSError:
            pass  # drained (BlockingIOError) or closed: the queue below is what counts
        results: list[tuple[Submission, Exception | None]] = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(results)
        return results

    def close(self) -> None:
        """Stop taking checks; checks under way are abandoned, unanswered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.in_flight:
            log.info("stopping with %d submission(s) still being validated", self.in_flight)
        for _ in self._threads:
            self._jobs.put(None)
        with self._wake_lock:
            self._wake_out.close()
        self._wake_in.close()

    def _work(self) -> None:
        """A validation thread: check submissions until the sentinel."""
        while (submission := self._jobs.get()) is not None:
            if self._closed:
                continue
            error: Exception | None = None
            try:
                self.check(submission.config, self.settings)
            except Exception as exc:  # noqa: BLE001 - the loop replies with it, as a handler's
                error = exc
            self._done.put((submission, error))
            with self._wake_lock:
                if self._closed:
                    continue
                try:
                    self._wake_out.send(b"\0")
                except BlockingIOError:
                    pass  # full of unread wake-ups: the loop wakes anyway
