"""The Forgejo side of tasks: deliveries in, the mapping of SPEC §7.2 applied — one service for every path.

The webhook route of ``fleetctl serve``, ``fleetctl ingest-webhook`` and ``fleetctl sync`` all end in
``apply_change``: the pure ``forgejo.mapping`` decides, this module carries the decision out with the task
services (create, update, cancel, re-queue, link, complete, fail), in the caller's write transaction.

A delivery is taken in two steps so that the server does the slow, lock-free part (HMAC, JSON) in its
request thread and only the short write in its writer: ``prepare`` (verify the signature over the raw
bytes, then parse) and ``record`` (dedupe on the delivery id and on the change's semantic key, apply, and
record the delivery with its verdict — all in one transaction). ``ingest`` is both, for the CLI.
Verdicts: ``accepted`` (applied, or already true), ``ignored`` (an event or change fleetctl does not act
on, or a re-sent copy of a change), ``rejected`` (signed but unreadable, or refused by the state machine).
A delivery whose signature fails is never recorded: unauthenticated input writes nothing.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetctl.config import Config
from fleetctl.errors import FleetError
from fleetctl.forgejo import mapping
from fleetctl.forgejo.webhooks import BadPayload, Change, Delivery, read_delivery, read_headers, verify
from fleetctl.log import log
from fleetctl.services._common import now_or
from fleetctl.services.runs import fail_attempt
from fleetctl.services.tasks import cancel_task, create_task, retry_task, transition
from fleetctl.states import LEASED, TERMINAL, FailureReason, Transition
from fleetctl.store import Store

LOGIN_KEY = "forgejo_login"
"""``meta`` key of the Forgejo account fleetctl acts as (``GET /user``), remembered by the passes."""


@dataclass(frozen=True)
class Applied:
    """What ``apply_change`` did: ``accepted`` (something changed, or it was already so) or ``ignored``."""

    verdict: str
    detail: str
    task_id: str | None = None
    changed: bool = False


def bot_login(store: Store, cfg: Config) -> str | None:
    """fleetctl's own Forgejo login: ``forgejo.bot_login``, else the one remembered from ``GET /user``."""
    return cfg.forgejo.bot_login or store.meta(LOGIN_KEY)


def remember_login(store: Store, login: str | None) -> None:
    """Keep the login ``GET /user`` gave (the passes ask it when they talk to Forgejo anyway)."""
    if login and login != store.meta(LOGIN_KEY):
        store.set_meta(LOGIN_KEY, login)


def apply_change(store: Store, cfg: Config, change: Change, *, now: float | None = None) -> Applied:
    """Carry out what SPEC §7.2 says about ``change``, inside one write (the caller's, if it has one)."""
    ts = now_or(now)
    if change.ignored:
        return Applied("ignored", change.ignored)
    with store.write():
        if change.comment is not None:
            from fleetctl.services.commands import record

            verdict, detail = record(store, cfg, change, bot_login(store, cfg), ts)
            return Applied(verdict, detail, None, verdict == "accepted")
        if change.issue is not None:
            return _apply_issue(store, cfg, change, ts)
        return _apply_pull(store, cfg, change, ts)


def _apply_issue(store: Store, cfg: Config, change: Change, ts: float) -> Applied:
    repo, number = change.repo, change.issue.number
    last = store.last_task_for_issue(repo, number)
    if last is None or last["state"] not in TERMINAL:
        active = last  # the newest task is the active one (one at most per issue), or there is none
    else:  # an older task re-queued by an operator after a newer one ended
        active_id = store.active_task_for_issue(repo, number)
        active = store.task(active_id) if active_id else None
    last = active or last
    if last is not None and last["state"] == "cancelled":
        last = {**last, "cancel_reason": store.cancel_reason(last["task_id"])}
    op = mapping.issue_op(change, active, last, prefix=cfg.orchestrator.requirement_prefix,
                          bot=bot_login(store, cfg))  # fmt: skip
    return _execute(store, cfg, change, op, ts)


def _apply_pull(store: Store, cfg: Config, change: Change, ts: float) -> Applied:
    tasks = tasks_of_pull(store, change.repo, change.pull)
    if not tasks:
        return Applied("ignored", f"pull request #{change.pull.number} references no task")
    results = [_execute(store, cfg, change, mapping.pull_op(change, task), ts) for task in tasks]
    done = [r for r in results if r.changed] or results
    return Applied("accepted", "; ".join(r.detail for r in done), done[0].task_id, any(r.changed for r in results))


def tasks_of_pull(store: Store, repo: str, pull: Any) -> list[dict]:
    """The tasks a pull request references: its branch ``fleet/<task-id>``, the task it is linked to, and the
    active tasks of the issues it closes — each once."""
    found: dict[str, dict] = {}
    tid = None if pull.from_fork(repo) else mapping.branch_task_id(pull.head_branch)
    if tid:
        task = store.task(tid)
        if task is not None and (task["repo"] or "").lower() == repo.lower():
            found[tid] = task
    for task in store.tasks_with_pull_request(repo, pull.number):
        found.setdefault(task["task_id"], task)
    for n in mapping.closing_refs(pull):
        active = store.active_task_for_issue(repo, n)
        if active and active not in found:
            found[active] = store.task(active)
    return list(found.values())


def _execute(store: Store, cfg: Config, change: Change, op: mapping.Op, ts: float) -> Applied:
    orch = cfg.orchestrator
    kind, tid = op.kind, op.task_id
    if kind == "none":  # already so (a task is concerned), or nothing to do with this change at all
        return Applied("accepted" if tid else "ignored", op.why, tid)
    if kind == "create":
        fields = op.fields
        task = create_task(store, orch, title=fields["title"], body=fields["body"], labels=fields["labels"],
                           repo=change.repo, issue_number=change.issue.number, strict=False, now=ts)  # fmt: skip
        return Applied("accepted", f"{op.why}: created task {task['task_id']}", task["task_id"], True)
    if kind == "update":
        _update(store, tid, op.fields, ts)
    elif kind == "cancel":
        if op.fields:
            _update(store, tid, op.fields, ts)
        cancel_task(store, tid, op.why, now=ts)
    elif kind == "requeue":
        _update(store, tid, op.fields, ts)
        retry_task(store, orch, tid, now=ts)
    elif kind == "link_pr":
        store.emit("task.pr_linked", ts=ts, task_id=tid, data={**op.fields, "why": op.why})
    elif kind == "complete":
        transition(store, store.task(tid), Transition.COMPLETED, ts, data={**op.fields, "why": op.why})
    elif kind == "fail_pr_closed":
        fail_attempt(store, orch, tid, FailureReason.PR_CLOSED, op.why, now=ts, states=LEASED)
    elif kind == "review_rejected":
        from fleetctl.services.reviews import changes_requested

        done = changes_requested(store, cfg, tid, op.fields["review"], ts)
        return Applied("accepted", f"{op.why}: {done}", tid, not done.startswith("nothing"))
    elif kind == "clear_needs_human":
        store.emit("task.needs_human_cleared", ts=ts, task_id=tid, data={"why": op.why})
    else:  # pragma: no cover - mapping and this list are kept together
        raise ValueError(f"unknown operation {kind}")
    return Applied("accepted", f"{op.why}: task {tid} {_DONE[kind]}", tid, True)


_DONE = {"update": "updated", "cancel": "cancelled", "requeue": "re-queued", "link_pr": "linked",
         "complete": "completed", "fail_pr_closed": "failed (pr_closed)",
         "clear_needs_human": "no longer needs a person"}  # fmt: skip


def _update(store: Store, task_id: str, fields: dict, ts: float) -> None:
    """``task.updated`` with the fields an issue changed (only those a task keeps)."""
    data = {k: v for k, v in fields.items() if k in ("title", "body", "labels", "requirements", "priority",
                                                       "timeout_secs", "max_review_rounds")}  # fmt: skip
    task = store.task(task_id)
    data = {k: v for k, v in data.items() if task.get(k) != v}
    if data:
        store.emit("task.updated", ts=ts, task_id=task_id, data=data)


# ---------------------------------------------------------------------------------------------- deliveries


@dataclass(frozen=True)
class Prepared:
    """A delivery whose signature was verified: its identity, and its change or why it cannot be read."""

    delivery_id: str
    event: str
    event_type: str
    body: bytes
    delivery: Delivery | None = None
    error: BadPayload | None = None

    @functools.cached_property
    def packed(self) -> bytes:
        """The body as it is kept (zlib): compressed by ``prepare``, in the request's thread, not the writer's."""
        return zlib.compress(self.body, 1)


@dataclass(frozen=True)
class IngestResult:
    """The answer to a delivery: HTTP status, verdict, what was done."""

    status: int
    delivery_id: str
    verdict: str  # accepted | ignored | rejected | duplicate | queued
    detail: str
    task_id: str | None = None
    error_code: str | None = None

    def to_json(self) -> dict:
        body = {"delivery_id": self.delivery_id, "verdict": self.verdict, "detail": self.detail,
                "task_id": self.task_id}  # fmt: skip
        if self.error_code:
            return {"error": {"code": self.error_code, "message": self.detail, "details": body}}
        return body


def prepare(cfg: Config, headers: Any, body: bytes, *, verified: bool = False) -> Prepared:
    """Verify the signature over the raw bytes (``BadSignature``), then read the headers (``BadPayload`` when
    there is no usable delivery id: nothing can be recorded then) and the body (an unreadable body is kept as
    ``error``, to be recorded as rejected). ``verified``: the bytes were verified before (the spool)."""
    if not verified:
        verify(cfg.forgejo.webhook_secret or "", body, headers)
    delivery_id, event, event_type = read_headers(headers)
    try:
        prepared = Prepared(delivery_id, event, event_type, body, delivery=read_delivery(headers, body))
    except BadPayload as exc:
        return Prepared(delivery_id, event, event_type, body, error=exc)
    prepared.packed  # noqa: B018 - computed here, outside the single writer
    return prepared


def record(store: Store, cfg: Config, prepared: Prepared, *, source: str, now: float | None = None) -> IngestResult:
    """Dedupe, apply and record one prepared delivery, in one write transaction."""
    ts = now_or(now)
    did = prepared.delivery_id
    with store.write():
        prior = store.delivery(did)
        if prior is not None:
            return IngestResult(200, did, "duplicate", f"delivery {did} was already received "
                                f"({prior['verdict']}: {prior['detail']})", prior["task_id"])  # fmt: skip
        row = {"delivery_id": did, "received_at": ts, "source": source, "event": prepared.event,
               "event_type": prepared.event_type}  # fmt: skip
        if prepared.error is not None:
            store.record_delivery({**row, "verdict": "rejected", "detail": prepared.error.message})
            return IngestResult(400, did, "rejected", prepared.error.message, error_code=prepared.error.code)
        change = prepared.delivery.change
        row.update(action=prepared.delivery.action, repo=change.repo, number=change.number, sender=change.sender)
        key = change.semantic_key()
        result = _apply_once(store, cfg, change, key, did, ts)
        store.record_delivery({**row, "verdict": result.verdict, "detail": result.detail[:1000],
                               "task_id": result.task_id, "semantic_key": key if result.verdict == "accepted" else None,
                               "item_updated": change.updated_ts if result.verdict == "accepted" else None,
                               "body_zlib": prepared.packed if result.verdict == "accepted" else None})  # fmt: skip
    return result


def _apply_once(store: Store, cfg: Config, change: Change, key: str | None, did: str, ts: float) -> IngestResult:
    """``apply_change`` in a savepoint: a change the state machine refuses rolls back alone and is recorded.
    ``key``: the change's semantic key (a copy of an accepted change is ignored)."""
    if key and not change.ignored:
        same = store.delivery_with_key(key)
        if same:
            return IngestResult(202, did, "ignored", f"the same change as delivery {same}")
    stamp = change.updated_ts
    if stamp is not None and not change.ignored:
        newest = store.last_item_update(change.repo, change.number)
        if newest is not None and stamp < newest:  # late: a newer state of it was applied already
            return IngestResult(202, did, "ignored", "stale: a newer change of "
                                f"{change.repo}#{change.number} was applied already (sync repairs any gap)")  # fmt: skip
    store.savepoint("apply_change")
    try:
        applied = apply_change(store, cfg, change, now=ts)
    except FleetError as exc:
        store.rollback_to("apply_change")
        store.release("apply_change")
        return IngestResult(202, did, "rejected", f"not applied: {exc.message}")
    store.release("apply_change")
    status = 200 if applied.verdict == "accepted" else 202
    return IngestResult(status, did, applied.verdict, applied.detail, applied.task_id)


def ingest(store: Store, cfg: Config, headers: Any, body: bytes, *, source: str = "cli",
           verified: bool = False, now: float | None = None) -> IngestResult:  # fmt: skip
    """``prepare`` then ``record``: one delivery taken in whole (``fleetctl ingest-webhook``, the spool)."""
    result = record(store, cfg, prepare(cfg, headers, body, verified=verified), source=source, now=now)
    log("webhook." + result.verdict, delivery=result.delivery_id, task=result.task_id, detail=result.detail[:200])
    return result


def delivery_view(row: dict) -> dict:
    """The public JSON shape of a recorded delivery (without its body)."""
    from fleetctl.services.views import iso

    keys = ("delivery_id", "event", "event_type", "action", "repo", "number", "sender", "verdict", "detail",
            "task_id", "source")  # fmt: skip
    return {**{k: row.get(k) for k in keys}, "received_at": iso(row["received_at"])}


def list_deliveries(store: Store, *, verdict: str | None = None, limit: int = 50) -> list[dict]:
    """Recorded deliveries, newest first (``verdict``: accepted, ignored or rejected)."""
    from fleetctl.errors import UsageError

    if verdict is not None and verdict not in VERDICTS:
        raise UsageError(f"unknown verdict {verdict!r}: accepted, ignored or rejected", code="invalid_field")
    return [delivery_view(r) for r in store.deliveries(verdict=verdict, limit=limit)]


def get_delivery(store: Store, delivery_id: str) -> tuple[dict, bytes | None]:
    """A recorded delivery's view (with what became of the comment command it recorded, if any) and its raw
    body (None when it was not kept), or ``NotFound``."""
    from fleetctl.errors import NotFound
    from fleetctl.ids import check_id
    from fleetctl.services.commands import of_delivery

    check_id(delivery_id, "delivery id")
    row = store.delivery(delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id!r}", code="delivery_not_found")
    raw = zlib.decompress(row["body_zlib"]) if row["body_zlib"] is not None else None
    view = delivery_view(row)
    command = of_delivery(store, row, raw)
    return ({**view, "command": command} if command else view), raw


VERDICTS = ("accepted", "ignored", "rejected")


# ---------------------------------------------------------------------------------------------- spool


def spool_dir(cfg: Config) -> Path:
    """Where ``serve`` keeps verified deliveries it could not write at once (the store was locked)."""
    return Path(str(cfg.orchestrator.db_path) + ".spool")


def spool(cfg: Config, prepared: Prepared, headers: dict[str, str]) -> Path:
    """Keep a verified delivery on disk (fsynced, renamed into place) to be applied by ``drain_spool``."""
    folder = spool_dir(cfg)
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{prepared.delivery_id}.json"
    tmp = folder / f".{prepared.delivery_id}.{os.getpid()}.tmp"
    doc = {"headers": headers, "body": base64.b64encode(prepared.body).decode()}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def drain_spool(cfg: Config, run: Callable[[Callable[[Store], Any]], Any], *, limit: int = 1000) -> int:
    """Apply the spooled deliveries, oldest first, each in a write that ``run(fn)`` commits (the server's
    writer, or ``committed(store)``); a file is removed only once its write committed."""
    folder = spool_dir(cfg)
    if not folder.is_dir():
        return 0
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)[:limit]
    done = 0
    for path in files:
        try:
            doc = json.loads(path.read_bytes())
            headers, body = doc["headers"], base64.b64decode(doc["body"], validate=True)
            prepared = prepare(cfg, headers, body, verified=True)
        except (ValueError, KeyError, TypeError, BadPayload) as exc:
            log("webhook.spool_unreadable", file=str(path), error=str(exc)[:200])
            path.replace(path.with_suffix(".bad"))
            continue
        result = run(lambda store, prepared=prepared: record(store, cfg, prepared, source="spool"))
        log("webhook." + result.verdict, delivery=result.delivery_id, task=result.task_id, source="spool")
        path.unlink(missing_ok=True)
        done += 1
    return done


def committed(store: Store) -> Callable[[Callable[[Store], Any]], Any]:
    """A ``run`` for ``drain_spool`` on a store of one's own: each call its own committed write."""

    def run(fn: Callable[[Store], Any]) -> Any:
        with store.write():
            return fn(store)

    return run
