"""`import gymbus`: a user's own loop recorded through a real stack, by a real script process.

Each test runs a training script of its own in a subprocess with the stack's variables (what a
user's shell has), the script prints what its loop saw (counted by hand, beside gymbus), and the
test compares that with what the store holds, through the real `gymbus` command.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    STACK_ENV,
    gymbus_cli_json,
    make_stack,
    stack_fixture,
    store_query,
    stored_run,
    wait_until,
)

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.worker.telemetry import spool

stack = stack_fixture("api", **STACK_ENV)


def script(stack: Stack, code: str, *args: str, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` as a user's script with the stack's variables (and `env` on top)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          env=stack.process_env(env), capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd)


def last_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])




SINGLE = """
    import json, gymnasium as gym, numpy as np, gymbus
    with gymbus.run(name="lake", config={"env": "FrozenLake-v1", "lr": 0.1}) as run:
        env = run.record(gym.make("FrozenLake-v1"))
        rng = np.random.default_rng(0)
        episodes, steps = [], 0
        for ep in range(30):
            obs, info = env.reset(seed=100 + ep)
            first, ret, n, done = int(obs), 0.0, 0, False
            while not done:
                obs, r, term, trunc, info = env.step(int(rng.integers(4)))
                ret, n, done = ret + r, n + 1, term or trunc
            episodes.append([first, ret, n, bool(term)])
            steps += n
            run.log({"charts/epsilon": 0.5, "losses/td_loss": np.float32(0.25)}, step=steps)
        open("policy.npy", "wb").write(b"weights")
        run.save("policy.npy")
    # the block's end waited until the ingest held every frame: a query sees them all
    held = None if run.offline else int(gymbus.sql(
        f"SELECT count(*) AS n FROM steps WHERE run_id = '{run.run_id}'")["n"][0])
    print(json.dumps({"run_id": run.run_id, "episodes": episodes, "steps": steps,
                      "held": held, "stored": run.wait_stored(30)}))
"""


def test_a_recorded_loop_is_a_run_like_any_other(stack: Stack, tmp_path: Path) -> None:
    seen = last_json(script(stack, SINGLE, cwd=tmp_path))
    run_id = seen["run_id"]
    row = stored_run(stack, run_id)
    assert row["status"] == "completed" and row["name"] == "lake"
    assert row["backend"] == "custom" and row["env"] == "FrozenLake-v1"
    assert row["steps"] == seen["steps"] and row["episodes"] == 30
    record = gymbus_cli_json(stack.process_env(), "status", run_id)
    assert record["status"] == "completed"
    episodes = store_query(stack, "SELECT episode, reset_obs, \"return\", length, terminated, seed "
                            f"FROM episodes WHERE run_id = '{run_id}' ORDER BY episode")
    assert [[e["reset_obs"], e["return"], e["length"], e["terminated"]] for e in episodes] \
        == seen["episodes"]
    assert [e["seed"] for e in episodes] == [100 + i for i in range(30)]
    steps = store_query(stack, f"SELECT count(*) AS n, count(DISTINCT episode) AS e, "
                         f"max(step) AS last FROM steps WHERE run_id = '{run_id}'")[0]
    assert steps["n"] == seen["steps"] and steps["e"] == 30
    metrics = store_query(stack, f"SELECT name, count(*) AS n, min(value) AS v FROM metrics "
                           f"WHERE run_id = '{run_id}' GROUP BY name ORDER BY name")
    assert metrics == [{"name": "charts/epsilon", "n": 30, "v": 0.5},
                       {"name": "losses/td_loss", "n": 30, "v": 0.25}]
    run_dir = stack.settings.run_dir(run_id)
    assert seen["held"] == seen["steps"]
    # then the ingest checkpointed it, and the spool was removed, before the script's exit
    assert seen["stored"] is True
    assert spool.is_confirmed(run_dir) and not spool.segments(spool.spool_dir(run_dir))
    assert (run_dir / "artifacts" / "policy.npy").read_bytes() == b"weights"
    assert list(run_dir.glob("events.out.tfevents.*"))
    artifacts = store_query(stack, f"SELECT name, path FROM lifecycle WHERE run_id = '{run_id}' "
                             "AND event = 'artifact'")
    assert artifacts == [{"name": "policy.npy", "path": "artifacts/policy.npy"}]


VECTOR = """
    import json, sys, gymnasium as gym, numpy as np, gymbus
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    mode = AutoresetMode(sys.argv[1])
    with gymbus.run(name="vec") as run:
        envs = SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3, autoreset_mode=mode)
        envs = run.record(envs)
        obs, _ = envs.reset(seed=7)
        ended = {i: [] for i in range(3)}      # per sub-env: (length, return) of each episode
        length, ret = np.zeros(3, int), np.zeros(3)
        resetting = np.zeros(3, bool)
        steps = 0
        for t in range(300):
            obs, r, term, trunc, info = envs.step(envs.action_space.sample())
            stepped = ~resetting if mode is AutoresetMode.NEXT_STEP else np.ones(3, bool)
            length[stepped] += 1
            ret[stepped] += r[stepped]
            steps += int(stepped.sum())
            done = (term | trunc) & stepped
            for i in np.flatnonzero(done):
                ended[int(i)].append([int(length[i]), float(ret[i])])
                length[i], ret[i] = 0, 0.0
            resetting = done
    print(json.dumps({"run_id": run.run_id, "ended": ended, "steps": steps,
                      "open": length.tolist()}))
"""


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_each_sub_environment_has_episodes_of_its_own(stack: Stack, mode: str) -> None:
    seen = last_json(script(stack, VECTOR, mode))
    run_id = seen["run_id"]
    stored_run(stack, run_id)
    rows = store_query(stack, f"SELECT env_index, length, \"return\", terminated OR truncated AS ended "
                        f"FROM episodes WHERE run_id = '{run_id}' ORDER BY env_index, episode")
    for i in range(3):
        mine = [r for r in rows if r["env_index"] == i]
        ended = [[r["length"], r["return"]] for r in mine if r["ended"]]
        assert ended == seen["ended"][str(i)], f"sub-environment {i}"
        cut = [r["length"] for r in mine if not r["ended"]]  # the episode the run's end cut
        assert cut == ([seen["open"][i]] if seen["open"][i] else [])
    steps = store_query(stack, f"SELECT count(*) AS n FROM steps WHERE run_id = '{run_id}'")[0]["n"]
    assert steps == seen["steps"]
    # a step row's episode is one of its sub-environment's episodes
    mixed = store_query(stack, "SELECT count(*) AS n FROM steps s JOIN episodes e USING (run_id, "
                         f"episode) WHERE s.run_id = '{run_id}' AND s.env_index <> e.env_index")
    assert mixed[0]["n"] == 0


PENDULUM = """
    import json, gymnasium as gym, gymbus
    with gymbus.run(name="pendulum") as run:
        env = run.record(gym.make("Pendulum-v1"))
        env.reset(seed=3)
        env.action_space.seed(3)
        actions = []
        for _ in range(50):
            a = env.action_space.sample()
            actions.append(float(a[0]))
            env.step(a)
    print(json.dumps({"run_id": run.run_id, "actions": actions}))
"""


def test_continuous_actions_are_stored_as_floats(stack: Stack) -> None:
    seen = last_json(script(stack, PENDULUM))
    stored_run(stack, seen["run_id"])
    rows = store_query(stack, f"SELECT action, action_vec, len(obs_vec) AS width FROM steps "
                        f"WHERE run_id = '{seen['run_id']}' ORDER BY step")
    assert [r["action_vec"][0] for r in rows] == pytest.approx(seen["actions"], abs=1e-6)
    assert {r["width"] for r in rows} == {3} and {r["action"] for r in rows} == {None}


@pytest.mark.parametrize(("raise_", "state", "reason"), [
    ("ValueError('diverged at step 3')", "failed", "ValueError: diverged at step 3"),
    ("KeyboardInterrupt()", "cancelled", "interrupted (Ctrl-C)"),
])
def test_the_block_s_end_is_the_run_s_end(stack: Stack, raise_: str, state: str,
                                        reason: str) -> None:
    code = f"""
        import json, sys, gymbus
        try:
            with gymbus.run(name="ends") as run:
                print(json.dumps({{"run_id": run.run_id}}), flush=True)
                raise {raise_}
        except BaseException as exc:
            sys.exit(7 if type(exc).__name__ == {raise_.split("(")[0]!r} else 1)
    """
    result = script(stack, code)
    assert result.returncode == 7, result.stderr  # the exception went on to the script
    run_id = json.loads(result.stdout.splitlines()[0])["run_id"]
    record = gymbus_cli_json(stack.process_env(), "status", run_id)
    assert (record["status"], record["reason"]) == (state, reason)


def test_a_script_s_exit_waits_for_its_spool_to_be_stored(stack: Stack) -> None:
    code = """
        import gymnasium as gym, gymbus
        with gymbus.run(name="exits") as run:
            env = run.record(gym.make("CartPole-v1"))
            env.reset(seed=0)
            for _ in range(20_000):
                _, _, term, trunc, _ = env.step(env.action_space.sample())
                if term or trunc:
                    env.reset()
        print(run.run_id)  # and exits at once: the spool's confirmation is still under way
    """
    result = script(stack, code)
    assert result.returncode == 0 and not result.stderr, result.stderr
    run_dir = stack.settings.run_dir(result.stdout.split()[-1])
    # checked the moment the process is gone: the exit waited for the confirmation
    assert spool.is_confirmed(run_dir) and not spool.segments(spool.spool_dir(run_dir))


def test_runs_list_shows_a_script_s_run_while_it_runs(stack: Stack) -> None:
    code = """
        import json, sys, gymbus
        with gymbus.run(name="live-script") as run:
            print(json.dumps({"run_id": run.run_id}), flush=True)
            sys.stdin.readline()
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            env=stack.process_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = json.loads(proc.stdout.readline())["run_id"]
        runs = gymbus_cli_json(stack.process_env(), "runs")
        mine = [r for r in runs if r["run_id"] == run_id]
        assert mine and mine[0]["status"] == "running" and mine[0]["name"] == "live-script"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert gymbus_cli_json(stack.process_env(), "status", run_id)["status"] == "completed"


@pytest.mark.parametrize("how", ["GYMBUS_MODE=offline", "no stack answering"])
def test_a_run_recorded_offline_is_stored_by_sync_once(stack: Stack, how: str,
                                                     tmp_path: Path) -> None:
    if how == "GYMBUS_MODE=offline":
        env = {"GYMBUS_MODE": "offline"}
    else:  # the same data folder, but endpoints where nothing listens
        dead = free_endpoints(tmp_path / "nowhere")
        env = {k: v for k, v in dead.items() if k != "GYMBUS_HOME"}
    result = script(stack, SINGLE, env=env, cwd=tmp_path)
    seen = last_json(result)
    run_id = seen["run_id"]
    # said once, on stderr, with what to do; no warning about a broker it does not need
    assert f"gymbus sync {run_id}" in result.stderr and "subscriber" not in result.stderr
    runs = gymbus_cli_json(stack.process_env(), "runs")
    assert run_id not in {r["run_id"] for r in runs}
    assert store_query(stack, f"SELECT count(*) AS n FROM frames WHERE run_id = '{run_id}'") \
        == [{"n": 0}]
    first = gymbus_cli_json(stack.process_env(), "sync", run_id)
    assert [(r["run_id"], r["stored"], r["status"]) for r in first] \
        == [(run_id, True, "completed")]
    row = stored_run(stack, run_id)
    assert (row["steps"], row["episodes"], row["name"]) == (seen["steps"], 30, "lake")
    again = gymbus_cli_json(stack.process_env(), "sync", run_id)
    assert [(r["stored"], r["status"]) for r in again] == [(True, "already stored")]
    frames = store_query(stack, f"SELECT count(*) AS n, count(DISTINCT seq) AS seqs FROM frames "
                          f"WHERE run_id = '{run_id}'")[0]
    assert frames["n"] == frames["seqs"] == row["frames_emitted"]
    assert gymbus_cli_json(stack.process_env(), "status", run_id)["status"] == "completed"


def test_misuse_of_the_api_gets_an_error_that_says_what_to_do(stack: Stack) -> None:
    code = """
        import json, math, gymnasium as gym, gymbus
        errors = {}
        def attempt(name, f):
            try:
                f()
            except gymbus.UsageError as exc:
                errors[name] = str(exc)
        attempt("bad mode", lambda: gymbus.run(telemetry="everything"))
        with gymbus.run(name="misuse") as run:
            env = run.record(gym.make("CartPole-v1"))
            attempt("twice", lambda: run.record(env))
            attempt("text", lambda: run.log({"loss": "low"}))
            attempt("step", lambda: run.log({"loss": 1.0}, step="ten"))
            run.log({"loss": math.nan, "ok": 1.0}, step=1)
            attempt("not ended", run.wait_stored)
        attempt("ended", lambda: run.log({"loss": 1.0}))
        print(json.dumps({"run_id": run.run_id, "errors": errors, "stats": run.stats()}))
    """
    seen = last_json(script(stack, code))
    errors = seen["errors"]
    assert "not one of full, fast, sampled" in errors["bad mode"]
    assert "recorded already" in errors["twice"]
    assert "'loss' is a str, not a number" in errors["text"]
    assert "the step must be an integer" in errors["step"]
    assert "has ended (completed)" in errors["ended"]
    assert "after its `with` block" in errors["not ended"]
    assert seen["stats"]["metrics_dropped"] == 1  # the NaN: refused, counted, not stored
    stored_run(stack, seen["run_id"])
    names = store_query(stack, f"SELECT name FROM metrics WHERE run_id = '{seen['run_id']}'")
    assert names == [{"name": "ok"}]


@pytest.mark.parametrize("how", ["gymbus cancel", "Ctrl-C"])
def test_cancel_and_ctrl_c_stop_a_script_between_two_steps(stack: Stack, how: str) -> None:
    code = """
        import json, itertools, gymnasium as gym, gymbus
        try:
            with gymbus.run(name="endless") as run:
                env = run.record(gym.make("CartPole-v1"))
                env.reset(seed=0)
                for t in itertools.count():
                    if t == 100:  # steps taken before the test stops it
                        print(json.dumps({"run_id": run.run_id}), flush=True)
                    _, _, term, trunc, _ = env.step(env.action_space.sample())
                    if term or trunc:
                        env.reset()
        except KeyboardInterrupt:
            print(json.dumps({"steps": run.stats()["steps"]}), flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            env=stack.process_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = json.loads(proc.stdout.readline())["run_id"]
        if how == "Ctrl-C":
            proc.send_signal(signal.SIGINT)
        else:
            record = gymbus_cli_json(stack.process_env(), "cancel", run_id)
            assert record["status"] == "cancelled", record
        assert proc.wait(10) == 0
        steps = json.loads(proc.stdout.readline())["steps"]
    finally:
        proc.kill()
    status = gymbus_cli_json(stack.process_env(), "status", run_id)
    reason = "cancelled (gymbus cancel)" if how == "gymbus cancel" else "interrupted (Ctrl-C)"
    assert (status["status"], status["reason"]) == ("cancelled", reason)
    assert stored_run(stack, run_id)["steps"] == steps > 0


SPACES = """
    import json, gymnasium as gym, numpy as np, gymbus
    from gymnasium import spaces

    class Pixels(gym.Env):
        observation_space = spaces.Box(0, 255, (32, 32, 3), np.uint8)
        action_space = spaces.MultiDiscrete([3, 2])
        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.observation_space.sample(), {}
        def step(self, action):
            self.t += 1
            return self.observation_space.sample(), 1.0, self.t == 10, False, {}

    class Mixed(Pixels):
        observation_space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32),
                                         "room": spaces.Discrete(4)})
        action_space = spaces.Box(-1, 1, (2,), np.float64)

    with gymbus.run(name="spaces") as run:
        seen = {}
        envs = {"pixels": run.record(Pixels()), "mixed": run.record(Mixed())}
        for name, env in envs.items():
            env.reset(seed=1)
            env.action_space.seed(1)
            actions, obs = [], []
            for _ in range(10):
                a = env.action_space.sample()
                o, *_ = env.step(a)
                actions.append(np.asarray(a, float).tolist())
                obs.append(None if name == "pixels" else [*o["pos"].tolist(), int(o["room"])])
            seen[name] = {"actions": actions, "obs": obs}
    print(json.dumps({"run_id": run.run_id, **seen}))
"""


def test_every_space_is_stored_or_counted_as_not_stored(stack: Stack) -> None:
    seen = last_json(script(stack, SPACES))
    run_id = seen["run_id"]
    stored_run(stack, run_id)
    rows = store_query(stack, f"SELECT env_index, action_vec, obs_vec FROM steps WHERE run_id = "
                              f"'{run_id}' ORDER BY env_index, episode, step")
    pixels = [r for r in rows if r["env_index"] == 0]
    mixed = [r for r in rows if r["env_index"] == 1]
    # MultiDiscrete actions as numbers; 3,072-value pixel observations left out, and counted
    assert [r["action_vec"] for r in pixels] == seen["pixels"]["actions"]
    assert {r["obs_vec"] is None for r in pixels} == {True}
    # a Dict observation: every leaf in order (pos, then room); float actions as floats
    for row, obs, action in zip(mixed, seen["mixed"]["obs"], seen["mixed"]["actions"],
                                strict=True):
        assert row["obs_vec"] == pytest.approx(obs) and row["action_vec"] == pytest.approx(action)
    status = gymbus_cli_json(stack.process_env(), "status", run_id)
    assert (status["obs_not_stored"], status["rows_refused"]) == (10, 0)
    config = json.loads(store_query(stack, f"SELECT config FROM runs WHERE run_id = "
                                           f"'{run_id}'")[0]["config"])
    spaces = config["config"]["spaces"] if "spaces" not in config else config["spaces"]
    assert spaces["env"]["observation"]["stored"] is False
    assert spaces["env1"]["observation"]["offsets"] == {"pos": [0, 2], "room": [2, 3]}


#: an env of 64x64x3 uint8 observations (12 KiB), each step's filled with its number (mod 256)
FRAMES_ENV = """
    import json, gymnasium as gym, numpy as np, gymbus
    from gymnasium import spaces

    class Frames(gym.Env):
        observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        action_space = spaces.Discrete(2)
        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros((64, 64, 3), np.uint8), {}
        def step(self, action):
            self.t += 1
            return np.full((64, 64, 3), self.t % 256, np.uint8), 0.0, False, False, {}
"""


def test_large_observations_asked_for_are_stored_in_frames_under_the_limit(stack: Stack) -> None:
    code = FRAMES_ENV + """
    with gymbus.run(name="frames") as run:
        env = run.record(Frames(), store_large_obs=True)
        env.reset(seed=0)
        for _ in range(1100):  # 1,024 rows of 12 KiB (of 4,096 a frame) would be over 8 MiB
            env.step(0)
    print(json.dumps({"run_id": run.run_id}))
    """
    run_id = last_json(script(stack, code))["run_id"]
    row = stored_run(stack, run_id)
    stored = store_query(stack, f"SELECT count(*) AS n, min(len(obs_vec)) AS w FROM steps "
                                f"WHERE run_id = '{run_id}'")[0]
    assert (row["steps"], stored["n"], stored["w"]) == (1100, 1100, 64 * 64 * 3)
    dead = store_query(stack, "SELECT count(*) AS n FROM dead_letters")[0]["n"]
    assert dead == 0


def test_a_script_keeps_to_the_services_frame_limit_when_its_own_is_higher(
        tmp_path: Path) -> None:
    """Services started with GYMBUS_MAX_FRAME_BYTES at 256 KiB, a script from a shell without
    it (the 8 MiB default): the controller tells the script the services' limit when the run
    opens, so that its frames of 12 KiB observations (10 a frame, not 341) are all stored, none
    refused whole into the dead letters."""
    code = FRAMES_ENV + """
    with gymbus.run(name="frames") as run:
        env = run.record(Frames(), store_large_obs=True)
        env.reset(seed=0)
        for _ in range(400):
            env.step(0)
    print(json.dumps({"run_id": run.run_id, "limit": run.max_frame_bytes}))
    """
    limit = 256 * 1024
    with make_stack(tmp_path / "home", **STACK_ENV, GYMBUS_MAX_FRAME_BYTES=str(limit)) as small:
        small.start()
        seen = last_json(script(small, code, env={"GYMBUS_MAX_FRAME_BYTES": str(8 << 20)}))
        assert seen["limit"] == limit
        run_id = seen["run_id"]
        row = stored_run(small, run_id)
        stored = store_query(small, "SELECT count(*) AS n, min(obs_vec[1]) AS lo, "
                                    f"max(obs_vec[1]) AS hi FROM steps WHERE run_id = '{run_id}'")
        assert (row["steps"], stored[0]["n"]) == (400, 400)
        assert (stored[0]["lo"], stored[0]["hi"]) == (0.0, 255.0)
        frames = store_query(small, "SELECT max(rows) AS most FROM frames WHERE run_id = "
                                    f"'{run_id}' AND kind = 'step'")[0]
        assert frames["most"] == 10  # 128 KiB of observations a frame
        assert store_query(small, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0


def test_a_script_killed_inside_its_run_is_marked_lost(stack: Stack) -> None:
    code = """
        import json, os, signal, gymbus
        with gymbus.run(name="killed") as run:
            print(json.dumps({"run_id": run.run_id}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close_run: the controller hears nothing
    """
    result = script(stack, code)
    assert result.returncode == -signal.SIGKILL
    run_id = json.loads(result.stdout.splitlines()[0])["run_id"]
    status = wait_until(
        lambda: (s := gymbus_cli_json(stack.process_env(), "status", run_id))["status"] == "lost"
        and s, 10, "the killed script's run marked lost")
    assert "its script was not heard of" in status["reason"]
