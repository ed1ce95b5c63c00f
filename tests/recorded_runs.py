"""Real runs recorded into a private stack through `import gymbus` and `run.record(env)`, for the
tests of what comes out of the store (export, the Python reader, docs/data.md's queries)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from conftest import wait_until

from gymbus.services.ingest.store import Store
from gymbus.services.stack.launcher import Stack
from gymbus.shared.codec import Frame, decode_frame, encode_frame
from gymbus.shared.protocol import FrameKind

#: the services a recorded script needs: no worker
ROLES = ("ingest", "broker", "controller")

#: two CartPole runs of one group (seeds 1 and 2), a FrozenLake run, a fast-mode CartPole run
RECORD = """
    import json, gymnasium as gym, numpy as np, gymbus
    ids = {}
    def record(key, env_id, seed, episodes, telemetry="full", **kwargs):
        config = {"env": env_id, "seed": seed, "group": "cartpole-seeds", "env_kwargs": kwargs}
        with gymbus.run(name=key, config=config, telemetry=telemetry) as run:
            env = run.record(gym.make(env_id, **kwargs))
            rng, steps = np.random.default_rng(seed), 0
            for ep in range(episodes):
                env.reset(seed=seed * 1000 + ep)
                done = False
                while not done:
                    _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
                    steps, done = steps + 1, term or trunc
                run.log({"charts/epsilon": 1.0 / (ep + 1)}, step=steps)
        ids[key] = run.run_id
    record("cart-1", "CartPole-v1", 1, 12)
    record("cart-2", "CartPole-v1", 2, 12)
    record("lake", "FrozenLake-v1", 3, 40, is_slippery=False)
    record("fast", "CartPole-v1", 4, 5, telemetry="fast")
    print(json.dumps(ids))
"""


def record_runs(stack: Stack) -> dict[str, str]:
    """Record the runs of RECORD into the stack; name -> run id, each stored complete."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(RECORD)],
                            env=stack.process_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    ids: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    quoted = ", ".join(f"'{r}'" for r in ids.values())
    wait_until(lambda: rows(stack, f"SELECT count(*) AS n FROM runs WHERE run_id IN ({quoted}) "
                                   "AND complete")[0]["n"] == len(ids), 20, "runs stored complete")
    return ids


def rows(stack: Stack, sql: str) -> list[dict[str, Any]]:
    """A statement's rows through the stack's store client (the ingest, or the file)."""
    from gymbus.services.ingest.client import StoreClient

    with StoreClient(stack.settings) as client:
        return client.rows(sql)


# --- the same kinds of runs written straight into a DuckDB file by the ingest's Store ----------

T0_NS = 1_700_000_000_000_000_000


def _frame(kind: FrameKind, run_id: str, seq: int, body: dict[str, Any]) -> Frame:
    """A frame as the ingest gets it: encoded by the codec, then decoded and checked."""
    parts = encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="w1",
                         ts_ns=T0_NS + seq * 1_000_000)
    return decode_frame(list(parts))


def _obs(value: Any) -> Any:
    return int(value) if np.ndim(value) == 0 else [float(v) for v in np.ravel(value)]


def play(store: Store, run_id: str, env_id: str, seed: int, episodes: int,
         telemetry: str = "full", **kwargs: Any) -> None:
    """Play a real Gymnasium env with random actions and store its frames as a run would."""
    config = {"config": {"env": env_id, "seed": seed, "env_kwargs": kwargs}}
    seq = 0
    store.add(_frame(FrameKind.LIFECYCLE, run_id, seq, {
        "event": "run_started", "config": config, "env": env_id, "telemetry": telemetry}))
    env, rng, total = gym.make(env_id, **kwargs), np.random.default_rng(seed), 0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + ep)
        first, rows, done = _obs(obs), [], False
        while not done:
            action = int(rng.integers(env.action_space.n))
            obs, reward, term, trunc, _ = env.step(action)
            done = term or trunc
            rows.append((ep, len(rows), action, _obs(obs), float(reward), term, trunc))
        total += len(rows)
        if telemetry == "full":
            seq += 1
            store.add(_frame(FrameKind.STEP, run_id, seq, dict(zip(
                ("episode", "step", "action", "obs", "reward", "terminated", "truncated"),
                map(list, zip(*rows, strict=True)), strict=True))))
        seq += 1
        store.add(_frame(FrameKind.EPISODE, run_id, seq, {
            "episode": [ep], "return": [sum(r[4] for r in rows)], "length": [len(rows)],
            "terminated": [bool(rows[-1][5])], "truncated": [bool(rows[-1][6])],
            "ts_ns": [T0_NS + seq], "seed": [seed * 1000 + ep], "reset_obs": [first]}))
        seq += 1
        store.add(_frame(FrameKind.METRIC, run_id, seq, {
            "name": ["charts/epsilon"], "step": [total], "value": [1.0 / (ep + 1)],
            "ts_ns": [T0_NS + seq]}))
    seq += 1
    store.add(_frame(FrameKind.LIFECYCLE, run_id, seq, {
        "event": "run_completed", "status": "completed", "frames_emitted": seq + 1,
        "reason": None}))
    env.close()


#: the runs `build_store` writes: run id -> (env id, seed, episodes, telemetry, env kwargs)
BUILT: dict[str, tuple[str, int, int, str, dict[str, Any]]] = {
    "cart-1": ("CartPole-v1", 1, 12, "full", {}),
    "cart-2": ("CartPole-v1", 2, 12, "full", {}),
    "lake": ("FrozenLake-v1", 3, 300, "full", {"is_slippery": False}),
    "fast": ("CartPole-v1", 4, 5, "fast", {}),
}


def build_store(path: Path) -> None:
    """The runs of BUILT in a new DuckDB file at `path`, through the ingest's Store."""
    store = Store(path)
    try:
        for run_id, (env_id, seed, episodes, telemetry, kwargs) in BUILT.items():
            play(store, run_id, env_id, seed, episodes, telemetry, **kwargs)
    finally:
        store.close()
