"""Stable-Baselines3: everything SB3 logs into `metrics`, and with the wrapper every step.

    import gymbus
    from gymbus.integrations.sb3 import GymbusCallback
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    with gymbus.run(name="ppo-cartpole", backend="sb3") as run:
        env = make_vec_env("CartPole-v1", n_envs=4, seed=1, wrapper_class=run.record)
        model = PPO("MlpPolicy", env, seed=1)
        model.learn(50_000, callback=GymbusCallback(run))

`wrapper_class=run.record` records each sub-environment (around SB3's `Monitor`, so the
episodes stored are the ones SB3 counts); `GymbusCallback` adds `GymbusOutputFormat` to the
model's logger, so that every value SB3 dumps (`rollout/ep_rew_mean`, `train/loss`,
`time/fps`, ...) is a metric at SB3's `num_timesteps`. Neither changes what SB3 computes: the same seed gives
the same returns with and without them.
"""

from __future__ import annotations

import numbers
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter

from gymbus.session import Run, UsageError


class GymbusOutputFormat(KVWriter):
    """An SB3 logger output: each dump's numeric values as metrics of the run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        #: values that were not numbers (SB3 also logs text, figures, videos): not stored
        self.skipped = 0

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]],
              step: int = 0) -> None:
        values = {}
        for key, value in key_values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                values[key] = float(value)
            elif getattr(value, "ndim", None) == 0:  # a numpy scalar or 0-d tensor
                values[key] = float(value.item())
            else:
                self.skipped += 1
        if values:
            self.run.log(values, step=int(step))

    def close(self) -> None:
        """The run ends with its `with` block, not with SB3's logger."""


class GymbusCallback(BaseCallback):
    """Sends what SB3 logs to a gymbus run (see the module's docstring)."""

    def __init__(self, run: Run, verbose: int = 0) -> None:
        super().__init__(verbose)
        if not isinstance(run, Run):
            raise UsageError(f"GymbusCallback takes the run of `with gymbus.run() as run`, "
                             f"got {type(run).__name__}")
        self.run = run
        self.output = GymbusOutputFormat(run)

    def _on_training_start(self) -> None:
        logger = self.model.logger
        if not any(isinstance(f, GymbusOutputFormat) for f in logger.output_formats):
            logger.output_formats.append(self.output)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.run.recorder.flush()
