"""Sending the outbox's Matrix rows to the room (SPEC §9); ``fleetctl.outbox.flush`` calls ``send_due``.

- **In order.** The Matrix rows go out strictly oldest first: while the oldest pending row waits for its
  retry, the rows behind it wait too, so what is said of one task arrives in the order it happened.
- **Batched.** The head of the line is sent as one message of up to ``MAX_BATCH`` rows (one line each): a
  burst of 200 completions is 10 messages, well inside a homeserver's rate limit, not 200 sends and a storm
  of 429s. A batch is fixed in the store (``outbox.batch``) *before* its first send and never changes.
- **Never twice.** The transaction id is ``fleetctl.<this database's prefix>.<batch>``: a flush killed
  after the send and before recording it re-sends the same batch with the same id, and the homeserver
  keeps the first (it deduplicates per access token and device: keep one token per sender).
- **Rate limits.** A 429 that asks for at most ``INLINE_WAIT_SECS`` is waited out in the flush (within
  ``BUDGET_SECS``); a longer one puts the batch back for exactly that long.
- **Failures.** A refused token (401), a room the bot is not in (403) or an unknown room (404), and an
  unreachable homeserver, are recorded on the batch's rows (``fleetctl outbox list`` shows them) and
  retried with the outbox's backoff; after ``MAX_TRIES`` the rows are ``dead``. A message refused as such
  (413, ``M_TOO_LARGE``, ``M_BAD_JSON``: it would never go through) is ``dead`` at once, so it does not hold
  up the line. Nothing here ever touches a task, and no write transaction is held across a request.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleetctl.effects import MATRIX
from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.config import MatrixConfig
    from fleetctl.matrix.client import MatrixClient, MatrixError
    from fleetctl.outbox import FlushReport
    from fleetctl.store import Store

MAX_BATCH = 20
"""Rows sent as one message, at most."""
MAX_BATCH_CHARS = 24_000
"""And at most about this much text (body and HTML) in one message: a Matrix event may not exceed 64 KiB."""
INLINE_WAIT_SECS = 10.0
"""A 429 asking to wait at most this long is waited out within the flush."""
BUDGET_SECS = 30.0
"""One flush spends at most about this long sending to Matrix (then the rest waits for the next pass)."""
TXN_PREFIX_KEY = "matrix_txn_prefix"
"""``meta`` key: this database's part of every transaction id (two fleets sharing a bot never collide)."""
_REFUSED_AS_SUCH = frozenset({"M_TOO_LARGE", "M_BAD_JSON", "M_NOT_JSON"})
"""Errors about the message itself: sending it again would never go better."""
ROOM_KEY = "matrix_room:"
"""``meta`` key prefix: an alias of ``[matrix] room_id``, resolved once, and the room id it names."""


def send_due(store: Store, matrix: MatrixConfig, report: FlushReport, *, now: Callable[[], float] = time.time,
             limit: int = 100, client: MatrixClient | None = None,
             sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
    """Send the Matrix rows at the head of the line, a batch at a time, until none is due, ``limit`` rows
    were handled, the time budget is spent or a send fails (its batch is put back for later)."""
    head = store.outbox_pending(MATRIX, MAX_BATCH)
    if not head:
        return
    if not matrix.ready or head[0]["next_try_at"] > now():
        report.deferred += store.count_outbox_pending(MATRIX)  # no token in this process, or the head waits
        return
    from fleetctl.matrix.client import client_for

    own = client is None
    client = client or client_for(matrix)
    deadline = time.monotonic() + BUDGET_SECS
    handled, retried_before = 0, report.retried
    try:
        while head and head[0]["next_try_at"] <= now() and handled < limit and time.monotonic() < deadline:
            rows = _batch(store, head)
            handled += len(rows)
            if not _send(store, client, matrix, rows, report, now, sleep, deadline):
                break
            head = store.outbox_pending(MATRIX, MAX_BATCH)
        # what waits for a later flush (the batch just put back is counted as retried, not here)
        report.deferred += store.count_outbox_pending(MATRIX) - (report.retried - retried_before)
    finally:
        if own:
            client.close()


def _batch(store: Store, head: list[dict]) -> list[dict]:
    """The batch at the head of the line: the one already made (a retry), or a new one of the first rows."""
    if head[0]["batch"] is not None:
        return store.batch_outbox_rows((), head[0]["batch"])
    fresh, size = [], 0
    for row in head:
        size += len(row["payload"].get("body", "")) + len(row["payload"].get("html", ""))
        if row["batch"] is not None or (fresh and size > MAX_BATCH_CHARS):
            break
        fresh.append(row["id"])
    return store.batch_outbox_rows(fresh, head[0]["id"])


def _send(store: Store, client: MatrixClient, matrix: MatrixConfig, rows: list[dict], report: FlushReport,
          now: Callable[[], float], sleep: Callable[[float], None], deadline: float) -> bool:  # fmt: skip
    """Send one batch, waiting out short 429s; record the outcome. False when it must be tried again (the
    rows behind it wait: stop this flush)."""
    from fleetctl.matrix.client import MatrixError
    from fleetctl.matrix.messages import batch_message

    ids = [r["id"] for r in rows]
    body, html = batch_message([(r["payload"]["body"], r["payload"]["html"]) for r in rows])
    txn = f"fleetctl.{_txn_prefix(store)}.{rows[0]['batch']}"
    while True:
        try:
            room = room_id(store, client, matrix)
            event_id = client.send_message(room, txn, body, html)
        except MatrixError as exc:
            wait = exc.retry_after if exc.status == 429 else None
            if wait is not None and wait <= INLINE_WAIT_SECS and time.monotonic() + wait < deadline:
                log("matrix.rate_limited", rows=len(ids), wait=f"{wait:.1f}s")
                sleep(max(wait, 0.2))  # never a tight loop, whatever the homeserver says
                continue
            return _failed(store, rows, exc, report, now)
        store.finish_outbox_row(ids, "done", now())
        report.sent += len(ids)
        log("matrix.sent", rows=len(ids), first=ids[0], event=event_id)
        return True


def _failed(store: Store, rows: list[dict], exc: MatrixError, report: FlushReport, now: Callable[[], float]) -> bool:
    """Put a batch back for later (the wait a 429 asked for, else the outbox's backoff), or dead at the end.
    True when the rows behind it may go on (it is dead), False when they wait behind it."""
    from fleetctl.outbox import MAX_TRIES, next_delay

    ids = [r["id"] for r in rows]
    tries = rows[0]["tries"] + 1
    message = f"matrix: {exc.message}"
    if tries >= MAX_TRIES or exc.status == 413 or exc.errcode in _REFUSED_AS_SUCH:
        store.finish_outbox_row(ids, "dead", now(), error=message)
        report.dead += len(ids)
        log("matrix.dead", rows=len(ids), first=ids[0], tries=tries, error=exc.message)
        return True
    delay = exc.retry_after if exc.status == 429 and exc.retry_after else next_delay(rows[0]["tries"])
    store.retry_outbox_row(ids, now() + delay, message)
    report.retried += len(ids)
    log("matrix.retry", rows=len(ids), first=ids[0], tries=tries, next_try_in=f"{delay:.0f}s", error=exc.message)
    return False


def room_id(store: Store, client: MatrixClient, matrix: MatrixConfig) -> str:
    """``[matrix] room_id`` as a room id: an alias is resolved once and remembered in the store."""
    room = matrix.room_id or ""
    if not room.startswith("#"):
        return room
    known = store.meta(ROOM_KEY + room)
    if known:
        return known
    resolved = client.resolve_room(room)
    store.set_meta(ROOM_KEY + room, resolved)
    log("matrix.room_resolved", alias=room, room=resolved)
    return resolved


def _txn_prefix(store: Store) -> str:
    prefix = store.meta(TXN_PREFIX_KEY)
    if not prefix:  # flushes never run at once (the outbox pass lock): no race to make two
        prefix = secrets.token_hex(6)
        store.set_meta(TXN_PREFIX_KEY, prefix)
    return prefix
