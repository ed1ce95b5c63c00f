"""The project's own errors: each says what went wrong and how to recover, and maps to an exit code.

Transport code translates ZeroMQ and msgpack exceptions into these; handlers and the CLI never
see `zmq.ZMQError` or `msgpack` exceptions.
"""

from __future__ import annotations

from typing import Any

from gymbus.shared.protocol import ErrorCode


class ExitCode:
    """Exit codes of the `gymbus` command."""

    OK = 0
    #: the run ended, but not `completed` (submit --wait)
    RUN_NOT_COMPLETED = 1
    #: bad input: invalid config, bad arguments, a query that would write
    BAD_INPUT = 2
    #: a service did not answer
    UNAVAILABLE = 3
    #: no such run
    NOT_FOUND = 4
    #: the service refused or failed the request for another reason
    REFUSED = 5
    #: a wait (--wait with --timeout) ran out of time; the runs go on
    TIMED_OUT = 6


class GymbusError(Exception):
    """Base of every gymbus error. `str(err)` is one readable line."""

    exit_code = ExitCode.REFUSED
    code = ErrorCode.INTERNAL

    def to_wire(self) -> dict[str, Any]:
        """The error as the body of an error reply."""
        return {"code": self.code.value, "message": str(self)}


class ConfigError(GymbusError):
    """A run config is invalid. Fix the named field and submit again; nothing was stored."""

    exit_code = ExitCode.BAD_INPUT
    code = ErrorCode.INVALID_CONFIG

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "field": self.field}


class DecodeError(GymbusError):
    """A frame or message failed to decode; it is counted and kept as a dead letter."""

    exit_code = ExitCode.BAD_INPUT
    code = ErrorCode.BAD_REQUEST

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ServiceUnavailable(GymbusError):
    """A service did not answer in time. Start the stack (`honcho start`) or check the endpoint."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, service: str, endpoint: str, timeout: float) -> None:
        super().__init__(
            f"the {service} at {endpoint} did not answer within {timeout:g} s "
            f"(is it running? start the stack with `honcho start`)"
        )
        self.service = service
        self.endpoint = endpoint


class StoreUnavailable(ServiceUnavailable):
    """Stored telemetry could not be read: the ingest did not answer, and its DuckDB file could
    not be opened read-only either (there is none yet, or the ingest holds it while busy). Start
    the stack (`honcho start`), check GYMBUS_HOME, or ask again once the ingest is less busy."""

    def __init__(self, endpoint: str, timeout: float, db_path: str, why: str) -> None:
        # its own message, naming both places it tried, instead of ServiceUnavailable's
        GymbusError.__init__(
            self, f"the ingest at {endpoint} did not answer within {timeout:g} s, and the DuckDB "
                  f"file {db_path} {why} (is the stack running? start it with `honcho start`)")
        self.service = "ingest"
        self.endpoint = endpoint
        self.db_path = db_path


class NotFound(GymbusError):
    """What was asked for is not stored (an episode of a run, say). Check the name or number:
    the message says what is there."""

    exit_code = ExitCode.NOT_FOUND


#: the exit code of the CLI for each error code a service may answer with
EXIT_CODES = {
    ErrorCode.INVALID_CONFIG: ExitCode.BAD_INPUT,
    ErrorCode.BAD_REQUEST: ExitCode.BAD_INPUT,
    ErrorCode.UNSUPPORTED_VERSION: ExitCode.BAD_INPUT,
    ErrorCode.READ_ONLY: ExitCode.BAD_INPUT,
    ErrorCode.QUERY_FAILED: ExitCode.BAD_INPUT,
    ErrorCode.TOO_LARGE: ExitCode.BAD_INPUT,
    ErrorCode.UNKNOWN_RUN: ExitCode.NOT_FOUND,
}


class RemoteError(GymbusError):
    """A service answered with an error; the message says what was wrong with the request."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL
        self.field = field
        self.exit_code = EXIT_CODES.get(self.code, ExitCode.REFUSED)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> RemoteError:
        return cls(str(body.get("code", "internal")), str(body.get("message", "")), body.get("field"))


class RequestError(GymbusError):
    """A handler refuses a request; becomes an error reply with this code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = EXIT_CODES.get(code, ExitCode.REFUSED)
