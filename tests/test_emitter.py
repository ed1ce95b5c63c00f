"""The telemetry emitter against a real XSUB on a loopback port: seq, batching, fast mode, HWM."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import zmq
from conftest import free_endpoint, wait_until

from gymbus.shared.codec import Frame, decode_frame
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind, LifecycleEvent, TelemetryMode
from gymbus.shared.runconfig import RandomParams, parse_config
from gymbus.worker import training
from gymbus.worker.agents.base import Budget
from gymbus.worker.agents.random_agent import RandomAgent
from gymbus.worker.telemetry.columns import FRAME_VALUE_BYTES
from gymbus.worker.telemetry.emitter import (
    EPISODE_BATCH_ROWS,
    FLUSH_INTERVAL,
    METRIC_BATCH_ROWS,
    STEP_BATCH_ROWS,
    Emitter,
)
from gymbus.worker.telemetry.spool import SpoolError, SpoolWriter


class FrameSink:
    """A test-owned XSUB (what the broker binds): subscribes to everything, decodes every frame.

    A thread services the socket all the time, as the broker's proxy loop does: an XSUB only
    sends its subscriptions to a newly connected publisher while something calls into it. While
    `paused`, the thread keeps the socket serviced but receives nothing (to fill queues up).
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str | None = None, rcvhwm: int = 0,
                 paused: bool = False) -> None:
        self.endpoint = endpoint or free_endpoint()
        self.sock = ctx.socket(zmq.XSUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.bind(self.endpoint)
        self.sock.send(b"\x01")  # subscribe to every topic; XSUB replays it to each new publisher
        self.frames: list[Frame] = []
        #: every message as received, [topic, payload]
        self.raw: list[list[bytes]] = []
        self.errors: list[Exception] = []
        self._reading = threading.Event()
        if not paused:
            self._reading.set()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            if not self._reading.is_set():
                self.sock.getsockopt(zmq.EVENTS)  # processes pending commands (new publishers)
                self._reading.wait(0.02)
            elif self.sock.poll(20, zmq.POLLIN):
                parts = self.sock.recv_multipart()
                self.raw.append(parts)
                try:
                    self.frames.append(decode_frame(parts))
                except Exception as exc:  # noqa: BLE001 - surfaced to the tests by drain()
                    self.errors.append(exc)

    def resume(self) -> None:
        self._reading.set()

    def drain(self) -> list[Frame]:
        """The frames received so far (a copy)."""
        if self.errors:
            raise self.errors[0]
        return list(self.frames)

    def completed(self, run_id: str | None = None) -> Frame | None:
        for f in self.drain():
            if (f.kind is FrameKind.LIFECYCLE and f.body["event"] == LifecycleEvent.RUN_COMPLETED
                    and (run_id is None or f.run_id == run_id)):
                return f
        return None

    def wait_completed(self, run_id: str | None = None, timeout: float = 10.0) -> Frame:
        return wait_until(lambda: self.completed(run_id), timeout, "run_completed")

    def of(self, kind: FrameKind, run_id: str | None = None) -> list[Frame]:
        return [f for f in self.drain() if f.kind is kind and (run_id is None or f.run_id == run_id)]

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def sink(ctx: zmq.Context[Any]) -> Iterator[FrameSink]:
    s = FrameSink(ctx)
    yield s
    s.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def connect(ctx: zmq.Context[Any], sink: FrameSink, **kwargs: Any) -> Emitter:
    emitter = Emitter.connect(ctx, sink.endpoint, "RUN1", agent_id="a0", worker_id="w0", **kwargs)
    assert emitter.subscribed
    return emitter


def step_n(emitter: Emitter, n: int, episode: int = 0) -> None:
    for i in range(n):
        # numpy scalars, as some environments return them: the emitter converts them
        emitter.step(episode, i, i % 4, np.int64(i % 16), np.float32(0.5), np.bool_(False), False)


def test_seq_contiguous_and_frames_emitted_match(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    emitter.lifecycle(LifecycleEvent.RUN_STARTED, config={"env": "x"})
    step_n(emitter, 2500)
    for e in range(300):
        emitter.episode(e, 1.0, 3, True, False)
        emitter.metric("charts/episodic_return", e * 3, 1.0)
    emitter.artifact("q_table", "artifacts/q_table.npy", "npy")
    frames_emitted = emitter.finish("completed", None, 300, 2500)
    last = sink.wait_completed()
    frames = sink.drain()
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[0].body["event"] == LifecycleEvent.RUN_STARTED
    assert frames[-1] is last and last.body["frames_emitted"] == frames_emitted == len(frames)
    assert frames[-2].body["event"] == LifecycleEvent.ARTIFACT
    assert all(f.run_id == "RUN1" and f.agent_id == "a0" and f.worker_id == "w0" for f in frames)
    stats = emitter.stats()
    assert stats["frames_emitted"] == len(frames) and stats["blocked_sends"] == 0
    assert stats["rows"]["step"] == sum(f.rows for f in sink.of(FrameKind.STEP)) == 2500
    assert stats["rows"]["episode"] == sum(f.rows for f in sink.of(FrameKind.EPISODE)) == 300
    assert stats["rows"]["metric"] == 300
    emitter.close(0)


def test_steps_batch_by_count(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    clock = FakeClock()  # frozen: only the row count can flush
    emitter = connect(ctx, sink, clock=clock)
    step_n(emitter, 2 * STEP_BATCH_ROWS + 452)
    wait_until(lambda: len(sink.drain()) == 2, what="two full step frames")
    assert [f.rows for f in sink.drain()] == [STEP_BATCH_ROWS, STEP_BATCH_ROWS]
    emitter.finish("completed", None, 1, 2 * STEP_BATCH_ROWS + 452)
    sink.wait_completed()
    steps = sink.of(FrameKind.STEP)
    assert [f.rows for f in steps] == [STEP_BATCH_ROWS, STEP_BATCH_ROWS, 452]
    body = steps[0].body
    assert body["step"].tolist() == list(range(STEP_BATCH_ROWS))
    assert body["obs"].dtype == np.int64 and body["obs"][17] == 1
    assert body["reward"].dtype == np.float64 and body["terminated"].dtype == bool
    assert body["reward"][0] == 0.5 and not body["terminated"].any()
    assert isinstance(body["t0_ns"], int) and body["t0_ns"] > 0
    assert "label" not in body
    emitter.close(0)


@pytest.mark.parametrize("limit", [MAX_FRAME_BYTES, 1024 * 1024])
def test_large_observations_make_smaller_batches(ctx: zmq.Context[Any], sink: FrameSink,
                                                 limit: int) -> None:
    """64x64x3 float32 observations (48 KiB a step): a frame holds as many as fit half the
    frame limit (the protocol's, or a lower GYMBUS_MAX_FRAME_BYTES), steps and episodes (with
    their reset observations) alike."""
    # a frozen clock: only the row count can flush
    emitter = connect(ctx, sink, clock=FakeClock(), max_frame_bytes=limit)
    emitter.configure_steps(vector_obs=True, labels=False, obs_dtype=np.float32,
                            obs_shape=(64, 64, 3))
    fit = limit // 2 // (64 * 64 * 3 * 4 + 8)
    assert fit == (FRAME_VALUE_BYTES // (64 * 64 * 3 * 4 + 8) if limit == MAX_FRAME_BYTES else 10)
    image = np.ones((64, 64, 3), np.float32)
    for e in range(2 * fit + 5):
        emitter.step(e, 0, 1, image, 1.0, True, False)
        emitter.episode(e, 1.0, 1, True, False, None, image)
    emitter.finish("completed", None, 2 * fit + 5, 2 * fit + 5)
    sink.wait_completed()
    for kind in (FrameKind.STEP, FrameKind.EPISODE):
        assert [f.rows for f in sink.of(kind)] == [fit, fit, 5]
    assert max(len(p) for t, p in sink.raw) < limit
    emitter.close(0)


def test_each_value_lands_in_its_column(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    """The hot paths' row tuples follow the column schema's order, for every frame kind."""
    emitter = connect(ctx, sink)
    emitter.configure_steps(vector_obs=False, labels=True)
    emitter.step(7, 3, 2, 5, 0.25, True, False, "explore")
    emitter.episode(4, 1.5, 9, False, True)
    emitter.metric("losses/td_loss", 11, 0.75)
    emitter.finish("completed", None, 1, 1)
    sink.wait_completed()

    def columns(kind: FrameKind) -> dict[str, Any]:
        (frame,) = sink.of(kind)
        return {name: list(values) for name, values in frame.body.items() if name != "t0_ns"}

    assert columns(FrameKind.STEP) == {
        "episode": [7], "step": [3], "action": [2], "obs": [5], "reward": [0.25],
        "terminated": [True], "truncated": [False], "label": ["explore"]}
    episode = columns(FrameKind.EPISODE)
    assert episode.pop("ts_ns")[0] > 0
    assert episode == {"episode": [4], "return": [1.5], "length": [9], "terminated": [False],
                       "truncated": [True]}
    metric = columns(FrameKind.METRIC)
    assert metric.pop("ts_ns")[0] > 0
    assert metric == {"name": ["losses/td_loss"], "step": [11], "value": [0.75]}
    emitter.close(0)


def test_steps_batch_by_time(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    clock = FakeClock()
    emitter = connect(ctx, sink, clock=clock)
    step_n(emitter, 3)
    emitter.lifecycle(LifecycleEvent.RUN_STARTED, config={})  # flushes the 3 rows
    wait_until(lambda: len(sink.drain()) == 2, what="the flushed rows")
    assert [f.rows for f in sink.of(FrameKind.STEP)] == [3]
    step_n(emitter, 3)
    clock.now += FLUSH_INTERVAL + 0.01
    step_n(emitter, 1)
    wait_until(lambda: len(sink.of(FrameKind.STEP)) == 2, what="a step frame flushed by time")
    assert sink.of(FrameKind.STEP)[1].rows == 4
    # episodes flush once FLUSH_INTERVAL has passed since the last episode flush: the first at
    # once (slow episodes are not held back), then the next ones together
    emitter.episode(0, 1.0, 4, True, False)
    wait_until(lambda: sink.of(FrameKind.EPISODE), what="the first episode frame")
    emitter.episode(1, 0.0, 2, False, True)
    emitter.episode(2, 0.0, 2, False, True)
    clock.now += FLUSH_INTERVAL / 2
    emitter.episode(3, 0.0, 2, False, True)
    assert len(sink.of(FrameKind.EPISODE)) == 1
    clock.now += FLUSH_INTERVAL / 2 + 0.01
    emitter.episode(4, 1.0, 2, True, False)
    wait_until(lambda: len(sink.of(FrameKind.EPISODE)) == 2, what="the second episode frame")
    assert [f.rows for f in sink.of(FrameKind.EPISODE)] == [1, 4]
    emitter.close(0)


def test_a_batch_after_any_flush_is_timed_from_its_own_first_row(
        ctx: zmq.Context[Any], sink: FrameSink) -> None:
    clock = FakeClock()
    emitter = connect(ctx, sink, clock=clock)
    step_n(emitter, 3)  # the clock was looked at on rows 1 and 2: the next look is at row 4
    emitter.flush()  # a flush from outside the step path (lifecycle, episode deadline)
    clock.now += 10 * FLUSH_INTERVAL  # a pause: an evaluation, a slow reset
    before_ns = time.time_ns()
    step_n(emitter, 5)  # a new batch: its deadline is FLUSH_INTERVAL after its first row
    emitter.lifecycle(LifecycleEvent.RUN_STARTED, config={})  # flushes the 5 rows
    wait_until(lambda: len(sink.of(FrameKind.STEP)) == 2, what="the second step frame")
    assert [f.rows for f in sink.of(FrameKind.STEP)] == [3, 5]  # not cut by a stale deadline
    assert sink.of(FrameKind.STEP)[1].body["t0_ns"] >= before_ns  # its first row's time
    emitter.close(0)


def test_episodes_batch_by_count(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    emitter = connect(ctx, sink, clock=FakeClock())
    for e in range(EPISODE_BATCH_ROWS + 10):
        emitter.step(e, 0, 1, 3, 0.0, True, False, "explore")
        emitter.episode(e, 0.0, 1, True, False)
    wait_until(lambda: sink.of(FrameKind.EPISODE), what="a full episode frame")
    (episodes,) = sink.of(FrameKind.EPISODE)
    assert episodes.rows == EPISODE_BATCH_ROWS
    # an episode flush flushes the steps first, so a viewer never sees an episode before its steps
    (steps,) = sink.of(FrameKind.STEP)
    assert steps.seq < episodes.seq and steps.rows == EPISODE_BATCH_ROWS
    emitter.close(0)


def run_loop(emitter: Emitter, config: dict[str, Any], spy: Any = None) -> training.LoopResult:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg)
    agent = training.make_agent(cfg, env, rng, emitter)
    training.configure_steps(emitter, env, agent)
    if spy is not None:  # every value the loop would append goes to `spy`
        emitter.step_appenders = lambda: (spy, spy, spy, spy)  # type: ignore[method-assign]
    return training.run_training(env, agent, emitter, training.budget_of(cfg), seed=cfg.seed,
                                 mode=cfg.telemetry, every=cfg.every)


def test_fast_mode_builds_no_step_frames(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    calls: list[Any] = []
    result = run_loop(emitter, {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 200,
                                "telemetry": "fast"}, spy=lambda *a: calls.append(a))
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    assert calls == []  # not one value appended in fast mode
    assert sink.of(FrameKind.STEP) == [] and emitter.stats()["rows"]["step"] == 0
    assert sum(f.rows for f in sink.of(FrameKind.EPISODE)) == result.episodes == 200
    names = {n for f in sink.of(FrameKind.METRIC) for n in f.body["name"]}
    assert names == {"charts/epsilon"}  # return and length are the episode rows, sent once
    emitter.close(0)


def test_sampled_mode_records_every_nth_episode(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    result = run_loop(emitter, {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 30,
                                "telemetry": TelemetryMode.SAMPLED.value, "every": 4})
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    recorded = set(np.concatenate([f.body["episode"] for f in sink.of(FrameKind.STEP)]).tolist())
    assert recorded == set(range(0, 30, 4))
    lengths = {int(e): int(n) for f in sink.of(FrameKind.EPISODE)
               for e, n in zip(f.body["episode"], f.body["length"])}
    assert sum(f.rows for f in sink.of(FrameKind.STEP)) == sum(lengths[e] for e in recorded)
    labels = {x for f in sink.of(FrameKind.STEP) for x in f.body["label"]}
    assert labels <= {"explore", "exploit"} and labels
    emitter.close(0)


def plain_steps(config: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The steps of the config's random run as a plain loop takes them, without gymbus: the
    same seeded environment and action draws, one row (episode, step, action, obs, reward,
    terminated, truncated) per step."""
    cfg = parse_config(config)
    env = training.make_env(cfg)
    rows: list[tuple[Any, ...]] = []
    episode = 0
    while len(rows) < cfg.total_steps:
        env.reset(seed=cfg.seed if episode == 0 else None)
        for t in range(cfg.total_steps - len(rows)):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            rows.append((episode, t, int(action), np.asarray(obs).tolist(), float(reward),
                         terminated, truncated))
            if terminated or truncated:
                break
        episode += 1
    return rows


@pytest.mark.parametrize("env_id", ["FrozenLake-v1", "CartPole-v1"])
def test_recorded_steps_are_the_plain_loops_steps(ctx: zmq.Context[Any], sink: FrameSink,
                                                  env_id: str) -> None:
    """Every step of a full-mode run, through the loop's appends and runs of steps, lands in
    its row: the same values as a plain loop's, batches cut amid episodes included."""
    config = {"env": env_id, "algo": "random", "total_steps": 10_000, "seed": 5}
    emitter = connect(ctx, sink)
    result = run_loop(emitter, config)
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    frames = sink.of(FrameKind.STEP)
    columns = ("episode", "step", "action", "obs", "reward", "terminated", "truncated")
    stored = [row for f in frames
              for row in zip(*(f.body[c].tolist() for c in columns), strict=True)]
    assert stored == plain_steps(config)
    assert all(f.rows <= STEP_BATCH_ROWS for f in frames)
    ends = [bool(f.body["terminated"][-1] or f.body["truncated"][-1]) for f in frames[:-1]]
    assert ends and not all(ends)  # some batches were cut amid an episode
    lengths = [n for f in sink.of(FrameKind.EPISODE) for n in f.body["length"].tolist()]
    assert sum(lengths) == len(stored) == result.steps == 10_000
    emitter.close(0)


def test_a_step_cut_short_between_its_appends_is_not_a_step(ctx: zmq.Context[Any],
                                                            sink: FrameSink) -> None:
    """An exception between a step's appends (the reward is appended last) leaves values that
    belong to no step: they are dropped, not sent with the next batch's steps."""
    emitter = connect(ctx, sink)
    add_obs, add_action, _, add_reward = emitter.step_appenders()
    for t in range(3):
        add_obs(t)
        add_action(1)
        add_reward(0.5)
    add_obs(9)  # a step cut short: no reward
    add_action(1)
    emitter.episode(0, 1.5, 3, False, False)
    emitter.flush()
    for t in range(2):
        add_obs(20 + t)
        add_action(0)
        add_reward(1.0)
    emitter.episode(1, 2.0, 2, True, False)
    emitter.finish("completed", None, 2, 5)
    sink.wait_completed()
    assert [f.body["obs"].tolist() for f in sink.of(FrameKind.STEP)] == [[0, 1, 2], [20, 21]]
    assert [f.body["action"].tolist() for f in sink.of(FrameKind.STEP)] == [[1, 1, 1], [0, 0]]
    emitter.close(0)


def test_an_episode_whose_steps_fail_to_send_keeps_its_row(ctx: zmq.Context[Any],
                                                            sink: FrameSink,
                                                            tmp_path: Path) -> None:
    """The episode call that takes a full batch of steps and sends it: when the spool refuses
    that frame (a full disk), the error goes to the loop and the episode's row stays buffered,
    sent by the run's last flush."""
    emitter = connect(ctx, sink, clock=FakeClock())
    emitter.spool = SpoolWriter.create(tmp_path)
    add_obs, add_action, _, add_reward = emitter.step_appenders()
    for t in range(STEP_BATCH_ROWS):
        add_obs(t % 16)
        add_action(1)
        add_reward(0.0)
    real_append = emitter.spool.append

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise SpoolError("no space left on device")

    emitter.spool.append = full_disk  # type: ignore[method-assign]
    with pytest.raises(SpoolError, match="no space left"):
        emitter.episode(0, 0.0, STEP_BATCH_ROWS, False, True)
    emitter.spool.append = real_append  # type: ignore[method-assign]
    emitter.finish("failed", "SpoolError", 1, STEP_BATCH_ROWS)
    sink.wait_completed()
    (episodes,) = sink.of(FrameKind.EPISODE)
    assert episodes.body["length"].tolist() == [STEP_BATCH_ROWS]
    emitter.close(0)


class BreaksAtStep5(gym.Env[np.ndarray[Any, Any], int]):
    """Box observations; the fifth is a string array that no float type holds."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        obs = np.array(["x", "y"]) if self.t == 5 else np.full(2, self.t / 10, np.float32)
        return obs, 1.0, False, False, {}


def test_a_step_that_fails_midway_leaves_its_episode_whole(ctx: zmq.Context[Any],
                                                           sink: FrameSink) -> None:
    """A step whose observation cannot be kept fails the run; the four steps before it are
    sent, with their episode's row, and nothing of the fifth."""
    emitter = connect(ctx, sink)
    env = BreaksAtStep5()
    env.action_space.seed(0)
    agent = RandomAgent(RandomParams(), env.action_space, emitter)
    training.configure_steps(emitter, env, agent)
    with pytest.raises(ValueError, match="could not convert"):
        training.run_training(env, agent, emitter, Budget(total_steps=100), seed=0)
    emitter.finish("failed", "ValueError", 1, 4)
    sink.wait_completed()
    (steps,) = sink.of(FrameKind.STEP)
    assert steps.body["step"].tolist() == [0, 1, 2, 3]
    assert np.allclose(steps.body["obs"], [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    (episode,) = sink.of(FrameKind.EPISODE)
    assert episode.body["length"].tolist() == [4] and episode.body["return"].tolist() == [4.0]
    emitter.close(0)


def test_box_observations_are_float_vectors(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    result = run_loop(emitter, {"env": "CartPole-v1", "algo": "random", "episodes": 5})
    emitter.finish("completed", None, result.episodes, result.steps)
    sink.wait_completed()
    steps = sink.of(FrameKind.STEP)
    obs = np.concatenate([f.body["obs"] for f in steps])
    assert obs.shape == (result.steps, 4) and obs.dtype == np.float64
    assert "label" not in steps[0].body  # the random agent gives no labels
    emitter.close(0)


def test_box_observations_travel_as_one_typed_array_with_every_value(
        ctx: zmq.Context[Any], sink: FrameSink) -> None:
    """CartPole's float32 observations are sent as raw bytes and decode to exactly the values
    the environment returned; one of another dtype is converted to the space's dtype."""
    emitter = connect(ctx, sink)
    emitter.configure_steps(vector_obs=True, labels=False, obs_dtype=np.float32)
    seen = [np.array([0.1, -2.5, 3.0, 1e-3], np.float32), np.array([1.0, 2.0, 3.0, 4.0], np.float64),
            np.array([7.0, 8.0, 9.0, 10.0], np.float32)]
    for i, obs in enumerate(seen):
        emitter.step(0, i, 1, obs, 1.0, False, False)
    emitter.flush_steps()
    wait_until(lambda: sink.of(FrameKind.STEP), what="the step frame")
    (frame,) = sink.of(FrameKind.STEP)
    assert frame.body["obs"].tolist() == [o.astype(np.float32).tolist() for o in seen]
    (payload,) = [msgpack.unpackb(p, raw=False) for t, p in sink.raw if t.startswith(b"step")]
    wire = payload["body"]["obs"]
    assert (wire["dtype"], wire["shape"], len(wire["data"])) == ("<f4", [3, 4], 3 * 4 * 4)
    emitter.close(0)


def test_an_observation_that_changes_size_fails_with_a_reason(ctx: zmq.Context[Any],
                                                               sink: FrameSink) -> None:
    emitter = connect(ctx, sink)
    emitter.configure_steps(vector_obs=True, labels=False, obs_dtype=np.float32)
    emitter.step(0, 0, 1, np.zeros(4, np.float32), 1.0, False, False)
    emitter.step(0, 1, 1, np.zeros(5, np.float32), 1.0, False, False)
    with pytest.raises(ValueError, match=r"observations changed size within a run: \[4, 5\]"):
        emitter.flush_steps()
    emitter.close(0)


def test_full_queue_blocks_instead_of_dropping(ctx: zmq.Context[Any]) -> None:
    sink = FrameSink(ctx, rcvhwm=4, paused=True)
    emitter = Emitter.connect(ctx, sink.endpoint, "RUN1", hwm=4)
    emitter.configure_steps(vector_obs=True, labels=False)
    obs = np.linspace(0.0, 1.0, 64)
    frames_to_send = 40  # ~0.6 MB each: far more than the HWMs and the kernel's buffers hold

    def resume_when_blocked() -> None:
        wait_until(lambda: emitter.blocked_sends > 0, 20, "the emitter to block")
        sink.resume()

    resumer = threading.Thread(target=resume_when_blocked, daemon=True)
    resumer.start()
    try:
        for i in range(frames_to_send * STEP_BATCH_ROWS):
            emitter.step(0, i, 0, obs, 1.0, False, False)
        frames_emitted = emitter.finish("completed", None, 0, frames_to_send * STEP_BATCH_ROWS)
        sink.wait_completed(timeout=20)
        assert emitter.blocked_sends > 0 and emitter.frames_dropped == 0
        assert [f.seq for f in sink.drain()] == list(range(frames_emitted))
    finally:
        sink.resume()
        resumer.join(20)
        sink.close()
        emitter.close(0)


def test_waits_for_a_subscriber_then_publishes_anyway(ctx: zmq.Context[Any]) -> None:
    silent = ctx.socket(zmq.XSUB)  # bound, but nobody subscribed
    silent.setsockopt(zmq.LINGER, 0)
    endpoint = free_endpoint()
    silent.bind(endpoint)
    emitter = Emitter.connect(ctx, endpoint, "RUN1", subscribe_wait=0.3)
    assert not emitter.subscribed
    emitter.lifecycle(LifecycleEvent.RUN_STARTED, config={})
    assert emitter.seq == 1
    emitter.close(0)
    silent.close()


def test_observers_see_every_metric_row_once(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    clock = FakeClock()
    emitter = connect(ctx, sink, clock=clock)
    seen: list[Any] = []
    emitter.observe_metrics(seen.extend)
    emitter.metric("charts/epsilon", 1, 0.5)
    emitter.metric("losses/td_loss", 2, np.float32(0.25))  # numpy scalars are converted
    assert seen == []  # batched: nothing is due yet
    emitter.feed_observers()  # the end of a run: observers first, before any send
    assert [(n, s, v) for n, s, v, _ in seen] == [("charts/epsilon", 1, 0.5),
                                                  ("losses/td_loss", 2, 0.25)]
    emitter.metric("charts/SPS", 3, 1000.0)
    emitter.finish("completed", None, 0, 0)
    sink.wait_completed()
    assert [r[0] for r in seen] == ["charts/epsilon", "losses/td_loss", "charts/SPS"]
    (frame,) = sink.of(FrameKind.METRIC)
    assert frame.body["name"] == ["charts/epsilon", "losses/td_loss", "charts/SPS"]
    assert frame.body["value"].tolist() == [0.5, 0.25, 1000.0]
    emitter.close(0)


def test_metric_batches_flush_by_count_and_by_time(ctx: zmq.Context[Any], sink: FrameSink) -> None:
    clock = FakeClock()
    emitter = connect(ctx, sink, clock=clock)
    for i in range(METRIC_BATCH_ROWS + 5):
        emitter.metric("charts/episodic_return", i, 1.0)
    wait_until(lambda: sink.of(FrameKind.METRIC), what="a full metric frame")
    clock.now += FLUSH_INTERVAL
    emitter.metric("charts/episodic_return", 9999, 2.0)
    wait_until(lambda: len(sink.of(FrameKind.METRIC)) == 2, what="a metric frame by time")
    assert [f.rows for f in sink.of(FrameKind.METRIC)] == [METRIC_BATCH_ROWS, 6]
    emitter.close(0)


def test_non_finite_metrics_are_dropped_not_the_frame(ctx: zmq.Context[Any],
                                                      sink: FrameSink) -> None:
    emitter = connect(ctx, sink, clock=FakeClock())
    seen: list[Any] = []
    emitter.observe_metrics(seen.extend)
    emitter.metric("losses/td_loss", 1, float("nan"))
    emitter.metric("losses/td_loss", 2, 0.5)
    emitter.metric("losses/td_loss", 3, float("inf"))
    emitter.episode(0, 1.0, 3, np.bool_(True), False)  # numpy bools, as some wrappers give
    emitter.finish("completed", None, 1, 3)
    sink.wait_completed()
    (frame,) = sink.of(FrameKind.METRIC)
    assert frame.body["step"].tolist() == [2]  # the frame is stored, without the NaN and inf
    assert emitter.stats()["metrics_dropped"] == 2  # TensorBoard sees all, and the episode's
    assert [r[:3] for r in seen[3:]] == [("charts/episodic_return", 3, 1.0),
                                        ("charts/episodic_length", 3, 3)]
    assert len(seen) == 5
    (episodes,) = sink.of(FrameKind.EPISODE)
    assert episodes.body["terminated"].tolist() == [True]
    emitter.close(0)


def test_step_and_episode_rows_with_nan_or_inf_are_refused_not_their_frame(
        ctx: zmq.Context[Any], sink: FrameSink) -> None:
    """A built-in run's frame holding one NaN would be refused whole by the ingest (a dead
    letter): the rows holding one are left out and counted, the rest of the frame is sent, and
    run_completed says how many."""
    emitter = connect(ctx, sink, clock=FakeClock())
    emitter.configure_steps(vector_obs=True, labels=False, obs_dtype=np.float32)
    for t in range(10):
        obs = np.full(4, t, np.float32)
        if t == 3:
            obs[2] = np.inf
        emitter.step(0, t, 1, obs, float("nan") if t == 6 else 1.0, False, t == 9)
    emitter.episode(0, float("nan"), 10, False, True)
    emitter.episode(1, 2.0, 2, True, False)
    emitter.finish("completed", None, 2, 10)  # (its last flush refuses them)
    done = sink.wait_completed()
    (steps,) = sink.of(FrameKind.STEP)
    assert steps.body["step"].tolist() == [0, 1, 2, 4, 5, 7, 8, 9]
    assert steps.body["obs"][:, 0].tolist() == [0, 1, 2, 4, 5, 7, 8, 9]
    (episodes,) = sink.of(FrameKind.EPISODE)
    assert episodes.body["episode"].tolist() == [1]
    assert emitter.rows_refused == 3 == done.body["rows_refused"]
    assert emitter.stats()["rows_refused"] == 3
    emitter.close(0)


def test_episodes_go_to_an_episodes_observer_as_columns(ctx: zmq.Context[Any],
                                                        sink: FrameSink) -> None:
    emitter = connect(ctx, sink, clock=FakeClock())
    rows: list[Any] = []
    batches: list[Any] = []
    emitter.observe_metrics(rows.extend, lambda steps, returns, lengths, ts: batches.append(
        (steps.tolist(), returns.tolist(), lengths.tolist(), len(ts))))
    emitter.metric("charts/epsilon", 1, 0.5)
    for e, (ret, length) in enumerate([(1.0, 3), (0.0, 5), (2.5, 2)]):
        emitter.episode(e, ret, length, True, False)
    emitter.finish("completed", None, 3, 10)
    sink.wait_completed()
    assert [r[0] for r in rows] == ["charts/epsilon"]  # episode curves: not as rows
    # each episode at the global step of its end, the sum of the lengths so far
    assert batches == [([3, 8, 10], [1.0, 0.0, 2.5], [3, 5, 2], 3)]
    emitter.close(0)
