"""The viewers' subscriber side: seq bookkeeping, the bounded feed, and snapshot-then-live on a stack."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zmq
from conftest import stack_fixture, wait_until

from gymbus.services.ingest.client import StoreClient
from gymbus.services.stack.launcher import Stack
from gymbus.services.viewers.grid import action_name, obs_text
from gymbus.services.viewers.live import Live, LiveFeed
from gymbus.services.viewers.live_runs import RunView, SeqTracker
from gymbus.services.viewers.replay import load_episode, step_line
from gymbus.shared.codec import Frame, decode_frame, encode_frame, typed_array
from gymbus.shared.errors import RemoteError
from gymbus.shared.protocol import TERMINAL_STATES, Command, FrameKind, topic_prefix
from gymbus.shared.transport import Client

#: the viewers' stacks, on free ports like every private stack (the viewers' live output too)
VIEWER_ENV = {"GYMBUS_HEARTBEAT_INTERVAL": "0.5", "GYMBUS_WORKER_SLOTS": "2"}


# --- units ----------------------------------------------------------------------------------------


def test_the_tracker_calls_missed_only_what_the_stream_skipped() -> None:
    t = SeqTracker()
    for seq in range(10):  # the snapshot
        assert t.take(seq, live=False, now=0.0)
    assert not t.take(5, live=True, now=0.0)  # held already: discarded
    assert t.duplicates == 1
    assert t.take(12, live=True, now=1.0)  # 10-11 were sent before the viewer joined
    assert (t.missed, t.first_live) == (0, 12)
    assert t.take(13, live=True, now=1.0)
    assert t.take(17, live=True, now=2.0)  # 14-16: the stream skipped them
    assert t.missed == 3
    assert t.take(15, live=True, now=3.0)  # late, but delivered
    assert t.missed == 2
    assert [g[:2] for g in t.due_gaps(found_before=1.5)] == [[10, 11]]
    assert t.due_gaps(found_before=1.5) == []  # each gap is fetched once
    assert t.take(10, live=False, now=4.0) and t.take(14, live=False, now=4.0)
    assert not t.take(14, live=False, now=4.0)
    t.expect_end(20, now=5.0)  # the last two never came
    assert (t.missed, t.highest) == (4, 19)
    assert t.held == 20 - 1 - 1 - 2  # 11, 16 and 18-19 are still missing
    assert (t.live, t.from_store) == (4, 12)


def step_frame(seq: int, **columns: Any) -> Frame:
    """A step frame of three rows with `columns` (numpy arrays), through the real codec."""
    n = 3
    body = {"episode": np.zeros(n, np.int64), "step": np.arange(n, dtype=np.int64),
            "reward": np.array([0.0, -1.5, -2.25]), "terminated": np.zeros(n, np.bool_),
            "truncated": np.zeros(n, np.bool_), "t0_ns": 1, **columns}
    typed = {k: typed_array(v) if isinstance(v, np.ndarray) else v for k, v in body.items()}
    return decode_frame(list(encode_frame(FrameKind.STEP, "R", seq, typed)))


def test_a_view_keeps_the_last_step_of_any_space() -> None:
    """Float actions (Pendulum's), vector observations, and a frame without observations (pixels
    not stored): the view's last step holds them as the boards print them."""
    view = RunView("R")
    view.apply(step_frame(0, action=np.array([[0.5], [1.5], [-1.25]], np.float32),
                          obs=np.array([[1, 0, 0.5], [0, 1, 0.25], [1, 1, 0.125]], np.float32)))
    step = view.last_step
    assert step is not None and (step.step, step.action, step.obs) == (2, [-1.25], [1, 1, 0.125])
    assert action_name("Pendulum-v1", step.action) == "[-1.25]"
    view.apply(step_frame(1, action=np.array([2, 0, 3], np.int64)))  # no obs column
    step = view.last_step
    assert step is not None and (step.action, step.obs, step.reward) == (3, None, -2.25)
    assert action_name("FrozenLake-v1", step.action) == "UP" and obs_text(step.obs) == "not stored"
    assert view.scene() is None


def test_the_feed_drops_the_oldest_when_the_viewer_falls_behind() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = "inproc://test-live-feed"
    pub.bind(endpoint)
    feed = LiveFeed(endpoint, [topic_prefix(FrameKind.METRIC)], ctx, max_frames=10)
    try:
        feed.start()
        probe = encode_frame(FrameKind.METRIC, "probe", 0,
                             {"name": ["x"], "step": [0], "value": [0.0], "ts_ns": [0]})

        def subscribed() -> bool:
            pub.send_multipart(list(probe))
            return bool(feed.take(100))

        wait_until(subscribed, 5.0, "the feed's subscription")
        before = feed.received
        pub.send_multipart([b"step.r1", b"ignored: not subscribed"])
        for seq in range(50):
            pub.send_multipart(list(encode_frame(
                FrameKind.METRIC, "r1", seq, {"name": ["x"], "step": [seq], "value": [1.0],
                                              "ts_ns": [0]})))
        wait_until(lambda: feed.received - before >= 50 and feed.queued <= 10, 5.0,
                   "the frames to be received")
        taken = feed.take(100)
        assert len(taken) == 10
        assert feed.dropped >= 40
        assert feed.dropped_by_run.get("r1", 0) >= 40
        assert taken[-1][0] == b"metric.r1"  # the newest are kept
    finally:
        feed.close()
        pub.close()
        ctx.term()


# --- on a stack -----------------------------------------------------------------------------------


stack = stack_fixture("live", **VIEWER_ENV)


def submit(stack: Stack, **config: Any) -> str:
    with Client(stack.settings.controller, "controller") as client:
        reply = client.request(Command.SUBMIT, {"config": {"algo": "q-learning", "seed": 1,
                                                           **config}, "idempotency_key": ""})
    return str(reply["run_id"])


def run_state(stack: Stack, run_id: str) -> str:
    with Client(stack.settings.controller, "controller") as client:
        return str(client.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"])


def stored(stack: Stack, run_id: str) -> dict[str, Any]:
    """The ingest's RunStats of the run ({} before its first frame is stored)."""
    with Client(stack.settings.ingest, "ingest") as client:
        try:
            runs = client.request(Command.RUN_STATS, {"run_id": run_id})["runs"]
        except RemoteError:
            return {}
    return runs[0] if runs else {}


def follow(live: Live, until: Any, timeout: float, what: str) -> None:
    """Poll and refresh the way a viewer's loop does, until `until()` holds."""
    last = [0.0]

    def step() -> Any:
        live.poll()
        if time.monotonic() - last[0] >= 0.5:
            live.refresh()
            last[0] = time.monotonic()
        return until()

    wait_until(step, timeout, what, interval=0.05)


def test_a_late_viewer_takes_the_snapshot_and_discards_what_it_holds(stack: Stack) -> None:
    done = submit(stack, env="Taxi-v4", episodes=150)
    wait_until(lambda: stored(stack, done).get("complete"), 60, "the first run to be stored")
    running = submit(stack, env="FrozenLake-v1", episodes=6000)
    wait_until(lambda: (stored(stack, running).get("frames_stored") or 0) > 20, 30,
               "the second run to be under way")
    live = Live(stack.settings)
    try:
        live.start()  # joins late: subscribes, then takes what is stored
        first = live.runs[done]
        stats = stored(stack, done)
        assert first.seqs.held == stats["frames_emitted"] == first.seqs.from_store
        assert first.episodes == len(first.returns) == 150
        assert first.seqs.live == 0 and first.settled
        assert first.env == "Taxi-v4" and first.scene() is not None
        assert live.runs[running].seqs.from_store > 0  # its first frames came from the store
        follow(live, lambda: live.runs[running].settled
               and live.runs[running].seqs.held == live.runs[running].frames_emitted, 90,
               "the second run to end and be held whole")
        second = live.runs[running]
        assert second.seqs.live > 0 and second.seqs.missed == 0
        assert second.seqs.live + second.seqs.from_store == second.frames_emitted
        assert second.episodes == 6000 and second.episode_ids == list(range(6000))
        assert second.sps is not None and second.last_step is not None
        assert live.totals()["rejected"] == 0
    finally:
        live.close()


def test_a_viewer_that_was_there_first_gets_every_frame_live(stack: Stack) -> None:
    live = Live(stack.settings)
    try:
        live.start()
        run_id = submit(stack, env="CliffWalking-v1", episodes=300, telemetry="full")
        follow(live, lambda: run_id in live.runs and live.runs[run_id].settled, 60,
               "the run to end")
        view = live.runs[run_id]
        assert view.seqs.first_live == 0
        assert view.seqs.live == view.frames_emitted and view.seqs.missed == 0
        assert view.status == "completed"
        wait_until(lambda: run_state(stack, run_id) in TERMINAL_STATES, 10, "the run to end")
        assert view.last_step is not None and view.last_step.terminated
        scene = view.scene()
        assert scene is not None and scene.agent == (3, 11)  # the episode ended at the goal
    finally:
        live.close()


def test_a_viewer_of_named_runs_subscribes_to_those_only(stack: Stack) -> None:
    mine = submit(stack, env="FrozenLake-v1", episodes=400, telemetry="fast")
    other = submit(stack, env="FrozenLake-v1", episodes=400)
    live = Live(stack.settings, [mine])
    try:
        live.start()
        follow(live, lambda: mine in live.runs and live.runs[mine].settled, 60, "the run to end")
        assert set(live.runs) == {mine}
        assert live.runs[mine].telemetry == "fast" and live.runs[mine].last_step is None
        assert live.runs[mine].episodes == 400
    finally:
        live.close()
    wait_until(lambda: run_state(stack, other) in TERMINAL_STATES, 60, "the other run to end")


def test_a_random_pendulum_run_is_shown_and_replayed_with_its_float_actions(stack: Stack) -> None:
    """A built-in random run on continuous actions, taken from the store by a late viewer and
    replayed: its last step and an episode's steps hold the actions as numbers."""
    run_id = submit(stack, env="Pendulum-v1", algo="random", total_steps=1000)
    wait_until(lambda: stored(stack, run_id).get("complete"), 60, "the run to be stored")
    live = Live(stack.settings)
    try:
        live.start()
        step = live.runs[run_id].last_step
        assert step is not None and (step.episode, step.step) == (4, 199)
        assert len(step.action) == 1 and abs(step.action[0]) <= 2.0 and len(step.obs) == 3
    finally:
        live.close()
    with StoreClient(stack.settings) as store:
        replay = load_episode(store, run_id, 2)
    assert len(replay.steps) == 200
    assert all(len(s["action"]) == 1 and abs(s["action"][0]) <= 2.0 for s in replay.steps)
    assert "action [" in step_line(replay, 0).plain
