"""Fault test 7 and the key set-up: CURVE keys from `gymbus keys`, the loopback rule without them,
and a stack whose services refuse (and log) every peer without an authorized key.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner
from conftest import STACK_ENV, gymbus_cli, make_stack, wait_until
from test_fuzz import sql

from gymbus.services.cli.context import Context
from gymbus.services.cli.keys import keys, make_keys, make_role_key
from gymbus.services.stack.launcher import SERVICES, Stack
from gymbus.shared import roles, security
from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.gate import receive
from gymbus.shared.protocol import Command, ErrorCode, FrameKind
from gymbus.shared.roles import Role, role_of
from gymbus.shared.security import SecurityError
from gymbus.shared.transport import Client, bind, connect, new_socket, recv_request, send_reply


@pytest.fixture(autouse=True)
def fresh_policy() -> Iterator[None]:
    """Each test starts from the environment's policy and leaves it so."""
    security.install(None)
    yield
    security.install(None)


@pytest.fixture(scope="module")
def key_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, str]]]:
    """The stack's keys, and an intruder's: another `gymbus keys` run."""
    base = tmp_path_factory.mktemp("keys")
    return {"good": make_keys(base / "good"), "intruder": make_keys(base / "intruder")}


def use(env: dict[str, str]) -> None:
    security.install(security.load(env))


# --- keys and policy --------------------------------------------------------------------------


def test_gymbus_keys_lays_out_the_folders_and_prints_the_variables(tmp_path: Path) -> None:
    target = tmp_path / "keys"
    result = CliRunner().invoke(keys, ["--dir", str(target)], obj=Context())
    assert result.exit_code == 0, result.output
    assert "export GYMBUS_CURVE_SECRET=" in result.output
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "authorized/client.key"):
        assert (target / name).is_file(), name
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600
    again = CliRunner().invoke(keys, ["--dir", str(target), "--json"], obj=Context())
    assert again.exit_code == 2 and "--force" in again.output  # existing keys are kept
    forced = CliRunner().invoke(keys, ["--dir", str(target), "--json", "--force"], obj=Context())
    env = json.loads(forced.output)
    assert set(env["services"]) == {"GYMBUS_CURVE_SECRET", "GYMBUS_CURVE_SERVER",
                                    "GYMBUS_CURVE_AUTHORIZED"}
    assert security.load(env["services"]).curve and security.load(env["clients"]).curve


def test_half_configured_keys_are_refused_with_the_variable_named(tmp_path: Path) -> None:
    env = make_keys(tmp_path / "k")
    services = env["services"]
    bad = [({"GYMBUS_CURVE_SERVER": services["GYMBUS_CURVE_SERVER"]}, "GYMBUS_CURVE_SECRET"),
           ({"GYMBUS_CURVE_SECRET": services["GYMBUS_CURVE_SERVER"]}, "no secret key"),
           ({"GYMBUS_CURVE_SECRET": str(tmp_path / "missing")}, "cannot read"),
           ({**services, "GYMBUS_CURVE_AUTHORIZED": str(tmp_path / "nope")}, "not a folder")]
    for variables, message in bad:
        with pytest.raises(SecurityError, match=message):
            security.load(variables)
    assert not security.load({}).curve


def test_without_keys_only_loopback_may_be_bound(ctx: zmq.Context[Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert all(security.is_local(e) for e in (
        "tcp://127.0.0.1:5550", "tcp://localhost:1", "tcp://[::1]:5", "ipc:///tmp/x", "inproc://x"))
    assert not any(security.is_local(e) for e in (
        "tcp://0.0.0.0:5550", "tcp://*:5550", "tcp://eth0:1", "tcp://10.1.2.3:1", "tcp://host:1"))
    use({})
    with pytest.raises(SecurityError, match="gymbus keys"):
        bind(new_socket(ctx, zmq.ROUTER), "tcp://0.0.0.0:*", "test API")
    use({"GYMBUS_INSECURE": "1"})
    with caplog.at_level(logging.WARNING, "gymbus.security"):
        bind(new_socket(ctx, zmq.ROUTER, linger=0), "tcp://0.0.0.0:*", "test API")
    assert "without authentication" in caplog.text


def test_keys_need_their_counterparts(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    env = make_keys(tmp_path / "k")
    use({"GYMBUS_CURVE_SECRET": env["clients"]["GYMBUS_CURVE_SECRET"]})
    with pytest.raises(SecurityError, match="GYMBUS_CURVE_AUTHORIZED"):
        bind(new_socket(ctx, zmq.ROUTER), "tcp://127.0.0.1:*", "test API")
    with pytest.raises(SecurityError, match="GYMBUS_CURVE_SERVER"):
        connect(new_socket(ctx, zmq.DEALER), "tcp://127.0.0.1:9", "test API")


# --- one CURVE server in this process ----------------------------------------------------------


class EchoServer:
    """A ROUTER bound through transport on its own thread (which owns all its sockets)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.endpoint = ""
        self._ready = threading.Event()
        self._stop = threading.Event()
        use(env)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _serve(self) -> None:
        sock = new_socket(self.ctx, zmq.ROUTER, linger=0)
        bind(sock, "tcp://127.0.0.1:*", "echo API (ROUTER)")
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ready.set()
        while not self._stop.is_set():
            if sock.poll(50):
                identity, msg = recv_request(sock)
                if not isinstance(msg, Exception):
                    send_reply(sock, identity, msg.req, {"echo": True})
        sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ctx.term()


def ping(endpoint: str, env: dict[str, str], timeout: float = 0.5) -> dict[str, Any]:
    use(env)
    with Client(endpoint, "echo", timeout) as client:
        return client.request(Command.PING)


def test_only_authorized_keys_get_an_answer_and_every_refusal_is_logged(
    key_sets: dict[str, dict[str, dict[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    good, intruder = key_sets["good"], key_sets["intruder"]
    server = EchoServer(good["services"])
    try:
        with caplog.at_level(logging.INFO, "gymbus.security"):
            assert ping(server.endpoint, good["clients"]) == {"echo": True}
            stolen_server_key = {**intruder["clients"],
                                 "GYMBUS_CURVE_SERVER": good["clients"]["GYMBUS_CURVE_SERVER"]}
            for env in (stolen_server_key, intruder["clients"], {}):
                with pytest.raises(ServiceUnavailable):
                    ping(server.endpoint, env)
            intruder_key = Path(intruder["clients"]["GYMBUS_CURVE_SECRET"]).with_suffix(".key")
            shutil.copy(intruder_key, Path(good["services"]["GYMBUS_CURVE_AUTHORIZED"]) / "new.key")
            assert ping(server.endpoint, stolen_server_key, 2.0) == {"echo": True}  # no restart
        text = caplog.text
        assert "unknown key" in text and "echo API (ROUTER)" in text
        assert "another server key" in text
        assert "no CURVE keys" in text or "without keys" in text
    finally:
        (Path(good["services"]["GYMBUS_CURVE_AUTHORIZED"]) / "new.key").unlink(missing_ok=True)
        server.close()


# --- a whole stack with keys ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory,
                key_sets: dict[str, dict[str, dict[str, str]]]) -> Iterator[Stack]:
    """Broker, controller and ingest with the services' keys; the worker with a client's."""
    good = key_sets["good"]
    stack = make_stack(tmp_path_factory.mktemp("keyed") / "home", **STACK_ENV)
    try:
        for role in SERVICES:
            stack.start_one(role, good["clients" if role == "worker" else "services"])
        use(good["clients"])  # for wait_ready's clients
        stack.wait_ready(tuple(SERVICES), 30)
        yield stack
    finally:
        security.install(None)
        stack.stop()


def cli(stack: Stack, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({**env, "GYMBUS_REQUEST_TIMEOUT": "2"}), *args,
                      timeout=90)


def test_with_the_right_keys_a_run_is_submitted_trained_and_stored(
    keyed_stack: Stack, key_sets: dict[str, dict[str, dict[str, str]]]
) -> None:
    result = cli(keyed_stack, key_sets["good"]["clients"], "submit", "--env", "FrozenLake-v1",
                 "--algo", "q-learning", "--episodes", "30", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    use(key_sets["good"]["clients"])
    with Client(keyed_stack.settings.ingest, "ingest", 5.0) as ingest:
        wait_until(lambda: ingest.request(Command.RUN_STATS, {"run_id": run_id})["runs"][0][
            "complete"], 20, "the run's frames to be stored")
    for role in ("broker", "controller", "ingest"):
        log = keyed_stack.services[role].log_path.read_text()
        assert "CURVE on" in log and "no CURVE keys" not in log, role


def test_a_client_with_the_wrong_key_is_refused_and_the_refusal_logged(
    keyed_stack: Stack, key_sets: dict[str, dict[str, dict[str, str]]]
) -> None:
    s, intruder = keyed_stack.settings, key_sets["intruder"]["clients"]
    stolen_server_key = {**intruder, "GYMBUS_CURVE_SERVER": key_sets["good"]["clients"][
        "GYMBUS_CURVE_SERVER"]}
    public = zmq.auth.load_certificate(intruder["GYMBUS_CURVE_SECRET"])[0].decode()
    for endpoint, service in ((s.controller, "controller"), (s.ingest, "ingest")):
        for env in (stolen_server_key, intruder):
            use(env)
            with Client(endpoint, service, 0.5) as client, pytest.raises(ServiceUnavailable):
                client.request(Command.PING)
        text = keyed_stack.services[service].log_path.read_text
        wait_until(lambda t=text: f"unknown key {public}" in t(), 5,
                   f"the {service} to log the refused key")
        assert "another server key" in text()
    without_keys = cli(keyed_stack, {}, "runs")
    assert without_keys.returncode == 3 and "did not answer" in without_keys.stderr
    keyed_stack.check_alive()


def test_a_publisher_with_the_wrong_key_gets_nothing_stored(
    keyed_stack: Stack, key_sets: dict[str, dict[str, dict[str, str]]], ctx: zmq.Context[Any]
) -> None:
    s = keyed_stack.settings
    intruder = {**key_sets["intruder"]["clients"],
                "GYMBUS_CURVE_SERVER": key_sets["good"]["clients"]["GYMBUS_CURVE_SERVER"]}
    frames = [list(encode_frame(FrameKind.METRIC, run_id, 0, {
        "name": ["x"], "step": [0], "value": [1.0], "ts_ns": [0]})) for run_id in ("bad", "good")]
    use(intruder)
    bad = new_socket(ctx, zmq.PUB, linger=0)
    bad.monitor("inproc://refused", zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    refused = ctx.socket(zmq.PAIR)
    refused.connect("inproc://refused")
    connect(bad, s.telemetry_in, "broker's telemetry XSUB")
    assert refused.poll(5000), "the intruder's handshake was not refused"
    for _ in range(3):
        bad.send_multipart(frames[0])
    use(key_sets["good"]["clients"])
    good = new_socket(ctx, zmq.XPUB, linger=0)
    connect(good, s.telemetry_in, "broker's telemetry XSUB")
    assert good.poll(5000), "the good publisher got no subscription"
    good.send_multipart(frames[1])
    with Client(s.ingest, "ingest", 5.0) as ingest:
        wait_until(lambda: sql(ingest, "SELECT count(*) AS n FROM frames WHERE run_id = 'good'")[
            0]["n"] == 1, 10, "the good frame")
        with pytest.raises(RemoteError) as nothing:
            ingest.request(Command.RUN_STATS, {"run_id": "bad"})
        assert nothing.value.code is ErrorCode.UNKNOWN_RUN
    assert "telemetry input (XSUB)" in keyed_stack.services["broker"].log_path.read_text()
    for sock in (bad, refused, good):
        sock.close()


# --- roles per key ------------------------------------------------------------------------------


class WhoServer(EchoServer):
    """An EchoServer bound as `what` that answers with the ZAP User-Id and role of the asker."""

    def __init__(self, env: dict[str, str], what: str) -> None:
        self.what = what
        super().__init__(env)

    def _serve(self) -> None:
        sock = new_socket(self.ctx, zmq.ROUTER, linger=0)
        bind(sock, "tcp://127.0.0.1:*", self.what)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ready.set()
        while not self._stop.is_set():
            if sock.poll(50):
                identity, user, msg = receive(sock, 1 << 20)
                if not isinstance(msg, Exception):
                    send_reply(sock, identity, msg.req, {"user": user, "role": role_of(user)})
        sock.close()


def test_a_role_key_is_admitted_only_where_its_role_goes_and_carries_its_role(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_keys(tmp_path / "k")
    reader = make_role_key(tmp_path / "k", Role.READER)["clients"]
    public = zmq.auth.load_certificate(reader["GYMBUS_CURVE_SECRET"])[0].decode()
    api = WhoServer(good["services"], roles.CONTROLLER_API)
    feed = WhoServer(good["services"], roles.TELEMETRY_IN)
    try:
        with caplog.at_level(logging.INFO, "gymbus.security"):
            assert ping(api.endpoint, reader) == {"user": public, "role": "reader"}
            full = ping(api.endpoint, good["clients"])
            assert full["role"] is None and full["user"]  # no role: full access
            assert ping(feed.endpoint, good["clients"])["role"] is None
            with pytest.raises(ServiceUnavailable):
                ping(feed.endpoint, reader)
        assert f"a reader key may not use it {public}" in caplog.text
        assert "telemetry input (XSUB)" in caplog.text
    finally:
        api.close()
        feed.close()


def test_a_changed_role_takes_effect_on_the_next_connection(tmp_path: Path) -> None:
    """The guard reads roles with the keys: a reader whose certificate becomes a worker's may
    publish once it connects again (keys and roles are checked per connection)."""
    good = make_keys(tmp_path / "k")
    reader = make_role_key(tmp_path / "k", Role.READER, "who")["clients"]
    feed = WhoServer(good["services"], roles.TELEMETRY_IN)
    try:
        with pytest.raises(ServiceUnavailable):
            ping(feed.endpoint, reader)
        admitted = Path(good["services"]["GYMBUS_CURVE_AUTHORIZED"]) / "who.key"
        admitted.write_text(admitted.read_text().replace('"reader"', '"worker"'))
        def as_worker() -> bool:
            try:
                return ping(feed.endpoint, reader)["role"] == "worker"
            except ServiceUnavailable:
                return False  # asked before the guard read the folder again (once a second)
        wait_until(as_worker, 10, "the changed role to be admitted")
    finally:
        feed.close()
