"""A built-in run on spaces that the training loop's own step columns do not take.

The loop's step columns (`worker/telemetry/step_buffer.py`) hold what the learning agents
see: an integer action, and an integer or a flat vector as the observation. The random agent
acts in any action space, so its runs may have continuous or multi-valued actions (Pendulum-v1,
MultiDiscrete, MultiBinary), images, or Dict and Tuple spaces. Such a run is recorded by the
recording API's own wrapper (`gymbus.recording.RecordedEnv`, what `run.record(env)` makes) on
the run's emitter: the same frames, typed columns and defaults as a recorded script (images not
stored per step but counted, docs/python-api.md), the spaces described in the run's config,
the episodes' TensorBoard curves. The loop then runs as in fast mode, the wrapper recording
steps and episodes as the run's telemetry mode asks; its metrics still go through the emitter.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from gymbus.recorder import Recorder, StepPolicy
from gymbus.recording import RecordedEnv
from gymbus.shared.protocol import TelemetryMode
from gymbus.spaces import env_layouts
from gymbus.worker.telemetry.emitter import Emitter
from gymbus.worker.telemetry.tensorboard import ScalarLog
from gymbus.worker.training import NullTelemetry


class _Metrics(NullTelemetry):
    """The loop's telemetry when the wrapper records steps and episodes: metrics only."""

    def __init__(self, emitter: Emitter) -> None:
        self._emitter = emitter

    def metric(self, name: str, step: int, value: float) -> None:
        self._emitter.metric(name, step, value)


class RecordedSpaces:
    """`env` recorded by the API's wrapper onto `emitter`, as `mode` (and `every`) ask."""

    def __init__(self, env: gym.Env[Any, Any], emitter: Emitter, tensorboard: ScalarLog | None,
                 mode: TelemetryMode, every: int | None, max_frame_bytes: int) -> None:
        obs, action, described = env_layouts(env.observation_space, env.action_space)
        self.recorder = Recorder(emitter.send_columns, max_frame_bytes=max_frame_bytes,
                                 on_episodes=None if tensorboard is None
                                 else tensorboard.add_episode_columns)
        self.env = RecordedEnv(env, self.recorder, StepPolicy.of_mode(mode, every or 1),
                               obs, action)
        #: what the run's config says of its spaces (as a recorded script's does)
        self.spaces = {"env": described}
        self.telemetry = _Metrics(emitter)

    def finish(self) -> None:
        """End the episode under way (stored as far as it went) and send what is buffered."""
        self.env.finish()
        self.recorder.flush()
