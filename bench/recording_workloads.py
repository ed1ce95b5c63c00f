"""The user's scripts that bench/recording_overhead.py times, one run per process.

    python bench/recording_workloads.py CASE VARIANT STEPS SEED RESULT_JSON

Each run imports what every variant of its case imports before its clock starts, times itself
(the whole of what the user waits for, the loop alone, and the process's CPU time of both) and
writes its numbers to RESULT_JSON; bench/recording_overhead.py says what is timed and why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: case -> its variants, in the order they run each round
CASES: dict[str, tuple[str, ...]] = {
    "cartpole": ("bare", "full", "fast", "minari", "wandb"),
    "vector": ("bare", "full"),
    "sb3": ("bare", "full"),
    "pendulum": ("bare", "full"),
    "pixels": ("bare", "full", "full+pixels"),
}
#: modules a variant needs beyond gymbus: without them it is skipped
NEEDS = {"minari": ("minari", "h5py", "jax"), "wandb": ("wandb",),
         "sb3": ("stable_baselines3",)}
RECORDED = ("full", "fast", "full+pixels")
VECTOR_ENVS, SB3_ENVS = 8, 4


def single_loop(env: Any, steps: int, seed: int) -> int:
    """A random policy for `steps` steps; returns the episodes ended."""
    env.action_space.seed(seed)
    env.reset(seed=seed)
    episodes = 0
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
            episodes += 1
    return episodes


def wandb_loop(env: Any, steps: int, seed: int, log: Callable[[dict[str, Any]], None]) -> int:
    """`single_loop` with one wandb.log per step, of the step's reward and action."""
    env.action_space.seed(seed)
    env.reset(seed=seed)
    episodes = 0
    for _ in range(steps):
        action = env.action_space.sample()
        _, reward, terminated, truncated, _ = env.step(action)
        log({"reward": reward, "action": action})
        if terminated or truncated:
            env.reset()
            episodes += 1
    return episodes


def vector_loop(envs: Any, steps: int, seed: int) -> int:
    """Random actions for `steps` sub-environment steps; returns the episodes ended."""
    envs.action_space.seed(seed)
    envs.reset(seed=seed)
    episodes = 0
    for _ in range(steps // envs.num_envs):
        _, _, terminated, truncated, _ = envs.step(envs.action_space.sample())
        episodes += int((terminated | truncated).sum())
    return episodes


def make_pixels() -> Any:
    """A 64x64 RGB observation per step (a square moving over a gradient), 200-step episodes."""
    import gymnasium as gym
    import numpy as np

    class Pixels(gym.Env[Any, Any]):
        def __init__(self) -> None:
            self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
            self.action_space = gym.spaces.Discrete(4)
            base = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)[..., None]
            self.frames = np.repeat(base, 3, axis=2)[None].repeat(64, axis=0)
            for i, frame in enumerate(self.frames):
                frame[i:i + 8, i:i + 8] = (255, 0, 0)
            self.t = 0

        def reset(self, *, seed: int | None = None,
                  options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
            super().reset(seed=seed)
            self.t = 0
            return self.frames[0], {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
            self.t += 1
            return self.frames[self.t % 64], 1.0, False, self.t >= 200, {}

    return Pixels()


def make_env(case: str) -> Any:
    import gymnasium as gym

    if case == "vector":
        return gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * VECTOR_ENVS)
    if case == "pixels":
        return make_pixels()
    return gym.make("Pendulum-v1" if case == "pendulum" else "CartPole-v1")


def sb3_learn(steps: int, seed: int, run: Any) -> tuple[float, float, dict[str, Any]]:
    """PPO on SB3_ENVS CartPole envs (recorded when `run` is given): start, loop, numbers."""
    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from gymbus.integrations.sb3 import GymbusCallback

    # one thread: with two, on a busy 2-core machine each op waits for a descheduled OpenMP
    # thread, and learn() runs 10-20 times slower, recorded or not
    torch.set_num_threads(1)
    wrap = None if run is None else run.record
    env = make_vec_env("CartPole-v1", n_envs=SB3_ENVS, seed=seed, wrapper_class=wrap)
    model = PPO("MlpPolicy", env, seed=seed, device="cpu")
    t1, c1 = time.perf_counter(), time.process_time()
    model.learn(steps, callback=None if run is None else GymbusCallback(run))
    loop = (time.perf_counter() - t1, time.process_time() - c1)
    env.close()
    returns = [e["r"] for e in model.ep_info_buffer or ()]
    return loop[0], loop[1], {"steps": int(model.num_timesteps), "episodes": len(returns),
                              "ep_rew_mean": float(np.mean(returns)) if returns else None}


def child(case: str, variant: str, steps: int, seed: int) -> dict[str, Any]:
    """One timed run of `case` as `variant`, in this (fresh) process."""
    import gymnasium  # noqa: F401  # imported by every variant before the clock starts

    import gymbus
    from gymbus.worker.telemetry import spool

    for name in {m for v in CASES[case] for m in NEEDS.get(v, ())} | set(NEEDS.get(case, ())):
        if importlib.util.find_spec(name):
            __import__(name)  # the same imports, and so the same heap, in every variant
    out: dict[str, Any] = {"steps": steps}
    loop = vector_loop if case == "vector" else single_loop
    recorded = variant in RECORDED
    t0, c0 = time.perf_counter(), time.process_time()
    if case == "sb3":
        if recorded:
            with gymbus.run(name=f"bench-{case}-{variant}", backend="sb3") as run:
                loop_s, loop_cpu, numbers = sb3_learn(steps, seed, run)
        else:
            loop_s, loop_cpu, numbers = sb3_learn(steps, seed, None)
        out.update(numbers)
    elif recorded:
        mode = "fast" if variant == "fast" else "full"
        with gymbus.run(name=f"bench-{case}-{variant}", telemetry=mode,
                        config={"env": case}) as run:
            env = run.record(make_env(case), store_large_obs=variant == "full+pixels")
            t1, c1 = time.perf_counter(), time.process_time()
            out["episodes"] = loop(env, steps, seed)
            loop_s, loop_cpu = time.perf_counter() - t1, time.process_time() - c1
            env.close()
    elif variant == "minari":
        import minari

        env = minari.DataCollector(make_env(case))
        t1, c1 = time.perf_counter(), time.process_time()
        out["episodes"] = loop(env, steps, seed)
        loop_s, loop_cpu = time.perf_counter() - t1, time.process_time() - c1
        env.create_dataset(f"{case}/bench{os.getpid()}-v0", algorithm_name="random",
                           author="bench", author_email="bench@localhost",
                           code_permalink="bench", description="bench",
                           eval_env=env.env.spec)
        env.close()
    elif variant == "wandb":
        import wandb

        wb = wandb.init(mode="offline", project="gymbus-bench")
        env = make_env(case)
        t1, c1 = time.perf_counter(), time.process_time()
        out["episodes"] = wandb_loop(env, steps, seed, wb.log)
        loop_s, loop_cpu = time.perf_counter() - t1, time.process_time() - c1
        env.close()
        wb.finish()
    else:
        env = make_env(case)
        t1, c1 = time.perf_counter(), time.process_time()
        out["episodes"] = loop(env, steps, seed)
        loop_s, loop_cpu = time.perf_counter() - t1, time.process_time() - c1
        env.close()
    ended = time.perf_counter()
    out.update(seconds=ended - t0, cpu_seconds=time.process_time() - c0,
               loop_seconds=loop_s, loop_cpu_seconds=loop_cpu)
    if recorded:
        # not timed: the checkpoint that frees the spool, which the script's exit waits for
        stored = run.wait_stored(120)
        stats = run.stats()
        out.update(run_id=run.run_id, confirmed=stored and spool.is_confirmed(run.run_dir),
                   confirm_s=time.perf_counter() - ended,
                   recorded=stats["steps"], obs_not_stored=stats["obs_not_stored"],
                   refused=stats["rows_refused"], offline=stats["offline"])
    return out


if __name__ == "__main__":
    case, variant, steps, seed, result = sys.argv[1:]
    Path(result).write_text(json.dumps(child(case, variant, int(steps), int(seed))))
