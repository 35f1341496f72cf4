"""The outbox pass: derive side effects from the event log, then perform the due ones (SPEC §1, §7.3).

Side effects are **derived from the event log by a cursor** (``meta`` key ``outbox_cursor``): ``flush``
reads the events after the cursor, turns each into zero or more rows with the pure
``fleetctl.effects.effects_for``, and inserts the rows and moves the cursor in ONE write transaction
(``Store.enqueue_effects``; rows are unique on event, target and kind, so a crash between reading and
inserting re-derives the same rows harmlessly). Why a cursor rather than enqueuing beside each event:

- no writer (claims, ``emit``, webhooks, other processes) can forget to enqueue — every event is seen;
- the hot claim path pays nothing for side effects;
- rows still come only from committed events (a rolled-back write leaves nothing to announce).

Then the due rows are performed, oldest first, with one ``ForgejoClient`` per flush:

- a comment is posted unless the issue already has one ending with the event's marker (a flush killed
  between the POST and recording it must not post twice);
- a status label row is ``superseded`` when a newer one exists for the issue, else the issue is made to
  carry exactly that ``fleet/…`` status label (created in the repository when missing);
- a failure is retried with backoff (30 s doubling, at most 1 h, jitter; ``dead`` after ``MAX_TRIES``); an
  issue that is gone (404) is ``dead`` at once; Forgejo unreachable stops the flush (the rest wait).

A Forgejo failure never raises out of ``flush`` and never touches a task. Each outbox write is one
statement (its own transaction): no write transaction is ever held across a network call.

Matrix rows (``effects.matrix_effects``: the configured kinds, with their text decided here at derivation)
are sent after Forgejo's by ``fleetctl.matrix.outbox.send_due``: in order, batched, with stable transaction
ids (its docstring says how).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fleetctl import effects
from fleetctl.errors import ConfigError, RemoteError
from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.config import Config, ForgejoConfig
    from fleetctl.forgejo.client import ForgejoClient
    from fleetctl.store import Store

DERIVE_BATCH = 500
"""Events read per derivation step (one write transaction each)."""
MAX_TRIES = 20
"""A row that failed this many times is ``dead`` (kept, with its last error, for ``outbox list``)."""
BACKOFF_SECS = 30.0
BACKOFF_MAX_SECS = 3600.0
STATES = ("pending", "done", "superseded", "dead")


@dataclass
class FlushReport:
    """What one flush did."""

    skipped: str | None = None
    enqueued: int = 0
    sent: int = 0
    superseded: int = 0
    retried: int = 0
    dead: int = 0
    deferred: int = 0  # due rows left for the next flush (Forgejo unreachable or not configured)
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def flush(store: Store, cfg: Config, *, client: ForgejoClient | None = None, now: Callable[[], float] = time.time,
          limit: int = 100) -> FlushReport:  # fmt: skip
    """Derive new outbox rows from the events after the cursor, then perform up to ``limit`` due rows of
    Forgejo and then of Matrix.

    Two flushes never run at once (a non-blocking pass lock; the second skips). ``client`` is used
    instead of one made from ``cfg.forgejo`` (it is then not closed here).
    """
    from fleetctl.passes import pass_lock  # passes imports this module lazily: no import cycle

    report = FlushReport()
    with pass_lock(store.path, "outbox") as locked:
        if not locked:
            report.skipped = "another outbox flush is running"
            return report
        report.enqueued = derive(store, cfg)
        _perform_due(store, cfg.forgejo, report, client, now, limit)
        if cfg.matrix.enabled:
            from fleetctl.matrix.outbox import send_due

            send_due(store, cfg.matrix, report, now=now, limit=limit)
    return report


def derive(store: Store, cfg: Config, batch: int = DERIVE_BATCH) -> int:
    """Turn the events after the cursor into outbox rows and move the cursor; how many rows were new.

    Runs even without Forgejo or Matrix configured (then no rows): the cursor keeps up, so configuring
    them later does not announce the whole history.
    """
    new = 0
    while True:
        events = store.events(after_id=store.outbox_cursor(), limit=batch)
        if not events:
            return new
        tasks = {tid: store.task(tid) for tid in {e["task_id"] for e in events if e["task_id"]}}
        rows = []
        for e in events:
            task = tasks.get(e["task_id"])
            rows += effects.effects_for(e, task, cfg.forgejo)
            rows += effects.matrix_effects(e, task, cfg.matrix, cfg.forgejo.url)
        new += store.enqueue_effects(rows, events[-1]["id"])
        if len(events) < batch:
            return new


def _perform_due(store: Store, forgejo: ForgejoConfig, report: FlushReport, client: ForgejoClient | None,
                 now: Callable[[], float], limit: int) -> None:  # fmt: skip
    """Perform the due rows oldest first; the client is made only when a row is due (and closed after)."""
    rows = store.outbox_due(now(), limit, target=effects.TARGET)
    if not rows:
        return
    if client is None and not forgejo.api_ready:
        report.deferred = len(rows)  # no Forgejo (or no token in this process): keep them for a pass that has one
        return
    own = client is None
    try:
        client = client or _client(forgejo)
    except (RemoteError, ConfigError) as exc:  # a bad URL: the configuration's problem, not the rows'
        report.error, report.deferred = exc.message, len(rows)
        log("outbox.error", error=exc.message)
        return
    try:
        for i, row in enumerate(rows):
            if not _perform_row(store, client, row, report, now):
                report.deferred += len(rows) - i - 1
                break
        if report.sent:  # Forgejo answers: now is the time to ask who fleetctl is, once
            _learn_login(store, forgejo, client)
    finally:
        if own:
            client.close()


def _learn_login(store: Store, forgejo: ForgejoConfig, client: ForgejoClient) -> None:
    """Learn fleetctl's own login (``GET /user``, once: remembered in the store), so that the webhook route
    recognises as its own the label changes Forgejo echoes back from this write-back."""
    from fleetctl.services.issues import LOGIN_KEY, remember_login

    if forgejo.bot_login or store.meta(LOGIN_KEY):
        return
    try:
        remember_login(store, client.whoami().get("login"))
    except RemoteError as exc:
        log("forgejo.whoami_failed", error=exc.message)


def _client(forgejo: ForgejoConfig) -> ForgejoClient:
    from fleetctl.forgejo.client import client_for

    # few and short in-client retries: the outbox has its own backoff, and a pass must stay short
    return client_for(forgejo, retries=1, backoff=0.5, max_backoff=5.0)


def _perform_row(store: Store, client: ForgejoClient, row: dict, report: FlushReport,
                 now: Callable[[], float]) -> bool:  # fmt: skip
    """Perform one row and record the outcome; False when Forgejo is unreachable (stop this flush)."""
    where = f"{row['repo']}#{row['issue_number']}"
    fields = {"id": row["id"], "kind": row["kind"], "issue": where, "task": row["task_id"], "event": row["event_id"]}
    try:
        outcome = _perform(store, client, row)
    except (RemoteError, ValueError, TypeError, KeyError) as exc:
        return _failed(store, row, exc, report, now, fields)
    store.finish_outbox_row(row["id"], outcome, now())
    if outcome == "superseded":
        report.superseded += 1
    else:
        report.sent += 1
    log(f"outbox.{'superseded' if outcome == 'superseded' else 'sent'}", **fields)
    return True


def _failed(store: Store, row: dict, exc: Exception, report: FlushReport, now: Callable[[], float],
            fields: dict[str, Any]) -> bool:  # fmt: skip
    """Record a failed try: dead (issue gone, or out of tries) or retried later. False if Forgejo is down."""
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    status = getattr(exc, "status", None)
    tries = row["tries"] + 1
    if status == 404 or tries >= MAX_TRIES:
        why = f"the issue is gone or not visible: {message}" if status == 404 else message
        store.finish_outbox_row(row["id"], "dead", now(), error=why)
        report.dead += 1
        log("outbox.dead", tries=tries, error=why, **fields)
    else:
        next_try = now() + next_delay(row["tries"])
        store.retry_outbox_row(row["id"], next_try, message)
        report.retried += 1
        log("outbox.retry", tries=tries, next_try_in=f"{next_try - now():.0f}s", error=message, **fields)
    # no status and worth retrying: the network failed (refused, timed out) — the next row would only wait again
    return not (status is None and getattr(exc, "retryable", False))


def next_delay(tries: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next try after ``tries`` earlier failures: 30 s doubling, at most 1 h, equal jitter."""
    delay = min(BACKOFF_MAX_SECS, BACKOFF_SECS * 2 ** min(tries, 20))
    return delay / 2 + rng() * delay / 2


def _perform(store: Store, client: ForgejoClient, row: dict) -> str:
    """Do what the row says on Forgejo; its new state (``done`` or ``superseded``). Raises on failure."""
    if row["kind"] == effects.COMMENT:
        _comment(client, row)
        return "done"
    if row["kind"] == effects.STATUS_LABEL:
        if store.newer_outbox_row(row):
            return "superseded"  # a later status of the same issue will be set: skip the intermediate one
        _status_label(client, row["repo"], row["issue_number"], row["payload"].get("label"))
        return "done"
    if row["kind"] == effects.FLAG_LABEL:
        if store.newer_outbox_row(row):
            return "superseded"  # the flag is set or cleared again later: only the last word counts
        _flag_label(client, row["repo"], row["issue_number"], row["payload"]["label"], bool(row["payload"]["on"]))
        return "done"
    raise ValueError(f"unknown outbox row kind {row['kind']!r}")


def _flag_label(client: ForgejoClient, repo: str, number: int, name: str, on: bool) -> None:
    """Put ``name`` (``fleet/needs-human``) on the issue, or take it off; created in the repository if missing."""
    from fleetctl.forgejo.client import ForgejoError

    issue = client.get_issue(repo, number)
    if issue is None:
        raise ForgejoError(f"issue {repo}#{number} not found on Forgejo (404)", status=404)
    have = {label["name"]: label["id"] for label in issue.get("labels") or []}
    if on and name not in have:
        client.add_labels(repo, number, [_repo_label_id(client, repo, name)])
    elif not on and name in have:
        client.remove_label(repo, number, have[name])


def _comment(client: ForgejoClient, row: dict) -> None:
    """Post the row's comment unless an earlier try already did (its marker is on the issue)."""
    mark = effects.marker(row["event_id"])
    for existing in client.list_comments(row["repo"], row["issue_number"]):
        if str(existing.get("body") or "").rstrip().endswith(mark):
            return
    client.create_comment(row["repo"], row["issue_number"], row["payload"]["body"])


def _status_label(client: ForgejoClient, repo: str, number: int, want: str | None) -> None:
    """Make the issue carry exactly ``want`` of fleetctl's status labels (none when ``want`` is None)."""
    from fleetctl.forgejo.client import ForgejoError

    issue = client.get_issue(repo, number)
    if issue is None:
        raise ForgejoError(f"issue {repo}#{number} not found on Forgejo (404)", status=404)
    have = {label["name"]: label["id"] for label in issue.get("labels") or []}
    if want is not None and want not in have:
        client.add_labels(repo, number, [_repo_label_id(client, repo, want)])
    for name, label_id in have.items():
        if name in effects.STATUS_LABELS and name != want:
            client.remove_label(repo, number, label_id)


def _repo_label_id(client: ForgejoClient, repo: str, name: str) -> int:
    """The id of the repository label ``name``, created (with its colour) when the repository has none."""
    for label in client.list_labels(repo):
        if label.get("name") == name:
            return int(label["id"])
    color, description = effects.STATUS_LABELS.get(name) or (
        effects.NEEDS_HUMAN_COLOR if name == effects.NEEDS_HUMAN_LABEL else ("#ededed", "")
    )
    return int(client.create_label(repo, name, color, description)["id"])


def list_rows(store: Store, *, states: tuple[str, ...] | list[str] = (), limit: int = 100) -> dict:
    """``{"items": [...], "counts": {state: n}}``: outbox rows newest first (for ``fleetctl outbox list``)."""
    from fleetctl.errors import UsageError

    bad = [s for s in states if s not in STATES]
    if bad:
        raise UsageError(f"unknown outbox state {bad[0]!r}: use one of {', '.join(STATES)}", code="invalid_state")
    counts = {state: 0 for state in STATES}
    counts.update(store.count_outbox())
    return {"items": store.outbox_rows(states=list(states), limit=limit), "counts": counts}
