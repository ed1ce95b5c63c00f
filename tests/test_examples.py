"""examples/ppo.py, the CleanRL-style PPO, run as a user runs it: against a real stack, and with
no stack at all (its run is then stored by `gymbus sync`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STACK_ENV, gymbus_cli_json, stack_fixture, store_query, stored_run

from gymbus.services.stack.launcher import Stack, free_endpoints

stack = stack_fixture("examples", **STACK_ENV)

PPO = Path(__file__).resolve().parents[1] / "examples" / "ppo.py"
#: two envs, 64 steps each per rollout: four iterations of 128 steps
FLAGS = ("--total-timesteps", "512", "--num-envs", "2", "--num-steps", "64")
ITERATION_STEPS = [128, 256, 384, 512]
#: what the example logs where CleanRL writes to its SummaryWriter
METRICS = {"losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl",
           "losses/old_approx_kl", "losses/clipfrac", "charts/learning_rate", "charts/SPS"}


def run_example(env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """Run examples/ppo.py with FLAGS; the run id it prints at the end, and its last line."""
    result = subprocess.run([sys.executable, str(PPO), *FLAGS], env=env, capture_output=True,
                            text=True, timeout=120, check=False, cwd=cwd)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    found = re.match(r"run (\w+): 512 steps", last)
    assert found, result.stdout
    return found.group(1), last




def check_stored(stack: Stack, run_id: str) -> None:
    """Every step of the run's four iterations, its episodes, and CleanRL's metrics."""
    row = stored_run(stack, run_id)
    assert (row["status"], row["backend"], row["env"]) == ("completed", "cleanrl", "CartPole-v1")
    assert row["name"].startswith("CartPole-v1__ppo__1__")
    assert json.loads(row["config"])["config"]["num_envs"] == 2
    assert row["steps"] == 512
    steps = store_query(stack, f"SELECT env_index, count(*) AS n FROM steps WHERE run_id = "
                         f"'{run_id}' GROUP BY env_index ORDER BY env_index")
    assert steps == [{"env_index": 0, "n": 256}, {"env_index": 1, "n": 256}]
    # each sub-environment's episodes, the last one cut by the run's end, hold all its steps
    episodes = store_query(stack, f"SELECT env_index, count(*) AS n, sum(length) AS steps, "
                            f"count(*) FILTER (terminated OR truncated) AS ended FROM episodes "
                            f"WHERE run_id = '{run_id}' GROUP BY env_index ORDER BY env_index")
    assert [(e["env_index"], e["steps"]) for e in episodes] == [(0, 256), (1, 256)]
    assert all(e["ended"] >= 3 for e in episodes), episodes
    metrics = store_query(stack, f"SELECT name, list(step ORDER BY step) AS steps FROM metrics "
                           f"WHERE run_id = '{run_id}' GROUP BY name")
    at = {m["name"]: m["steps"] for m in metrics}
    assert METRICS <= set(at), sorted(at)
    assert all(at[name] == ITERATION_STEPS for name in METRICS), at


def test_the_ppo_example_is_recorded_through_a_stack(stack: Stack, tmp_path: Path) -> None:
    run_id, _ = run_example(stack.process_env(), tmp_path)
    check_stored(stack, run_id)


@pytest.mark.slow  # test_api.py's offline tests cover the same path in the default suite
def test_the_ppo_example_runs_without_a_stack_and_is_synced_later(stack: Stack,
                                                                   tmp_path: Path) -> None:
    # the stack's data folder, but endpoints where nothing listens
    dead = {k: v for k, v in free_endpoints(tmp_path / "nowhere").items() if k != "GYMBUS_HOME"}
    run_id, last = run_example(stack.process_env(dead), tmp_path)
    assert f"`gymbus sync {run_id}`" in last
    assert store_query(stack, f"SELECT count(*) AS n FROM frames WHERE run_id = '{run_id}'") \
        == [{"n": 0}]
    synced = gymbus_cli_json(stack.process_env(), "sync", run_id)
    assert [(r["run_id"], r["stored"]) for r in synced] == [(run_id, True)]
    check_stored(stack, run_id)
