"""Roles per key: `gymbus keys --role`, and a keyed stack that refuses each role what it may not do.

The stack's worker runs with a worker key, so a submitted run is trained and stored only if the
broker lets that key publish the runs dispatched to it. Every check goes over real CURVE sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner
from conftest import STACK_ENV, gymbus_cli, make_stack, wait_until
from test_fuzz import sql

from gymbus.services.cli.context import Context
from gymbus.services.cli.keys import keys, make_keys, make_role_key
from gymbus.services.stack.launcher import SERVICES, Stack
from gymbus.shared import security
from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import CONTROLLER_IDENTITY, Command, ErrorCode, FrameKind
from gymbus.shared.roles import Role, RoleError, authorized_keys, certificate_role, with_role
from gymbus.shared.security import SecurityError
from gymbus.shared.transport import Client, connect, new_socket

Env = dict[str, str]


@pytest.fixture(autouse=True)
def fresh_policy() -> Iterator[None]:
    security.install(None)
    yield
    security.install(None)


def use(env: Env) -> None:
    security.install(security.load(env))


@pytest.fixture(scope="module")
def key_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Env]:
    """The services' variables, and the clients' for each role and for the full-access key."""
    folder = tmp_path_factory.mktemp("roles") / "keys"
    base = make_keys(folder)
    env = {"services": base["services"], "full": base["clients"]}
    for role in Role:
        env[role.value] = make_role_key(folder, role)["clients"]
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, key_env: dict[str, Env]) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("roles-stack") / "home", **STACK_ENV)
    try:
        for service in SERVICES:
            s.start_one(service, key_env["worker" if service == "worker" else "services"])
        use(key_env["full"])
        s.wait_ready(tuple(SERVICES), 30)
        yield s
    finally:
        security.install(None)
        s.stop()


def request(endpoint: str, env: Env, cmd: Command, body: dict[str, Any] | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    use(env)
    with Client(endpoint, "test", timeout) as client:
        return client.request(cmd, body or {})


def forbidden(endpoint: str, env: Env, cmd: Command, body: dict[str, Any] | None = None) -> str:
    """The message of the `forbidden` error the request gets (it must get one)."""
    with pytest.raises(RemoteError) as refused:
        request(endpoint, env, cmd, body)
    assert refused.value.code is ErrorCode.FORBIDDEN, refused.value
    return str(refused.value)


def cli(stack: Stack, env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({**env, "GYMBUS_REQUEST_TIMEOUT": "5"}), *args,
                      timeout=90)


def log_of(stack: Stack, service: str) -> str:
    return stack.services[service].log_path.read_text(errors="replace")


def metric(run_id: str, seq: int = 0) -> list[bytes]:
    return list(encode_frame(FrameKind.METRIC, run_id, seq, {
        "name": ["x"], "step": [seq], "value": [1.0], "ts_ns": [0]}))


def stored_frames(stack: Stack, env: Env, run_id: str) -> int:
    use(env)
    with Client(stack.settings.ingest, "ingest", 5.0) as ingest:
        rows = sql(ingest, f"SELECT count(*) AS n FROM frames WHERE run_id = '{run_id}'")
    return int(rows[0]["n"])


# --- keys ---------------------------------------------------------------------------------------


def test_gymbus_keys_role_writes_the_role_into_the_certificate(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    first = CliRunner().invoke(keys, ["--dir", str(folder), "--role", "reader"], obj=Context())
    assert first.exit_code == 2 and "gymbus keys" in first.output  # no services' pair yet
    make_keys(folder)
    made = CliRunner().invoke(keys, ["--dir", str(folder), "--role", "worker", "--name", "w1",
                                     "--json"], obj=Context())
    assert made.exit_code == 0, made.output
    env = json.loads(made.output)
    assert env["role"] == "worker"
    assert env["clients"]["GYMBUS_CURVE_SECRET"] == str(folder.resolve() / "w1.key_secret")
    assert certificate_role(folder / "authorized" / "w1.key") is Role.WORKER
    assert certificate_role(folder / "w1.key_secret") is Role.WORKER
    assert oct(os.stat(folder / "w1.key_secret").st_mode & 0o777) == "0o600"
    assert certificate_role(folder / "authorized" / "client.key") is None  # full access
    public, secret = zmq.auth.load_certificate(folder / "w1.key_secret")  # zmq still reads it
    assert secret and authorized_keys(folder / "authorized")[public] is Role.WORKER
    again = CliRunner().invoke(keys, ["--dir", str(folder), "--role", "worker", "--name", "w1"],
                               obj=Context())
    assert again.exit_code == 2 and "--force" in again.output
    bad_name = CliRunner().invoke(keys, ["--dir", str(folder), "--role", "reader", "--name",
                                         "../x"], obj=Context())
    assert bad_name.exit_code == 2 and "plain file name" in bad_name.output


def test_an_unknown_role_is_refused_not_taken_for_full_access(tmp_path: Path) -> None:
    make_keys(tmp_path)
    cert = tmp_path / "authorized" / "client.key"
    cert.write_text(with_role(cert.read_text(), Role.READER).replace('"reader"', '"admin"'))
    with pytest.raises(RoleError, match="admin"):
        certificate_role(cert)
    assert authorized_keys(tmp_path / "authorized") == {}  # left out: never admitted
    with pytest.raises(SecurityError, match="other than .server."):
        make_role_key(tmp_path, Role.READER, "server")


# --- each role on a keyed stack -------------------------------------------------------------------


def test_a_submitter_submits_and_the_worker_key_publishes_its_dispatched_run(
    stack: Stack, key_env: dict[str, Env]
) -> None:
    result = cli(stack, key_env["submitter"], "submit", "--env", "FrozenLake-v1", "--algo",
                 "q-learning", "--episodes", "20", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    wait_until(lambda: request(stack.settings.ingest, key_env["reader"], Command.RUN_STATS,
                               {"run_id": run_id})["runs"][0]["complete"], 20,
               "the worker key's frames of its dispatched run to be stored")
    listed = cli(stack, key_env["reader"], "runs", "--json")
    assert listed.returncode == 0 and run_id in listed.stdout
    assert "refused telemetry" not in log_of(stack, "broker")


def test_a_reader_may_not_submit_or_cancel(stack: Stack, key_env: dict[str, Env]) -> None:
    reader = key_env["reader"]
    refused = cli(stack, reader, "submit", "--env", "FrozenLake-v1", "--algo", "q-learning",
                  "--episodes", "5")
    assert refused.returncode == 5 and "forbidden" in refused.stderr  # ExitCode.REFUSED
    assert "a reader key may not submit" in refused.stderr
    as_json = cli(stack, reader, "cancel", "01NOSUCHRUN", "--json")
    assert as_json.returncode != 0 and "forbidden" in as_json.stdout + as_json.stderr
    for cmd in (Command.OPEN_RUN, Command.SPOOL_STATUS):
        endpoint = stack.settings.ingest if cmd is Command.SPOOL_STATUS else \
            stack.settings.controller
        forbidden(endpoint, reader, cmd, {"run_id": "r"})
    assert request(stack.settings.controller, reader, Command.LIST_WORKERS)["workers"]
    for role in ("reader", "submitter"):  # administrative requests need a key without a role
        forbidden(stack.settings.controller, key_env[role], Command.DELETE_RUN, {"run_id": "x"})
    wait_until(lambda: "refused a request of key" in log_of(stack, "controller"), 5,
               "the controller to log the refusal")
    assert "a reader key may not submit" in log_of(stack, "controller")


def test_a_worker_key_may_not_submit_read_or_pose_as_the_controller(
    stack: Stack, key_env: dict[str, Env], ctx: zmq.Context[Any]
) -> None:
    worker = key_env["worker"]
    message = forbidden(stack.settings.controller, worker, Command.LIST_RUNS)
    assert "a worker key may not list_runs" in message
    forbidden(stack.settings.ingest, worker, Command.QUERY, {"sql": "SELECT 1"})
    forbidden(stack.settings.controller, worker, Command.CANCEL, {"run_id": "x"})
    use(worker)
    fake = new_socket(ctx, zmq.DEALER, identity=CONTROLLER_IDENTITY, linger=0)
    connect(fake, stack.settings.broker_controller, "broker")
    wait_until(lambda: "a worker key may not use it" in log_of(stack, "broker"), 10,
               "the broker to refuse the worker key on its controller ROUTER")
    assert "controller ROUTER" in log_of(stack, "broker")
    fake.close()


def test_readers_and_submitters_may_not_publish(stack: Stack, key_env: dict[str, Env],
                                                ctx: zmq.Context[Any]) -> None:
    for role in ("reader", "submitter"):
        use(key_env[role])
        pub = new_socket(ctx, zmq.XPUB, linger=0)
        connect(pub, stack.settings.telemetry_in, "broker's telemetry XSUB")
        assert not pub.poll(1000), f"a {role} key got a subscription from the broker"
        pub.close()
        wait_until(lambda r=role: f"a {r} key may not use it" in log_of(stack, "broker"), 10,
                   f"the broker to log the refused {role} publisher")


def test_a_publisher_key_publishes_only_its_own_runs(stack: Stack, key_env: dict[str, Env],
                                                     ctx: zmq.Context[Any]) -> None:
    """A script with a worker key opens its run: its frames are stored; frames of a run it did
    not open are refused, counted and logged by the broker, and never stored."""
    worker, s = key_env["worker"], stack.settings
    opened = request(s.controller, worker, Command.OPEN_RUN, {
        "run_id": "mine-1", "name": "mine", "env": "CartPole-v1", "telemetry": "full",
        "config": {}, "host": "test", "pid": os.getpid()})
    assert opened["created"]
    message = forbidden(s.controller, key_env["reader"], Command.RUN_ALIVE, {"run_id": "mine-1"})
    assert "run_alive" in message
    use(key_env["reader"])  # a reader watches the live feed
    live = new_socket(ctx, zmq.SUB, linger=0)
    live.setsockopt(zmq.SUBSCRIBE, b"")
    connect(live, s.telemetry_live, "broker's live telemetry output")
    use(worker)
    pub = new_socket(ctx, zmq.XPUB, linger=0)
    connect(pub, s.telemetry_in, "broker's telemetry XSUB")
    assert pub.poll(5000), "the worker key's publisher got no subscription"
    pub.recv_multipart()
    watched: list[bytes] = []

    def watch_and_publish() -> bool:
        """Publish until the live feed shows frames (its subscription takes a moment)."""
        if not watched:
            pub.send_multipart(metric("theirs-1", 0))
            pub.send_multipart(metric("mine-1", 0))
        while live.poll(50):
            watched.append(live.recv_multipart()[0])
        return bool(watched)

    wait_until(watch_and_publish, 10, "the reader to see the live frames")
    for seq in range(1, 3):
        pub.send_multipart(metric("mine-1", seq))
        pub.send_multipart(metric("theirs-1", seq))
    wait_until(lambda: stored_frames(stack, key_env["reader"], "mine-1") == 3, 10,
               "the opened run's frames")
    wait_until(lambda: "refused telemetry of run theirs-1" in log_of(stack, "broker"), 10,
               "the broker to log the refused frames")
    assert stored_frames(stack, key_env["reader"], "theirs-1") == 0
    while live.poll(500):
        watched.append(live.recv_multipart()[0])
    assert set(watched) == {b"metric.mine-1"}, watched  # refused frames reach no viewer either
    live.close()
    pub.close()
    closed = request(s.controller, worker, Command.CLOSE_RUN, {"run_id": "mine-1",
                                                               "status": "completed"})
    assert closed is not None
    forbidden(s.controller, worker, Command.RUN_ALIVE, {"run_id": "theirs-1"})
    with pytest.raises(ServiceUnavailable):
        request(s.controller, {}, Command.PING, timeout=0.5)  # no key: no answer at all


RECORDING = """
import gymnasium as gym
import gymbus
with gymbus.run(name="keyed", config={"env": "CartPole-v1"}) as run:
    env = run.record(gym.make("CartPole-v1"))
    env.reset(seed=1)
    for _ in range(300):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
print(run.run_id)
"""


def test_a_recording_script_with_a_worker_key_is_stored_and_a_reader_key_cannot_record(
    stack: Stack, key_env: dict[str, Env]
) -> None:
    def script(env: Env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", RECORDING], capture_output=True, text=True,
                              timeout=90, check=False, env=stack.process_env(env))

    recorded = script(key_env["worker"])
    assert recorded.returncode == 0, recorded.stderr
    run_id = recorded.stdout.split()[-1]
    stats = request(stack.settings.ingest, key_env["reader"], Command.RUN_STATS,
                    {"run_id": run_id})["runs"][0]
    assert stats["complete"] and stats["steps"] == 300 and stats["gaps"] == 0
    refused = script(key_env["reader"])
    assert refused.returncode != 0 and "a reader key may not open_run" in refused.stderr


def test_a_worker_key_s_running_run_keeps_publishing_across_a_broker_restart(
    stack: Stack, key_env: dict[str, Env]
) -> None:
    """The broker forgets its grants when it restarts; the controller grants again the runs its
    registry gives to a worker that registers with them, so nothing of them is refused. (Last in
    the module: it restarts the module's broker.)"""
    result = cli(stack, key_env["submitter"], "submit", "--env", "FrozenLake-v1", "--algo",
                 "q-learning", "--episodes", "6000", "--json")
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    wait_until(lambda: stored_frames(stack, key_env["reader"], run_id) > 2, 30,
               "the run's first frames to be stored")
    stack.stop_one("broker", signal.SIGKILL)
    stack.start_one("broker", key_env["services"])
    stack.wait_ready(("broker",), 30)
    wait_until(lambda: request(stack.settings.controller, key_env["reader"], Command.GET_RUN,
                               {"run_id": run_id})["run"]["state"] == "completed", 90,
               "the run to complete")
    wait_until(lambda: request(stack.settings.ingest, key_env["reader"], Command.RUN_STATS,
                               {"run_id": run_id})["runs"][0]["complete"], 60,
               "every frame of the run to be stored")
    # frames the run sent before its worker re-registered may be refused (and then replayed
    # from its spool, as above); none after
    log = log_of(stack, "broker")
    ready = log.rindex("ready: ")  # the worker registering with the restarted broker
    assert f"refused telemetry of run {run_id}" not in log[ready:]
