"""Domain errors and the documented exit codes.

Every error the core can raise is a ``FleetError`` carrying the exit code the CLI uses and the HTTP
status / JSON error code the server uses, so both skins turn errors into output in exactly one place
(``fleetctl.cli._common.cli_errors`` and the server's error handler).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in docs/cli.md and asserted in tests/test_exit_codes.py."""

    OK = 0
    ERROR = 1  # operational error (store busy, disk full, unexpected)
    USAGE = 2  # bad usage or bad configuration
    NOT_FOUND = 3
    CONFLICT = 4  # invalid transition, lease lost, duplicate
    REMOTE = 5  # SSH, Forgejo, Matrix or remote API failed
    VALIDATION = 6  # receipt (or other submitted document) failed validation
    INTERRUPTED = 130


class FleetError(Exception):
    """Base of every expected error. ``code`` is a stable machine-readable slug."""

    exit_code: ExitCode = ExitCode.ERROR
    http_status: int = 500
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_json(self) -> dict:
        """The JSON error body used by the HTTP API and ``--json`` error output."""
        body = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class UsageError(FleetError):
    """Bad input from the caller: a malformed id, an unknown option value, bad JSON."""

    exit_code = ExitCode.USAGE
    http_status = 400
    code = "bad_request"


class ConfigError(FleetError):
    """The configuration is invalid. The message names the file, the key and, when known, line:column."""

    exit_code = ExitCode.USAGE
    http_status = 500
    code = "config_error"


class NotFound(FleetError):
    """A task, agent or other named thing does not exist."""

    exit_code = ExitCode.NOT_FOUND
    http_status = 404
    code = "not_found"


class Conflict(FleetError):
    """The request conflicts with the current state (duplicate, already exists)."""

    exit_code = ExitCode.CONFLICT
    http_status = 409
    code = "conflict"


class LeaseLost(Conflict):
    """A write about an attempt that is no longer the caller's (fencing by task, agent and attempt)."""

    code = "lease_lost"


class InvalidTransition(FleetError):
    """The task's state machine does not allow this change from its current state."""

    exit_code = ExitCode.CONFLICT
    http_status = 422
    code = "invalid_transition"


class ValidationFailed(FleetError):
    """A submitted document (receipt) is well-formed input but does not pass validation."""

    exit_code = ExitCode.VALIDATION
    http_status = 422
    code = "validation_failed"


class RemoteError(FleetError):
    """A remote system (SSH host, Forgejo, Matrix, the fleetctl API) failed or was unreachable."""

    exit_code = ExitCode.REMOTE
    http_status = 502
    code = "remote_error"


class HostUnreachable(RemoteError):
    """An SSH host could not be reached or logged in to (refused, timed out, wrong key, changed host key):
    the host is marked down, not only the one operation failed."""


class StoreBusy(FleetError):
    """The database stayed locked past busy_timeout; nothing was written."""

    exit_code = ExitCode.ERROR
    http_status = 503
    code = "store_busy"


class ListenError(FleetError):
    """``serve`` cannot listen on a valid address: the port is in use, or binding it is not permitted."""

    exit_code = ExitCode.ERROR
    code = "listen_error"


class StoreError(FleetError):
    """The database cannot be used: corrupt, read-only, disk full, newer schema, old SQLite."""

    exit_code = ExitCode.ERROR
    http_status = 503
    code = "store_error"


class Unauthorized(FleetError):
    """Missing or wrong credentials."""

    exit_code = ExitCode.USAGE
    http_status = 401
    code = "unauthorized"


class Forbidden(FleetError):
    """Valid credentials that may not do this (an agent acting on another agent's task)."""

    exit_code = ExitCode.USAGE
    http_status = 403
    code = "forbidden"
