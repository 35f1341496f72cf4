"""Events into current state: the one reducer behind both the write path and ``db check``.

The store appends an event and, in the same transaction, applies this reducer to the few projection
rows the event touches (task, its attempt, the agent). ``fleetctl db check`` replays every event from an
empty state through the same reducer and compares the result with the stored tables, so any write that
bypassed an event (or a claim written in SQL that disagrees with the reducer) shows up as a difference.

Two columns are deliberately *volatile* — high-volume facts that are not events (SPEC §3):
``agents.last_heartbeat_at`` and ``tasks.lease_expires_at`` (heartbeats extend leases). The check
leaves them out of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetctl.errors import InvalidTransition
from fleetctl.states import Transition, next_state

TASK_COLUMNS = (
    "task_id", "seq", "state", "title", "body", "labels", "requirements", "priority", "repo",
    "issue_number", "attempt", "max_attempts", "timeout_secs", "agent_id", "lease_expires_at",
    "not_before", "failure_reason", "failure_detail", "pull_request", "created_at", "updated_at",
    "attempt_started_at", "attempt_kind", "review_rounds", "max_review_rounds", "review", "review_pending",
    "needs_human", "blocked_by", "spent_usd",
)  # fmt: skip
AGENT_COLUMNS = (
    "agent_id", "agent_type", "capabilities", "max_concurrency", "mode", "host_id", "status",
    "token_hash", "registered_at", "updated_at", "last_heartbeat_at", "last_assigned_at",
    "cooldown_until", "cooldown_reason",
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "task_id", "attempt", "agent_id", "host_id", "workspace", "token_hash", "assigned_at", "started_at",
    "ended_at", "outcome", "failure_reason", "failure_detail", "receipt", "receipt_pending", "workspace_cleaned_at",
    "kind", "usage", "cost_usd",
)  # fmt: skip
HOST_COLUMNS = ("host_id", "status", "since", "error", "updated_at")
JSON_COLUMNS = frozenset({"labels", "requirements", "pull_request", "capabilities", "receipt", "review",
                          "review_pending", "usage"})  # fmt: skip
VOLATILE = {"tasks": frozenset({"lease_expires_at"}), "agents": frozenset({"last_heartbeat_at"})}

#: Task fields an ``task.updated`` event may change.
UPDATABLE_TASK_FIELDS = frozenset(
    {"title", "body", "labels", "requirements", "priority", "max_attempts", "timeout_secs", "repo",
     "issue_number", "max_review_rounds"}
)  # fmt: skip
#: Agent fields an ``agent.registered``/``agent.updated`` event may set.
AGENT_FIELDS = frozenset({"agent_type", "capabilities", "max_concurrency", "mode", "host_id", "token_hash"})


class ReplayError(Exception):
    """An event that cannot be applied to the state it finds (a bug or a tampered log)."""


@dataclass
class Projections:
    """Current state, as plain dicts keyed like the tables' primary keys."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)


def _blank(columns: tuple[str, ...]) -> dict[str, Any]:
    return dict.fromkeys(columns)


def apply(p: Projections, ev: dict[str, Any]) -> None:
    """Apply one event (``id, ts, type, task_id, agent_id, attempt, data``) to ``p`` in place.

    An event that changes a task's state must be a legal transition from the state the task is in
    (``fleetctl.states.TRANSITIONS``): otherwise ``ReplayError`` — the store refuses it on write, and
    ``db check`` reports it on replay.
    """
    kind = ev["type"]
    handler = _HANDLERS.get(kind)
    if handler is None:
        return  # informational events (e.g. task.progress, receipt notes) change no projection
    transition = _TRANSITION_EVENTS.get(kind)
    if transition is not None:
        state = _task(p, ev)["state"]
        try:
            next_state(state, transition)
        except InvalidTransition as exc:
            raise ReplayError(
                f"event {ev.get('id')} ({kind}) on task {ev['task_id']!r} is not a legal transition from "
                f"{state}: {exc.message}"
            ) from None
    handler(p, ev, ev["data"] or {})
    if kind.startswith("task.") and ev["task_id"] in p.tasks:
        p.tasks[ev["task_id"]]["updated_at"] = ev["ts"]


def _task(p: Projections, ev: dict) -> dict:
    try:
        return p.tasks[ev["task_id"]]
    except KeyError:
        raise ReplayError(f"event {ev.get('id')} ({ev['type']}) names unknown task {ev['task_id']!r}") from None


def _attempt(p: Projections, ev: dict) -> dict | None:
    return p.attempts.get((ev["task_id"], ev["attempt"]))


def _end_attempt(p: Projections, ev: dict, outcome: str, reason: str | None = None, detail=None) -> None:
    row = _attempt(p, ev)
    if row is not None and row["ended_at"] is None:
        row.update(ended_at=ev["ts"], outcome=outcome, failure_reason=reason, failure_detail=detail,
                   receipt_pending=None)  # fmt: skip


def _created(p: Projections, ev: dict, d: dict) -> None:
    if ev["task_id"] in p.tasks:
        raise ReplayError(f"event {ev.get('id')}: task {ev['task_id']!r} created twice")
    row = _blank(TASK_COLUMNS)
    row.update(
        task_id=ev["task_id"], seq=ev["id"], state="queued", title=d["title"], body=d.get("body", ""),
        labels=d.get("labels", []), requirements=d.get("requirements", []), priority=d.get("priority", 0),
        repo=d.get("repo"), issue_number=d.get("issue_number"), attempt=0, max_attempts=d["max_attempts"],
        timeout_secs=d.get("timeout_secs"), created_at=ev["ts"], updated_at=ev["ts"], attempt_kind="run",
        review_rounds=0, max_review_rounds=d.get("max_review_rounds"), needs_human=0, spent_usd=0.0,
    )  # fmt: skip
    p.tasks[ev["task_id"]] = row


def _updated(p: Projections, ev: dict, d: dict) -> None:
    task = _task(p, ev)
    for key, value in d.items():
        if key in UPDATABLE_TASK_FIELDS:
            task[key] = value


def _assigned(p: Projections, ev: dict, d: dict) -> None:
    task = _task(p, ev)
    task.update(
        state="assigned", agent_id=ev["agent_id"], attempt=ev["attempt"],
        lease_expires_at=d.get("lease_expires_at"), not_before=None, attempt_started_at=ev["ts"], blocked_by=None,
    )  # fmt: skip
    row = _blank(ATTEMPT_COLUMNS)
    row.update(
        task_id=ev["task_id"], attempt=ev["attempt"], agent_id=ev["agent_id"], host_id=d.get("host_id"),
        workspace=d.get("workspace"), token_hash=d.get("token_hash"), assigned_at=ev["ts"],
        kind=task.get("attempt_kind") or "run",
    )  # fmt: skip
    p.attempts[(ev["task_id"], ev["attempt"])] = row
    agent = p.agents.get(ev["agent_id"])
    if agent is not None:
        agent["last_assigned_at"] = ev["ts"]


def _started(p: Projections, ev: dict, d: dict) -> None:
    _task(p, ev)["state"] = "running"
    row = _attempt(p, ev)
    if row is not None:
        row["started_at"] = ev["ts"]
        if d.get("workspace"):
            row["workspace"] = d["workspace"]


def _receipt_end(p: Projections, ev: dict, d: dict, state: str) -> None:
    task = _task(p, ev)
    task.update(state=state, lease_expires_at=None)
    if d.get("pull_request") is not None:
        task["pull_request"] = d["pull_request"]
    row = _attempt(p, ev)
    if row is not None and d.get("receipt") is not None:
        row["receipt"] = d["receipt"]
    _end_attempt(p, ev, state)


def _awaiting_review(p: Projections, ev: dict, d: dict) -> None:
    _receipt_end(p, ev, d, "awaiting_review")


def _completed(p: Projections, ev: dict, d: dict) -> None:
    _receipt_end(p, ev, d, "completed")
    _task(p, ev).update(needs_human=0, review_pending=None)


def _failure(p: Projections, ev: dict, d: dict, state: str) -> None:
    task = _task(p, ev)
    task.update(
        state=state, lease_expires_at=None, failure_reason=d.get("reason"), failure_detail=d.get("detail"),
        not_before=d.get("not_before") if state == "queued" else None,
        agent_id=None if state == "queued" else task["agent_id"],
    )  # fmt: skip
    row = _attempt(p, ev)
    if row is not None and d.get("receipt") is not None:
        row["receipt"] = d["receipt"]
    _end_attempt(p, ev, "failed", d.get("reason"), d.get("detail"))


def _requeued(p: Projections, ev: dict, d: dict) -> None:
    _failure(p, ev, d, "queued")


def _rate_limited(p: Projections, ev: dict, d: dict) -> None:
    """The attempt hit a usage limit: back to the queue with one more attempt allowed (no retry consumed)."""
    task = _task(p, ev)
    _failure(p, ev, {**d, "reason": "rate_limited"}, "queued")
    task["max_attempts"] = (task.get("max_attempts") or 0) + 1


def _rework(p: Projections, ev: dict, d: dict) -> None:
    """Changes were requested on the task's pull request: a new attempt of kind ``rework`` that carries the
    review; one more attempt allowed (not a failure, no retry consumed)."""
    task = _task(p, ev)
    task.update(
        state="queued", agent_id=None, lease_expires_at=None, not_before=None, failure_reason=None,
        failure_detail=None, max_attempts=(task.get("max_attempts") or 0) + 1, review_rounds=(task.get("review_rounds") or 0) + 1,
        review=d.get("review"), review_pending=None, attempt_kind="rework", needs_human=0,
    )  # fmt: skip


def _review_rejected(p: Projections, ev: dict, d: dict) -> None:
    """Changes were requested on the task's pull request; the rework waits for the review's inline comments."""
    _task(p, ev)["review_pending"] = d


def _needs_human(p: Projections, ev: dict, d: dict) -> None:
    """Past ``max_review_rounds``: the task stays in review, flagged for a person."""
    _task(p, ev).update(needs_human=1, review_pending=None)


def _needs_human_cleared(p: Projections, ev: dict, d: dict) -> None:
    _task(p, ev)["needs_human"] = 0


def _blocked(p: Projections, ev: dict, d: dict) -> None:
    """A queued task is not started, and why (``budget``); ``task.unblocked`` (or its claim) clears it."""
    _task(p, ev)["blocked_by"] = d.get("by")


def _unblocked(p: Projections, ev: dict, d: dict) -> None:
    _task(p, ev)["blocked_by"] = None


def _usage(p: Projections, ev: dict, d: dict) -> None:
    """An attempt's usage so far (tokens, cost): replaces its earlier report; the task's spend follows."""
    task = _task(p, ev)
    row = _attempt(p, ev)
    if row is None:
        raise ReplayError(f"event {ev.get('id')}: unknown attempt {ev['task_id']!r} #{ev['attempt']}")
    usage = d.get("usage") or {}
    cost = usage.get("cost_usd")
    before = row["cost_usd"] or 0.0
    row.update(usage=usage, cost_usd=cost)
    task["spent_usd"] = (task["spent_usd"] or 0.0) + (cost or 0.0) - before


def _failed(p: Projections, ev: dict, d: dict) -> None:
    _failure(p, ev, d, "failed")


def _cancelled(p: Projections, ev: dict, d: dict) -> None:
    task = _task(p, ev)
    task.update(state="cancelled", lease_expires_at=None, not_before=None, needs_human=0, review_pending=None,
                blocked_by=None)  # fmt: skip
    _end_attempt(p, ev, "cancelled", None, d.get("reason"))


def _retried(p: Projections, ev: dict, d: dict) -> None:
    task = _task(p, ev)
    task.update(
        state="queued", agent_id=None, lease_expires_at=None, not_before=None, failure_reason=None,
        failure_detail=None, max_attempts=d["max_attempts"], needs_human=0, blocked_by=None, spent_usd=0.0,
        review_pending=None,
    )  # fmt: skip


def _pr_linked(p: Projections, ev: dict, d: dict) -> None:
    """A pull request was found for the task (webhook, sync, or a run's branch): kept in ``pull_request``."""
    _task(p, ev)["pull_request"] = d["pull_request"]


def _receipt_pending(p: Projections, ev: dict, d: dict) -> None:
    """A receipt came while Forgejo could not be asked: kept on the attempt, validated by a later pass."""
    _task(p, ev)
    row = _attempt(p, ev)
    if row is not None and row["ended_at"] is None:
        row.update(receipt=d["receipt"], receipt_pending=1)


def _agent_registered(p: Projections, ev: dict, d: dict) -> None:
    agent = p.agents.get(ev["agent_id"])
    if agent is None:
        agent = _blank(AGENT_COLUMNS)
        agent.update(agent_id=ev["agent_id"], registered_at=ev["ts"])
        p.agents[ev["agent_id"]] = agent
    for key, value in d.items():
        if key in AGENT_FIELDS:
            agent[key] = value
    agent["status"] = d.get("status", "online")
    agent["updated_at"] = ev["ts"]


def _agent_cooled_down(p: Projections, ev: dict, d: dict) -> None:
    """The agent hit a usage limit: no new work for it until ``until``."""
    agent = p.agents.get(ev["agent_id"])
    if agent is None:
        raise ReplayError(f"event {ev.get('id')}: unknown agent {ev['agent_id']!r}")
    agent.update(cooldown_until=d.get("until"), cooldown_reason=d.get("reason"), updated_at=ev["ts"])


def _agent_updated(p: Projections, ev: dict, d: dict) -> None:
    agent = p.agents.get(ev["agent_id"])
    if agent is None:
        raise ReplayError(f"event {ev.get('id')}: unknown agent {ev['agent_id']!r}")
    for key, value in d.items():
        if key in AGENT_FIELDS:
            agent[key] = value
    agent["updated_at"] = ev["ts"]


def _agent_status(status: str, *, fields: bool = False):
    def handler(p: Projections, ev: dict, d: dict) -> None:
        agent = p.agents.get(ev["agent_id"])
        if agent is None:
            raise ReplayError(f"event {ev.get('id')}: unknown agent {ev['agent_id']!r}")
        if fields:  # e.g. a deregistration revokes the token: {"token_hash": null}
            for key, value in d.items():
                if key in AGENT_FIELDS:
                    agent[key] = value
        agent["status"] = status
        agent["updated_at"] = ev["ts"]

    return handler


def _workspace_cleaned(p: Projections, ev: dict, d: dict) -> None:
    """The sweep removed a settled attempt's workspace (after ``orchestrator.workspace_retention_secs``)."""
    row = _attempt(p, ev)
    if row is None:
        raise ReplayError(f"event {ev.get('id')}: unknown attempt {ev['task_id']!r} #{ev['attempt']}")
    row["workspace_cleaned_at"] = ev["ts"]


def _host_status(status: str):
    def handler(p: Projections, ev: dict, d: dict) -> None:
        host_id = d.get("host_id")
        if not isinstance(host_id, str):
            raise ReplayError(f"event {ev.get('id')} ({ev['type']}) names no host")
        row = p.hosts.setdefault(host_id, _blank(HOST_COLUMNS))
        if row["status"] != status:
            row["since"] = ev["ts"]
        row.update(host_id=host_id, status=status, error=d.get("error"), updated_at=ev["ts"])

    return handler


_HANDLERS = {
    "task.created": _created,
    "task.updated": _updated,
    "task.assigned": _assigned,
    "task.started": _started,
    "task.awaiting_review": _awaiting_review,
    "task.completed": _completed,
    "task.requeued": _requeued,
    "task.failed": _failed,
    "task.cancelled": _cancelled,
    "task.retried": _retried,
    "task.pr_linked": _pr_linked,
    "task.receipt_pending": _receipt_pending,
    "task.rework": _rework,
    "task.rate_limited": _rate_limited,
    "task.review_rejected": _review_rejected,
    "task.needs_human": _needs_human,
    "task.needs_human_cleared": _needs_human_cleared,
    "task.blocked": _blocked,
    "task.unblocked": _unblocked,
    "task.usage": _usage,
    "agent.cooled_down": _agent_cooled_down,
    "agent.registered": _agent_registered,
    "agent.updated": _agent_updated,
    "agent.online": _agent_status("online"),
    "agent.offline": _agent_status("offline"),
    "agent.draining": _agent_status("draining"),
    "agent.deregistered": _agent_status("offline", fields=True),
    "attempt.workspace_cleaned": _workspace_cleaned,
    "host.down": _host_status("down"),
    "host.up": _host_status("up"),
}

#: Event types that are task state transitions (``task.<transition>``), checked against the table.
_TRANSITION_EVENTS = {f"task.{t.value}": t for t in Transition}
assert set(_TRANSITION_EVENTS) <= set(_HANDLERS), "every transition has a reducer"

#: Every event type the reducer knows (others are informational).
STATEFUL_EVENT_TYPES = frozenset(_HANDLERS)
