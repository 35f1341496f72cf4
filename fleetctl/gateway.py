"""The agent-facing operations, local or remote behind one interface (SPEC §6).

``task complete``, ``task status``, ``agent register`` and ``agent heartbeat`` work on the local
database or through a ``fleetctl serve`` (``--api-url`` / ``$FLEET_API_URL``). ``Gateway`` is what
those commands call; ``LocalGateway`` runs the services on the store, ``RemoteGateway`` calls the API
through ``fleetctl.remote.Client``. Both return the same shapes and raise the same ``FleetError`` for
the same case (tests/test_gateway_contract.py runs one suite against both):

- ``complete`` → the task view plus ``"repeated"`` and ``"pending"`` (true when Forgejo could not be asked:
  the receipt is stored and validated by a later pass; HTTP 202); ``LeaseLost`` (exit 4) when the attempt
  is no longer the caller's; ``ValidationFailed`` (exit 6) for a refused receipt (the attempt then failed).
- ``status`` → the task view; ``running`` and a message are one change or none.
- ``run_ended`` → the task view plus ``"settled"`` (this report settled the attempt: ``no_receipt``,
  ``agent_error``, or the pull request found on its branch) and ``"reason"`` when it did not
  (``attempt_over``, ``receipt_pending``, ``deferred``: see ``services.EndedRun``); ``LeaseLost`` when the open
  attempt is another agent's.
- ``register`` → ``{"agent": view, "token": str | None, "created": bool}``.
- ``heartbeat`` → ``{"agent": view, "stop": [{"task_id", "attempt", "reason"}], "cancelled": [task ids],
  "heartbeat_interval_secs": n}``.

Receipts come from a file or stdin through ``read_receipt``, which reads at most the API's body cap and
parses with the API's rules (``parse_json_object``: strict UTF-8, no lone surrogates, 64-bit integers,
no NaN), so a receipt is refused the same way whichever way it arrives.

This module is cheap to import: the store, the services and httpx are imported when first used.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol

from fleetctl.errors import UsageError
from fleetctl.jsondoc import parse_json_object

DEFAULT_MAX_RECEIPT_BYTES = 1048576
"""The receipt cap when no configuration is at hand (remote mode): the API's default ``server.max_body_bytes``."""


class Gateway(Protocol):
    """The agent-facing operations; see the module docstring for the shapes."""

    def complete(self, task_id: str, receipt: dict, *, attempt: int | None = None,
                 agent_id: str | None = None) -> dict: ...  # fmt: skip

    def status(self, task_id: str, status: str, message: str = "", *, attempt: int | None = None,
               agent_id: str | None = None, retry_after: float | None = None,
               usage: dict | None = None) -> dict: ...  # fmt: skip

    def run_ended(self, task_id: str, attempt: int, exit_code: int | None, detail: str = "", *,
                  agent_id: str | None = None, retry_after: float | None = None) -> dict: ...  # fmt: skip

    def register(self, agent_id: str, *, agent_type: str, capabilities: Iterable[str] = (),
                 max_concurrency: int = 1, mode: str = "http_pull") -> dict: ...  # fmt: skip

    def heartbeat(self, agent_id: str) -> dict: ...

    def close(self) -> None: ...


def check_status(status: str) -> None:
    if status not in ("running", "progress", "rate_limited"):
        raise UsageError("status must be running, progress or rate_limited", code="invalid_field")


class LocalGateway:
    """The operations on the local database (the configuration's ``db_path``), through the services."""

    def __init__(self, cfg: Any, store: Any = None) -> None:
        self.cfg = cfg
        self._store = store
        self._owned = store is None

    @property
    def store(self) -> Any:
        if self._store is None:
            from fleetctl.store import Store

            self._store = Store.open(self.cfg.orchestrator.db_path)
        return self._store

    def close(self) -> None:
        if self._owned and self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> LocalGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _agent_view(self, agent: dict) -> dict:
        from fleetctl import services

        return services.agent_views(self.store, [agent])[0]

    def complete(self, task_id: str, receipt: dict, *, attempt: int | None = None,
                 agent_id: str | None = None) -> dict:  # fmt: skip
        from fleetctl import services

        # Forgejo is asked before the write (never under the write lock), the same way the server does it
        _, verdict = services.prepare_receipt(self.store, self.cfg, task_id, receipt, attempt=attempt)
        result = services.hand_in_receipt(self.store, self.cfg, task_id, receipt, agent_id=agent_id, attempt=attempt,
                                          verdict=verdict).raise_if_rejected()  # fmt: skip
        return {**services.task_view(result.task), "repeated": result.repeated, "pending": result.pending}

    def status(self, task_id: str, status: str, message: str = "", *, attempt: int | None = None,
               agent_id: str | None = None, retry_after: float | None = None,
               usage: dict | None = None) -> dict:  # fmt: skip
        from fleetctl import services

        check_status(status)
        task = services.report_status(self.store, self.cfg.orchestrator, task_id, status, message, agent_id=agent_id,
                                      attempt=attempt, retry_after=retry_after, usage=usage,
                                      cfg=self.cfg)  # one transaction  # fmt: skip
        return services.task_view(task)

    def run_ended(self, task_id: str, attempt: int, exit_code: int | None, detail: str = "", *,
                  agent_id: str | None = None, retry_after: float | None = None) -> dict:  # fmt: skip
        from fleetctl import services
        from fleetctl.receipts import parse_retry_after

        services.check_ended_report(attempt, exit_code, detail)
        retry_after = parse_retry_after(retry_after)
        # Forgejo is asked before the write (never under the write lock), the same way the server does it
        ended = services.prepare_ended_run(self.store, self.cfg, task_id, attempt, exit_code, detail,
                                           agent_id=agent_id, retry_after=retry_after)  # fmt: skip
        return services.run_ended_view(self.store, ended, services.settle_prepared_run(self.store, self.cfg, ended))

    def register(self, agent_id: str, *, agent_type: str, capabilities: Iterable[str] = (),
                 max_concurrency: int = 1, mode: str = "http_pull") -> dict:  # fmt: skip
        from fleetctl import services

        reg = services.register_agent(self.store, agent_id, agent_type=agent_type, capabilities=list(capabilities),
                                      max_concurrency=max_concurrency, mode=mode,
                                      allow_mode_change=True,  # the operator may convert an agent
                                      reserved=services.config_agent_ids(self.cfg))  # fmt: skip
        return {"agent": self._agent_view(reg.agent), "token": reg.token, "created": reg.created}

    def heartbeat(self, agent_id: str) -> dict:
        from fleetctl import services

        result = services.heartbeat(self.store, self.cfg.orchestrator, agent_id)
        return {**result, "agent": self._agent_view(result["agent"]),
                "heartbeat_interval_secs": self.cfg.orchestrator.heartbeat_interval_secs}  # fmt: skip


class RemoteGateway:
    """The operations through a ``fleetctl serve``; the acting agent is the token's."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, token: str | None, role: str) -> RemoteGateway:
        """A gateway to ``url`` with ``--token``, else the token variables of ``role`` (see ``TOKEN_ROLES``)."""
        from fleetctl import remote

        names = {"task": remote.TASK_TOKEN_ENV, "agent": remote.AGENT_TOKEN_ENV,
                 "registration": remote.REGISTRATION_TOKEN_ENV}[role]  # fmt: skip
        return cls(remote.connect(url, token, names))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, task_id: str, receipt: dict, *, attempt: int | None = None,
                 agent_id: str | None = None) -> dict:  # fmt: skip
        return self.client.complete(task_id, receipt, attempt=attempt)

    def status(self, task_id: str, status: str, message: str = "", *, attempt: int | None = None,
               agent_id: str | None = None, retry_after: float | None = None,
               usage: dict | None = None) -> dict:  # fmt: skip
        check_status(status)
        return self.client.status(task_id, attempt=attempt, status=status, message=message, retry_after=retry_after,
                                  usage=usage)  # fmt: skip

    def run_ended(self, task_id: str, attempt: int, exit_code: int | None, detail: str = "", *,
                  agent_id: str | None = None, retry_after: float | None = None) -> dict:  # fmt: skip
        return self.client.run_ended(task_id, attempt=attempt, exit_code=exit_code, detail=detail,
                                     retry_after=retry_after)  # fmt: skip

    def register(self, agent_id: str, *, agent_type: str, capabilities: Iterable[str] = (),
                 max_concurrency: int = 1, mode: str = "http_pull") -> dict:  # fmt: skip
        doc, created = self.client.register(agent_id, agent_type=agent_type, capabilities=list(capabilities),
                                            max_concurrency=max_concurrency, mode=mode)  # fmt: skip
        return {"agent": {k: v for k, v in doc.items() if k != "token"}, "token": doc.get("token"), "created": created}

    def heartbeat(self, agent_id: str) -> dict:
        from fleetctl import remote

        return remote.heartbeat_as(self.client, agent_id)


TOKEN_ROLES = ("task", "agent", "registration")
"""Which token a remote call needs: ``task`` (complete, status: $FLEET_TASK_TOKEN, $FLEET_AGENT_TOKEN,
$FLEET_API_TOKEN), ``agent`` (heartbeat), ``registration`` (register); see ``fleetctl.remote``."""


def open_gateway(api_url: str | None, token: str | None, role: str, load_config: Callable[[], Any]) -> Gateway:
    """``RemoteGateway`` when an API URL is given (``--api-url`` or ``$FLEET_API_URL``), else ``LocalGateway``.

    Local mode never imports ``fleetctl.remote`` or httpx (start-up cost of ``task complete``).
    """
    url = api_url or os.environ.get("FLEET_API_URL") or None
    if url:
        return RemoteGateway.connect(url, token, role)
    return LocalGateway(load_config())


# ------------------------------------------------------------------------------------------ receipts


def read_capped(source: str, cap: int, stdin: IO[bytes] | None = None, what: str = "receipt",
                cap_key: str = "the API's body cap, server.max_body_bytes") -> bytes:  # fmt: skip
    """The bytes of file ``source`` (``-``: stdin), refused with ``UsageError`` past ``cap`` bytes.

    Reads at most ``cap + 1`` bytes, so ``/dev/zero``, a FIFO or a huge file never fill memory.
    """
    too_big = f"{what} {source} is larger than {cap} bytes ({cap_key})"
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read(cap + 1)
        if len(data) > cap:
            raise UsageError(too_big)
        return data
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {source}: {exc.strerror}") from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_size > cap):
        os.close(fd)
        raise UsageError(f"cannot read {what} {source}: it is a directory" if stat.S_ISDIR(info.st_mode) else too_big)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(cap + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {what} {source}: {exc.strerror}") from None
    if len(data) > cap:
        raise UsageError(too_big)
    return data


def read_receipt(source: str, cap: int = DEFAULT_MAX_RECEIPT_BYTES, stdin: IO[bytes] | None = None) -> dict:
    """A receipt document from file ``source`` or ``-`` (stdin): capped, strict UTF-8, one JSON object."""
    return parse_json_object(read_capped(source, cap, stdin), f"receipt {source}")
