"""Services: one function per operation, called by the CLI, the HTTP server and the webhook path alike.

Each function takes the ``Store`` and the orchestrator settings it needs, validates its input, decides
with the pure core (``states``, ``retry``, ``matching``, ``receipts``) and writes events through
``Store.emit`` inside one ``Store.write()`` transaction. Writes about an attempt are fenced by
(task id, agent id, attempt): a caller that lost its lease gets ``LeaseLost`` and changes nothing.
Time is injected (``now=``), never read from a patched clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetctl.config import OrchestratorConfig
from fleetctl.errors import Conflict, LeaseLost, NotFound, UsageError, ValidationFailed
from fleetctl.ids import check_id, check_repo, new_task_id
from fleetctl.matching import parse_labels
from fleetctl.states import (
    ACTIVE,
    LEASED,
    AgentMode,
    AgentStatus,
    FailureReason,
    TaskState,
    Transition,
    next_state,
)
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.receipts import Receipt
    from fleetctl.retry import RetryPolicy

# hashlib/hmac/secrets (OpenSSL), receipts and retry are imported where they are used, so that what
# timers run every few seconds (a dispatch pass with nothing to do) does not load them (SPEC §11 start-up).

MAX_TITLE = 1000
MAX_BODY = 256 * 1024
MAX_LABELS = 100
MAX_LABEL = 200
MAX_MESSAGE = 4096


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def hash_token(token: str) -> str:
    """The stored form of a bearer token (tokens themselves are never stored)."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    import hmac

    return bool(token_hash) and hmac.compare_digest(hash_token(token), token_hash)


def policy(orch: OrchestratorConfig) -> RetryPolicy:
    from fleetctl.retry import RetryPolicy

    return RetryPolicy(base=orch.retry_backoff_secs, cap=orch.retry_backoff_max_secs)


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


# ---------------------------------------------------------------------------------------------- tasks


def _check_text(value: Any, what: str, limit: int, *, required: bool = False) -> str:
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


def _check_labels(labels: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for label in labels:
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL:
            raise UsageError(f"invalid label {label!r}", code="invalid_label")
        if any(c in label for c in "\0\n\r"):
            raise UsageError(f"invalid label {label!r}: control characters", code="invalid_label")
        if label.strip() not in out:
            out.append(label.strip())
    if len(out) > MAX_LABELS:
        raise UsageError(f"at most {MAX_LABELS} labels", code="invalid_label")
    return out


def create_task(
    store: Store,
    orch: OrchestratorConfig,
    *,
    title: str,
    body: str = "",
    labels: Sequence[str] = (),
    repo: str | None = None,
    issue_number: int | None = None,
    task_id: str | None = None,
    now: float | None = None,
) -> dict:
    """Create a queued task; requirements, priority, retries and timeout come from its labels.

    Example: ``create_task(store, orch, title="Fix CI", labels=["agent:code:python", "priority:5"])``.
    """
    title = _check_text(title, "title", MAX_TITLE, required=True)
    body = _check_text(body, "body", MAX_BODY)
    labels = _check_labels(labels)
    if (repo is None) != (issue_number is None):
        raise UsageError("a repository and an issue number go together (--repo and --issue)", code="invalid_field")
    if repo is not None:
        check_repo(repo)
        if isinstance(issue_number, bool) or not isinstance(issue_number, int) or issue_number < 1:
            raise UsageError("issue number must be a positive integer", code="invalid_field")
    task_id = check_id(task_id, "task id") if task_id is not None else new_task_id()
    knobs = parse_labels(labels, orch.requirement_prefix)
    retries = knobs.max_retries if knobs.max_retries is not None else orch.default_max_retries
    ts = _now(now)
    with store.write():
        if store.task(task_id) is not None:
            raise Conflict(f"task {task_id!r} already exists", code="task_exists")
        if repo is not None:
            active = store.execute(
                "SELECT task_id FROM tasks WHERE repo=? AND issue_number=? "
                "AND state NOT IN ('completed','failed','cancelled')",
                (repo, issue_number),
            ).fetchone()
            if active:
                raise Conflict(f"{repo}#{issue_number} already has an active task {active[0]}", code="task_exists")
        store.emit(
            "task.created",
            ts=ts,
            task_id=task_id,
            data={
                "title": title, "body": body, "labels": labels, "requirements": list(knobs.requirements),
                "priority": knobs.priority, "repo": repo, "issue_number": issue_number,
                "max_attempts": 1 + retries, "timeout_secs": knobs.timeout_secs,
            },
        )  # fmt: skip
        return store.task(task_id)


def _transition(store: Store, task: dict, kind: Transition, ts: float, *, data: dict | None = None,
                attempt: int | None = None, agent_id: str | None = None) -> dict:  # fmt: skip
    """Check the table, emit ``task.<kind>``, return the new task row. Inside ``store.write()``."""
    next_state(task["state"], kind)
    store.emit(f"task.{kind.value}", ts=ts, task_id=task["task_id"], attempt=attempt, agent_id=agent_id,
               data=data or {})  # fmt: skip
    return store.task(task["task_id"])


def _fenced(store: Store, task_id: str, agent_id: str | None, attempt: int | None,
            states: frozenset = ACTIVE) -> dict:  # fmt: skip
    """The task if ``(agent_id, attempt)`` still holds it in one of ``states``, else ``LeaseLost``."""
    task = get_task(store, task_id)
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise UsageError("attempt must be a positive integer", code="invalid_field")
    holder_ok = agent_id is None or task["agent_id"] == agent_id
    attempt_ok = attempt is None or task["attempt"] == attempt
    if task["state"] not in states or not holder_ok or not attempt_ok:
        who = f"agent {agent_id} " if agent_id else ""
        raise LeaseLost(
            f"{who}no longer holds task {task_id} attempt {attempt or task['attempt']} "
            f"(task is {task['state']}, attempt {task['attempt']}, held by {task['agent_id'] or 'no agent'})",
            details={"state": task["state"], "attempt": task["attempt"]},
        )
    return task


def start_task(store: Store, task_id: str, *, agent_id: str | None = None, attempt: int | None = None,
               workspace: str | None = None, now: float | None = None) -> dict:  # fmt: skip
    """assigned → running (the run started). Repeating it while running is a no-op."""
    ts = _now(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt)
        if task["state"] == TaskState.RUNNING:
            return task
        return _transition(store, task, Transition.START, ts, data={"workspace": workspace} if workspace else {})


def report_progress(store: Store, task_id: str, message: str, *, agent_id: str | None = None,
                    attempt: int | None = None, now: float | None = None) -> dict:  # fmt: skip
    """Record a progress note from the task's current holder (an event; no state change)."""
    message = _check_text(message, "message", MAX_MESSAGE)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt)
        store.emit("task.progress", ts=_now(now), task_id=task_id, data={"message": message})
        return task


def fail_attempt(
    store: Store,
    orch: OrchestratorConfig,
    task_id: str,
    reason: FailureReason | str,
    detail: str | None = None,
    *,
    agent_id: str | None = None,
    attempt: int | None = None,
    receipt: dict | None = None,
    now: float | None = None,
    states: frozenset = LEASED,
) -> dict:
    """The current attempt failed: re-queue with backoff if the policy allows, else fail the task."""
    reason = FailureReason(reason)
    ts = _now(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt, states)
        decision = policy(orch).decide(attempt=task["attempt"], max_attempts=task["max_attempts"],
                                       reason=reason, now=ts)  # fmt: skip
        data: dict[str, Any] = {"reason": reason.value, "detail": (detail or "")[:MAX_MESSAGE], "why": decision.why}
        if receipt is not None:
            data["receipt"] = receipt
        if decision.retry:
            data["not_before"] = decision.not_before
            return _transition(store, task, Transition.RETRY_LATER, ts, data=data)
        return _transition(store, task, Transition.FAIL, ts, data=data)


@dataclass(frozen=True)
class CompletionResult:
    """What ``complete_task`` did: the task now, and whether this call was a repeat of a stored one."""

    task: dict
    repeated: bool = False
    rejected: str | None = None  # why the receipt was refused (the attempt then failed receipt_invalid)

    def raise_if_rejected(self) -> CompletionResult:
        """``ValidationFailed`` for a refused receipt (call it after the transaction committed)."""
        if self.rejected:
            raise ValidationFailed(
                f"receipt rejected: {self.rejected}; the attempt failed and the task is {self.task['state']}",
                code="receipt_invalid",
                details={"task_id": self.task["task_id"], "state": self.task["state"]},
            )
        return self


def complete_task(
    store: Store, orch: OrchestratorConfig, task_id: str, receipt_doc: Any, **kwargs: Any
) -> CompletionResult:
    """``hand_in_receipt`` that raises ``ValidationFailed`` (after committing) when the receipt is refused."""
    return hand_in_receipt(store, orch, task_id, receipt_doc, **kwargs).raise_if_rejected()


def hand_in_receipt(
    store: Store,
    orch: OrchestratorConfig,
    task_id: str,
    receipt_doc: Any,
    *,
    agent_id: str | None = None,
    attempt: int | None = None,
    require_pull_request: bool = False,
    now: float | None = None,
) -> CompletionResult:
    """Hand in a receipt for the current attempt (SPEC §7.4); never raises for a refused receipt.

    Success naming a pull request → awaiting_review; success without one → completed (or, when a pull
    request is required, the attempt fails ``receipt_invalid``); failure → the attempt fails
    ``agent_error``. A repeat of an already accepted identical receipt returns the stored result and
    records nothing; any other late write raises ``LeaseLost``. A refused receipt fails the attempt
    (``receipt_invalid``) and comes back as ``result.rejected``: committing that failure and telling the
    caller are separate steps, so that a batch of writes (the server) commits it before answering 422.
    """
    from fleetctl.receipts import parse_receipt

    receipt = parse_receipt(receipt_doc)
    ts = _now(now)
    with store.write():
        task = get_task(store, task_id)
        n = attempt if attempt is not None else task["attempt"]
        prior = store.attempt(task_id, n) if isinstance(n, int) and n > 0 else None
        if prior is not None and prior["receipt"] == receipt.to_json() and agent_id in (None, prior["agent_id"]):
            return CompletionResult(task, repeated=True)
        task = _fenced(store, task_id, agent_id, attempt)  # not ``n``: a never-claimed task has attempt 0
        if receipt.outcome == "failure":
            result = fail_attempt(store, orch, task_id, FailureReason.AGENT_ERROR, receipt.summary or "failure receipt",
                                  receipt=receipt.to_json(), now=ts)  # fmt: skip
            return CompletionResult(result)
        problem = _receipt_problem(task, receipt, require_pull_request)
        if problem:
            rejected = fail_attempt(store, orch, task_id, FailureReason.RECEIPT_INVALID, problem,
                                    receipt=receipt.to_json(), now=ts)  # fmt: skip
            return CompletionResult(rejected, rejected=problem)
        prs = receipt.pull_requests()
        data: dict[str, Any] = {"receipt": receipt.to_json()}
        if prs:
            pr = dict(prs[0])
            pr.setdefault("repo", task["repo"])
            data["pull_request"] = pr
            return CompletionResult(_transition(store, task, Transition.AWAIT_REVIEW, ts, data=data))
        return CompletionResult(_transition(store, task, Transition.COMPLETE, ts, data=data))


def _receipt_problem(task: dict, receipt: Receipt, require_pull_request: bool) -> str | None:
    """Why a success receipt is not acceptable on its face (Forgejo checks come on top), or None."""
    prs = receipt.pull_requests()
    if require_pull_request and not prs:
        return "a pull request is required for this task and the receipt names none"
    for pr in prs:
        if task["repo"] and pr.get("repo") and pr["repo"].lower() != task["repo"].lower():
            return f"pull request {pr['repo']}#{pr['number']} is not in the task's repository {task['repo']}"
    return None


def settle_run(store: Store, orch: OrchestratorConfig, task_id: str, attempt: int, exit_code: int | None,
               detail: str = "", *, now: float | None = None) -> dict | None:  # fmt: skip
    """A run ended. If its attempt is still open (no receipt came), fail it by exit status; else no-op."""
    with store.write():
        task = get_task(store, task_id)
        if task["attempt"] != attempt or task["state"] not in ACTIVE:
            return None
        if exit_code in (126, 127):  # the shell's "not executable" / "command not found": it never ran
            reason, why = FailureReason.LAUNCH_FAILED, f"the agent command could not be started (exit {exit_code})"
        elif exit_code == 0:
            reason, why = FailureReason.NO_RECEIPT, "the run exited 0 without handing in a receipt"
        elif exit_code is None:
            reason, why = FailureReason.AGENT_ERROR, "the run ended without an exit status"
        else:
            reason, why = FailureReason.AGENT_ERROR, f"the run exited with status {exit_code}"
        return fail_attempt(store, orch, task_id, reason, f"{why}{': ' + detail if detail else ''}",
                            attempt=attempt, now=now, states=ACTIVE)  # fmt: skip


def cancel_task(store: Store, task_id: str, reason: str = "cancelled by operator", *,
                now: float | None = None) -> dict:  # fmt: skip
    """Cancel a task that is not terminal."""
    with store.write():
        task = get_task(store, task_id)
        return _transition(store, task, Transition.CANCEL, _now(now), data={"reason": reason[:MAX_MESSAGE]})


def retry_task(store: Store, orch: OrchestratorConfig, task_id: str, *, now: float | None = None) -> dict:
    """Re-queue a failed or cancelled task with a fresh attempt budget (``1 + default_max_retries`` more)."""
    with store.write():
        task = get_task(store, task_id)
        next_state(task["state"], Transition.REQUEUE)
        if task["repo"] and task["issue_number"]:
            active = store.execute(
                "SELECT task_id FROM tasks WHERE repo=? AND issue_number=? AND task_id != ? "
                "AND state NOT IN ('completed','failed','cancelled')",
                (task["repo"], task["issue_number"], task_id),
            ).fetchone()
            if active:
                raise Conflict(f"{task['repo']}#{task['issue_number']} already has an active task {active[0]}")
        knobs = parse_labels(task["labels"], orch.requirement_prefix)
        retries = knobs.max_retries if knobs.max_retries is not None else orch.default_max_retries
        return _transition(store, task, Transition.REQUEUE, _now(now),
                           data={"max_attempts": task["attempt"] + 1 + retries})  # fmt: skip


def expire_or_time_out(store: Store, orch: OrchestratorConfig, task: dict, reason: FailureReason, detail: str,
                       *, now: float | None = None) -> dict | None:  # fmt: skip
    """Fail the current attempt of ``task`` (as read by a sweep) unless it moved on meanwhile."""
    try:
        return fail_attempt(store, orch, task["task_id"], reason, detail, attempt=task["attempt"],
                            agent_id=task["agent_id"], now=now, states=ACTIVE)  # fmt: skip
    except LeaseLost:
        return None


# ---------------------------------------------------------------------------------------------- agents


def _check_caps(capabilities: Iterable[Any]) -> list[str]:
    caps = []
    for c in capabilities:
        if not isinstance(c, str) or not c or len(c) > MAX_LABEL or any(ch in c for ch in "\0\n\r "):
            raise UsageError(f"invalid capability {c!r}", code="invalid_capability")
        if c not in caps:
            caps.append(c)
    return sorted(caps)


@dataclass(frozen=True)
class Registration:
    """A registered agent and, for pull agents, its token (shown once, stored only as a hash)."""

    agent: dict
    token: str | None
    created: bool


def register_agent(
    store: Store,
    agent_id: str,
    *,
    agent_type: str,
    capabilities: Iterable[str] = (),
    max_concurrency: int = 1,
    mode: AgentMode | str = AgentMode.HTTP_PULL,
    host_id: str | None = None,
    issue_token: bool = True,
    allow_mode_change: bool = False,
    now: float | None = None,
) -> Registration:
    """Create or update an agent and put it online. Pull agents get a fresh token on every registration.

    An existing agent keeps its mode unless ``allow_mode_change`` (the operator's CLI and the config sync):
    a pull agent's registration token must not be able to take over an agent of the configuration.
    """
    check_id(agent_id, "agent id")
    agent_type = _check_text(agent_type, "agent type", MAX_LABEL, required=True)
    caps = _check_caps(capabilities)
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or not 1 <= max_concurrency <= 1000:
        raise UsageError("max concurrency must be an integer from 1 to 1000", code="invalid_field")
    try:
        mode = AgentMode(mode)
    except ValueError:
        raise UsageError("mode must be http_pull or ssh_cli", code="invalid_field") from None
    import secrets

    token = secrets.token_urlsafe(32) if issue_token and mode == AgentMode.HTTP_PULL else None
    fields: dict[str, Any] = {"agent_type": agent_type, "capabilities": caps, "max_concurrency": max_concurrency,
                              "mode": mode.value, "host_id": host_id}  # fmt: skip
    if token:
        fields["token_hash"] = hash_token(token)
    ts = _now(now)
    with store.write():
        existing = store.agent(agent_id)
        if existing is not None and existing["mode"] != mode.value and not allow_mode_change:
            raise Conflict(f"agent {agent_id} exists as a {existing['mode']} agent; choose another agent id",
                           code="agent_mode_conflict")  # fmt: skip
        if existing is None:
            store.emit("agent.registered", ts=ts, agent_id=agent_id, data={**fields, "status": "online"})
        else:
            changed = {k: v for k, v in fields.items() if existing.get(k) != v}
            if changed:
                store.emit("agent.updated", ts=ts, agent_id=agent_id, data=changed)
            if existing["status"] != AgentStatus.ONLINE:
                store.emit("agent.online", ts=ts, agent_id=agent_id, data={"reason": "registered"})
        store.execute("UPDATE agents SET last_heartbeat_at=? WHERE agent_id=?", (ts, agent_id))
        return Registration(store.agent(agent_id), token, existing is None)


def heartbeat(store: Store, orch: OrchestratorConfig, agent_id: str, *, now: float | None = None) -> dict:
    """Record a heartbeat: extend the agent's leases; bring it back online if it was marked offline.

    Returns ``{"agent": …, "cancelled": [task ids of its attempts cancelled since]}`` so it can stop them.
    """
    ts = _now(now)
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] == AgentStatus.OFFLINE:
            store.emit("agent.online", ts=ts, agent_id=agent_id, data={"reason": "heartbeat"})
        store.execute("UPDATE agents SET last_heartbeat_at=? WHERE agent_id=?", (ts, agent_id))
        store.execute(
            "UPDATE tasks SET lease_expires_at=? WHERE agent_id=? AND state IN ('assigned','running')",
            (ts + orch.lease_secs, agent_id),
        )
        since = agent["last_heartbeat_at"] or agent["registered_at"]
        cancelled = [
            r[0]
            for r in store.execute(
                "SELECT a.task_id FROM attempts a JOIN tasks t ON t.task_id=a.task_id AND t.attempt=a.attempt "
                "WHERE a.agent_id=? AND a.outcome='cancelled' AND a.ended_at >= ?",
                (agent_id, since - orch.lease_secs),
            )
        ]
        return {"agent": store.agent(agent_id), "cancelled": cancelled}


def set_agent_status(store: Store, orch: OrchestratorConfig, agent_id: str, status: AgentStatus, reason: str,
                     *, now: float | None = None) -> dict:  # fmt: skip
    """Change an agent's status. Going offline fails its assigned and running attempts (``agent_lost``)."""
    ts = _now(now)
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] != status:
            kind = "agent.deregistered" if reason == "deregistered" else f"agent.{status.value}"
            store.emit(kind, ts=ts, agent_id=agent_id, data={"reason": reason})
        if status == AgentStatus.OFFLINE:
            for task in store.tasks(states=("assigned", "running"), agent_id=agent_id):
                fail_attempt(store, orch, task["task_id"], FailureReason.AGENT_LOST, f"agent {agent_id} {reason}",
                             attempt=task["attempt"], now=ts, states=ACTIVE)  # fmt: skip
        return store.agent(agent_id)


def agent_view(agent: dict, running: int) -> dict:
    """The public JSON shape of an agent (SPEC §6)."""
    return {
        "agent_id": agent["agent_id"], "agent_type": agent["agent_type"], "capabilities": agent["capabilities"],
        "max_concurrency": agent["max_concurrency"], "mode": agent["mode"], "status": agent["status"],
        "last_heartbeat_at": iso(agent["last_heartbeat_at"]), "running": running, "host_id": agent["host_id"],
        "registered_at": iso(agent["registered_at"]),
    }  # fmt: skip


def task_view(task: dict) -> dict:
    """The public JSON shape of a task (SPEC §6); times as ISO 8601 UTC."""
    return {
        "task_id": task["task_id"], "state": task["state"], "title": task["title"], "body": task["body"],
        "labels": task["labels"], "requirements": task["requirements"], "priority": task["priority"],
        "repo": task["repo"], "issue_number": task["issue_number"], "attempt": task["attempt"],
        "max_attempts": task["max_attempts"], "agent_id": task["agent_id"],
        "lease_expires_at": iso(task["lease_expires_at"]), "not_before": iso(task["not_before"]),
        "failure_reason": task["failure_reason"], "failure_detail": task["failure_detail"],
        "pull_request": task["pull_request"], "timeout_secs": task["timeout_secs"],
        "created_at": iso(task["created_at"]), "updated_at": iso(task["updated_at"]),
    }  # fmt: skip


def event_view(ev: dict) -> dict:
    """The public JSON shape of an event (token hashes left out: nobody outside needs them)."""
    data = {k: v for k, v in (ev["data"] or {}).items() if k != "token_hash"}
    return {"id": ev["id"], "ts": iso(ev["ts"]), "type": ev["type"], "task_id": ev["task_id"],
            "agent_id": ev["agent_id"], "attempt": ev["attempt"], "data": data}  # fmt: skip


def attempt_view(a: dict) -> dict:
    """The public JSON shape of an attempt."""
    return {
        "attempt": a["attempt"], "agent_id": a["agent_id"], "host_id": a["host_id"], "workspace": a["workspace"],
        "assigned_at": iso(a["assigned_at"]), "started_at": iso(a["started_at"]), "ended_at": iso(a["ended_at"]),
        "outcome": a["outcome"], "failure_reason": a["failure_reason"], "failure_detail": a["failure_detail"],
        "receipt": a["receipt"],
    }  # fmt: skip


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    t = time.gmtime(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int((ts % 1) * 1000):03d}Z"
