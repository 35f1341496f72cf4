"""What every service module shares: the clock, input checks, lookups that raise ``NotFound``, tokens."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from fleetctl.errors import NotFound, UsageError
from fleetctl.ids import check_id
from fleetctl.store import Store

MAX_TITLE = 1000
MAX_BODY = 256 * 1024
MAX_LABELS = 100
MAX_LABEL = 200
MAX_MESSAGE = 4096


def now_or(now: float | None) -> float:
    """``now`` if given (tests, replays), else the wall clock."""
    return time.time() if now is None else now


def check_text(value: Any, what: str, limit: int, *, required: bool = False) -> str:
    """A string of at most ``limit`` characters without NUL (``UsageError`` otherwise)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string", code="invalid_field")
    if "\0" in value:
        raise UsageError(f"{what} must not contain NUL characters", code="invalid_field")
    if required and not value.strip():
        raise UsageError(f"{what} must not be empty", code="invalid_field")
    if len(value) > limit:
        raise UsageError(f"{what} is longer than {limit} characters", code="invalid_field")
    return value


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive integer", code="invalid_field")
    return value


def check_caps(capabilities: Iterable[Any]) -> list[str]:
    """Capabilities: non-empty strings without whitespace or control characters, sorted, unique."""
    caps = []
    for c in capabilities:
        if not isinstance(c, str) or not c or len(c) > MAX_LABEL or any(ch in c for ch in "\0\n\r\t "):
            raise UsageError(f"invalid capability {c!r}", code="invalid_capability")
        if c not in caps:
            caps.append(c)
    return sorted(caps)


def get_task(store: Store, task_id: str) -> dict:
    """The task, or ``NotFound``."""
    check_id(task_id, "task id")
    task = store.task(task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}", code="task_not_found")
    return task


def get_agent(store: Store, agent_id: str) -> dict:
    """The agent, or ``NotFound``."""
    check_id(agent_id, "agent id")
    agent = store.agent(agent_id)
    if agent is None:
        raise NotFound(f"no agent {agent_id!r}", code="agent_not_found")
    return agent


def hash_token(token: str) -> str:
    """The stored form of a bearer token (tokens themselves are never stored)."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    import hmac

    return bool(token_hash) and hmac.compare_digest(hash_token(token), token_hash)


def new_token(nbytes: int = 24) -> tuple[str, str]:
    """A fresh bearer token and its stored hash."""
    import secrets

    token = secrets.token_urlsafe(nbytes)
    return token, hash_token(token)


@contextmanager
def forgejo_api(cfg: Any, client: Any = None) -> Iterator[Any]:
    """``client`` if given; else a Forgejo client for ``cfg.forgejo``, closed afterwards; None when this process
    has no API token (the passes that need Forgejo then leave their work for one that has)."""
    if client is not None or not cfg.forgejo.api_ready:
        yield client
        return
    from fleetctl.forgejo.client import client_for

    own = client_for(cfg.forgejo)
    try:
        yield own
    finally:
        own.close()
