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

import logging
from typing import Any

import gymnasium as gym

from gymbus.recorder import EpisodeColumns, Recorder, StepPolicy
from gymbus.recording import RecordedEnv
from gymbus.shared.protocol import TelemetryMode
from gymbus.spaces import layout, unsupported
from gymbus.worker.telemetry.emitter import Emitter
from gymbus.worker.telemetry.tensorboard import ScalarLog
from gymbus.worker.training import NullTelemetry

log = logging.getLogger("gymbus.run")


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
        obs = layout(env.observation_space, "observation")
        action = layout(env.action_space, "action", store_large=True)
        for kind, space, what in ((obs, env.observation_space, "observation"),
                                  (action, env.action_space, "action")):
            if kind.kind == "none":  # its steps are stored without those values
                log.warning("%s", kind.description.get("reason") or unsupported(space, what))
        self._tensorboard = tensorboard
        self.recorder = Recorder(emitter.send_columns, on_episodes=self._episode_curves,
                                 max_frame_bytes=max_frame_bytes)
        self.env = RecordedEnv(env, self.recorder, StepPolicy.of_mode(mode, every or 1),
                               obs, action)
        #: what the run's config says of its spaces (as a recorded script's does)
        self.spaces = {"env": {"observation": obs.description, "action": action.description,
                               "num_envs": 1, "info_keys": []}}
        self.telemetry = _Metrics(emitter)

    def _episode_curves(self, episodes: EpisodeColumns) -> None:
        if self._tensorboard is not None:
            self._tensorboard.add_episodes(episodes["global_step"], episodes["return"],
                                           episodes["length"], episodes["ts_ns"])

    def finish(self) -> None:
        """End the episode under way (stored as far as it went) and send what is buffered."""
        self.env.finish()
        self.recorder.flush()

    def counts(self) -> dict[str, int]:
        """What was not stored, for run_completed: observations left out, rows refused."""
        rec = self.recorder
        return {"obs_not_stored": rec.obs_not_stored, "rows_refused": rec.refused}
