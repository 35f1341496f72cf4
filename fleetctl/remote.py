"""The client of a remote ``fleetctl serve`` (SPEC §6): the CLI's remote mode and ``agent run`` use it.

With ``FLEET_API_URL`` (or ``--api-url``) the agent-facing commands — ``task complete``, ``task status``,
``task run-ended``, ``agent register``, ``agent heartbeat`` — talk to the API instead of the local database, and print the
same output with the same exit codes. The API answers errors as ``{"error": {"code", "message"}}``;
``error_for`` turns them back into the ``FleetError`` the local service would have raised, so the CLI's
one error handler gives the same exit code either way:

=========================================  ======================  ====
HTTP status / JSON code                    error                   exit
=========================================  ======================  ====
400 (and 405, 411, 413, 414, 431)          ``UsageError``          2
401 / 403                                  ``Unauthorized`` / …    2
404                                        ``NotFound``            3
409 (``lease_lost`` or other)              ``LeaseLost``/Conflict  4
422 ``invalid_transition``                 ``InvalidTransition``   4
422 (``receipt_invalid``, other)           ``ValidationFailed``    6
5xx, connection errors, timeouts           ``RemoteError``         5
=========================================  ======================  ====

Retries: connection errors and 502/503/504 are retried with bounded exponential backoff (honouring
``Retry-After``) within a budget of ``FLEET_API_RETRY_SECS`` seconds (default 10; 0 = one try), but
only for calls that are safe to repeat: the fenced writes are (an identical repeated completion gets
``200`` with ``"repeated": true``, a repeated ``running`` is a no-op, a repeated run-ended finds the attempt
settled, a heartbeat is a heartbeat).
A dequeue is not — a lost reply may have claimed a task — so it is tried once; its caller loops.

httpx is imported inside ``Client`` only: this module is cheap to import, and the CLI imports it only
when remote mode is on. Tokens travel in the ``Authorization`` header and never appear in a message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fleetctl.errors import (
    Conflict,
    FleetError,
    Forbidden,
    InvalidTransition,
    LeaseLost,
    NotFound,
    RemoteError,
    Unauthorized,
    UsageError,
    ValidationFailed,
)
from fleetctl.ids import check_id

TASK_TOKEN_ENV = ("FLEET_TASK_TOKEN", "FLEET_AGENT_TOKEN", "FLEET_API_TOKEN")
"""Where ``task complete`` / ``task status`` look for a token after ``--token``: a run's per-attempt token
(acts on its task only), an agent's own token, a generic API token."""

AGENT_TOKEN_ENV = ("FLEET_AGENT_TOKEN", "FLEET_API_TOKEN")
"""Where ``agent heartbeat`` looks for a token after ``--token`` (only an agent's own token can heartbeat)."""

REGISTRATION_TOKEN_ENV = ("FLEET_REGISTRATION_TOKEN", "FLEET_API_TOKEN")
"""Where ``agent register`` and ``agent run`` look for the registration token after ``--token``."""

DEFAULT_RETRY_SECS = 10.0
"""How long a retryable call keeps trying through connection errors and 503s (``FLEET_API_RETRY_SECS``)."""

DEFAULT_TIMEOUT_SECS = 30.0
"""Read timeout of one request (a long-poll dequeue adds its ``wait`` on top)."""

CONNECT_TIMEOUT_SECS = 5.0
"""Connect timeout of one request."""

_RETRY_STATUS = frozenset({502, 503, 504})


def api_url(explicit: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The API base URL: ``--api-url``, else ``$FLEET_API_URL``; None means local mode."""
    env = os.environ if env is None else env
    return explicit or env.get("FLEET_API_URL") or None


def resolve_token(explicit: str | None, names: Iterable[str], env: Mapping[str, str] | None = None) -> str | None:
    """``--token`` if given, else the first of the environment variables ``names`` that is set."""
    env = os.environ if env is None else env
    if explicit:
        return explicit
    return next((env[n] for n in names if env.get(n)), None)


def connect(url: str, token: str | None, names: Iterable[str], **kwargs: Any) -> Client:
    """A ``Client`` for ``url`` with the token resolved from ``token`` / ``names``; UsageError if there is none."""
    names = tuple(names)
    resolved = resolve_token(token, names)
    if not resolved:
        raise UsageError(f"remote mode ({url}) needs a token: --token or ${', $'.join(names)}")
    return Client(url, resolved, **kwargs)


def retry_budget(env: Mapping[str, str] | None = None) -> float:
    """``$FLEET_API_RETRY_SECS`` (seconds a retryable call keeps trying), default ``DEFAULT_RETRY_SECS``."""
    env = os.environ if env is None else env
    raw = env.get("FLEET_API_RETRY_SECS")
    if not raw:
        return DEFAULT_RETRY_SECS
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"$FLEET_API_RETRY_SECS must be a number of seconds, not {raw!r}") from None
    if not 0 <= value <= 86400:
        raise UsageError("$FLEET_API_RETRY_SECS must be between 0 and 86400")
    return value


def error_for(status: int, body: Any, what: str) -> FleetError:
    """The ``FleetError`` (and so the exit code) that an error answer of the API stands for."""
    err = body.get("error") if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None
    message = err.get("message") if isinstance(err, dict) and isinstance(err.get("message"), str) else None
    details = err.get("details") if isinstance(err, dict) and isinstance(err.get("details"), dict) else None
    message = message or f"{what}: HTTP {status}"
    kw: dict[str, Any] = {"code": code, "details": details}
    if status == 401:
        return Unauthorized(message, **kw)
    if status == 403:
        return Forbidden(message, **kw)
    if status == 404:
        return NotFound(message, **kw)
    if status == 409:
        return (LeaseLost if code in (None, "lease_lost") else Conflict)(message, **kw)
    if status == 422:
        return (InvalidTransition if code == "invalid_transition" else ValidationFailed)(message, **kw)
    if 400 <= status < 500:
        return UsageError(message, **kw)
    return RemoteError(f"the fleetctl API failed: {message}", code=code or "remote_error", details=details)


class Transient(RemoteError):
    """A failure worth retrying: the server was unreachable, timed out, or answered 502/503/504."""


class Client:
    """Calls of the agent API with one bearer token. One instance per thread (it owns an httpx pool).

    Example: ``Client("http://orchestrator:9090", os.environ["FLEET_TASK_TOKEN"]).complete(task_id, receipt)``.
    """

    def __init__(self, url: str, token: str, *, retry_secs: float | None = None,
                 timeout: float = DEFAULT_TIMEOUT_SECS) -> None:  # fmt: skip
        import httpx

        if not url.startswith(("http://", "https://")):
            raise UsageError(f"the API URL must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.retry_secs = retry_budget() if retry_secs is None else retry_secs
        self.timeout = timeout
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "fleetctl"},
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECS),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, body: dict | None = None, *, retry: bool = True,
                timeout: float | None = None) -> tuple[int, Any]:  # fmt: skip
        """One API call: ``(status, JSON body or None)`` for 2xx, else the matching ``FleetError``.

        With ``retry`` (for calls safe to repeat), ``Transient`` failures are retried with backoff until
        the retry budget is spent; the last one is raised (a ``RemoteError``: exit 5).
        """
        deadline = time.monotonic() + (self.retry_secs if retry else 0)
        delay = 0.25
        while True:
            try:
                return self._once(method, path, body, timeout)
            except Transient as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                pause = min(max(delay, exc.details.get("retry_after", 0)), left, 5.0)
                time.sleep(pause)
                delay = min(delay * 2, 4.0)

    def _once(self, method: str, path: str, body: dict | None, timeout: float | None) -> tuple[int, Any]:
        what = f"{method} {self.url}{path}"
        extra = {} if timeout is None else {"timeout": self._httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECS)}
        try:
            resp = self._http.request(method, path, json=body, **extra)
        except self._httpx.TimeoutException as exc:
            raise Transient(f"the fleetctl API at {self.url} timed out ({type(exc).__name__})",
                            code="api_timeout") from None  # fmt: skip
        except self._httpx.TransportError as exc:
            raise Transient(f"cannot reach the fleetctl API at {self.url}: {exc or type(exc).__name__}",
                            code="api_unreachable") from None  # fmt: skip
        try:
            doc = resp.json() if resp.content else None
        except ValueError:
            doc = None
        if resp.status_code < 300:
            return resp.status_code, doc
        if resp.status_code in _RETRY_STATUS:
            retry_after = _seconds(resp.headers.get("Retry-After"))
            base = error_for(resp.status_code, doc, what)
            raise Transient(f"{base.message} (HTTP {resp.status_code})", code=base.code,
                            details={"retry_after": retry_after})  # fmt: skip
        raise error_for(resp.status_code, doc, what)

    # ------------------------------------------------------------------ the agent API

    def register(self, agent_id: str, *, agent_type: str, capabilities: Iterable[str] = (),
                 max_concurrency: int = 1, mode: str = "http_pull") -> tuple[dict, bool]:  # fmt: skip
        """Register (or update) a pull agent: ``(agent with its new "token", created?)``."""
        check_id(agent_id, "agent id")
        doc = {"agent_id": agent_id, "agent_type": agent_type, "capabilities": list(capabilities),
               "max_concurrency": max_concurrency, "mode": mode}  # fmt: skip
        status, reply = self.request("POST", "/api/v1/agents/register", doc)
        return reply, status == 201

    def heartbeat(self, *, retry: bool = True) -> dict:
        """``{"agent", "cancelled", "heartbeat_interval_secs"}`` for the token's agent."""
        return self.request("POST", "/api/v1/agents/heartbeat", {}, retry=retry)[1]

    def deregister(self) -> dict:
        """Take the token's agent offline (its running attempts fail ``agent_lost``)."""
        return self.request("POST", "/api/v1/agents/deregister", {})[1]

    def dequeue(self, wait: float = 30.0) -> dict | None:
        """Claim a task (long-poll up to ``wait`` s): ``{"task", "attempt", "task_token", "prompt", …}`` or None.

        Tried once: a reply lost in transit may have claimed a task, so the caller decides what next.
        """
        status, reply = self.request("POST", "/api/v1/tasks/dequeue", {"wait": wait}, retry=False,
                                     timeout=self.timeout + wait)  # fmt: skip
        return reply if status == 200 else None

    def task(self, task_id: str) -> dict:
        """A task with its attempts and events."""
        check_id(task_id, "task id")
        return self.request("GET", f"/api/v1/tasks/{task_id}")[1]

    def status(self, task_id: str, *, attempt: int | None, status: str, message: str = "",
               retry_after: float | None = None, usage: dict | None = None) -> dict:  # fmt: skip
        """Report ``running``, a progress message, usage so far or ``rate_limited``; the task."""
        check_id(task_id, "task id")
        doc: dict[str, Any] = {"status": status, "message": message}
        if attempt is not None:
            doc["attempt"] = attempt
        if retry_after is not None:
            doc["retry_after_secs"] = retry_after
        if usage is not None:
            doc["usage"] = usage
        return self.request("POST", f"/api/v1/tasks/{task_id}/status", doc)[1]

    def complete(self, task_id: str, receipt: dict, *, attempt: int | None = None) -> dict:
        """Hand in a receipt; the task with ``"repeated"``. Without ``attempt``, the current one (as locally)."""
        check_id(task_id, "task id")
        doc = dict(receipt)
        if attempt is not None:
            doc["attempt"] = attempt
        elif "attempt" not in doc:  # the current attempt, read first, as the local command does
            task = self.task(task_id)
            if task["attempt"] < 1:
                raise LeaseLost(f"task {task_id} was never claimed (it is {task['state']}): no attempt to complete")
            doc["attempt"] = task["attempt"]
        return self.request("POST", f"/api/v1/tasks/{task_id}/complete", doc)[1]

    def run_ended(self, task_id: str, *, attempt: int, exit_code: int | None, detail: str = "",
                  retry_after: float | None = None) -> dict:  # fmt: skip
        """Report that the run of ``attempt`` ended; the task with ``"settled"`` and ``"reason"``."""
        check_id(task_id, "task id")
        doc: dict[str, Any] = {"attempt": attempt, "exit_code": exit_code}
        if detail:
            doc["detail"] = detail
        if retry_after is not None:
            doc["retry_after_secs"] = retry_after
        return self.request("POST", f"/api/v1/tasks/{task_id}/run-ended", doc)[1]


def heartbeat_as(client: Client, agent_id: str) -> dict:
    """``client.heartbeat()`` for the agent named on the command line: the token decides who heartbeats,
    so a token of another agent is refused (``Forbidden``) rather than silently reported as this one."""
    check_id(agent_id, "agent id")
    result = client.heartbeat()
    if result["agent"]["agent_id"] != agent_id:
        raise Forbidden(f"the token belongs to agent {result['agent']['agent_id']}, not {agent_id}")
    return result


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, min(float(value), 30.0)) if value else 0.0
    except ValueError:
        return 0.0
