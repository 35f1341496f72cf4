"""The public JSON shapes (SPEC §6) and the read services that the CLI and the server both render.

A view is a plain dict with times as ISO 8601 UTC; the field names are the contract (add, never rename).
``task_detail``, ``list_tasks``, ``list_agents`` and ``agent_detail`` are the one implementation of
"show" and "list" for every caller; each reads in one snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Container, Sequence

from fleetctl.errors import UsageError
from fleetctl.services._common import get_agent, get_task
from fleetctl.states import AgentMode, AgentStatus, TaskState
from fleetctl.store import Store

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    t = time.gmtime(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int((ts % 1) * 1000):03d}Z"


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
        "needs_human": bool(task["needs_human"]), "blocked_by": task["blocked_by"],
        "attempt_kind": task["attempt_kind"], "review_rounds": task["review_rounds"],
        "max_review_rounds": task["max_review_rounds"], "spent_usd": round(task["spent_usd"] or 0.0, 6),
    }  # fmt: skip


def agent_view(agent: dict, running: int, down_hosts: Container[str] = ()) -> dict:
    """The public JSON shape of an agent (SPEC §6). ``host_status``: for an ssh_cli agent, ``down`` while its
    host is marked down (dispatch skips it), else ``up``; None for a pull agent."""
    host_status = None
    if agent["mode"] == AgentMode.SSH_CLI:
        host_status = "down" if agent["host_id"] in down_hosts else "up"
    return {
        "agent_id": agent["agent_id"], "agent_type": agent["agent_type"], "capabilities": agent["capabilities"],
        "max_concurrency": agent["max_concurrency"], "mode": agent["mode"], "status": agent["status"],
        "last_heartbeat_at": iso(agent["last_heartbeat_at"]), "running": running, "host_id": agent["host_id"],
        "host_status": host_status, "registered_at": iso(agent["registered_at"]),
        "cooldown_until": iso(cooldown) if (cooldown := agent["cooldown_until"]) and cooldown > time.time() else None,
        "cooldown_reason": agent["cooldown_reason"] if cooldown and cooldown > time.time() else None,
    }  # fmt: skip


def agent_views(store: Store, agents: Sequence[dict]) -> list[dict]:
    """``agent_view`` of each agent with its load and its host's status, read now (inside the caller's
    snapshot, if any): the one way every caller renders agents."""
    running, down = store.running_counts(), store.down_hosts()
    return [agent_view(a, running.get(a["agent_id"], 0), down) for a in agents]


def event_view(ev: dict) -> dict:
    """The public JSON shape of an event (token hashes left out: nobody outside needs them)."""
    data = {k: v for k, v in (ev["data"] or {}).items() if k != "token_hash"}
    return {"id": ev["id"], "ts": iso(ev["ts"]), "type": ev["type"], "task_id": ev["task_id"],
            "agent_id": ev["agent_id"], "attempt": ev["attempt"], "data": data}  # fmt: skip


def attempt_view(a: dict) -> dict:
    """The public JSON shape of an attempt. ``workspace`` keeps the path the run had; ``workspace_cleaned_at``
    says when the sweep removed it (null while it is kept)."""
    return {
        "attempt": a["attempt"], "agent_id": a["agent_id"], "host_id": a["host_id"], "workspace": a["workspace"],
        "assigned_at": iso(a["assigned_at"]), "started_at": iso(a["started_at"]), "ended_at": iso(a["ended_at"]),
        "outcome": a["outcome"], "failure_reason": a["failure_reason"], "failure_detail": a["failure_detail"],
        "receipt": a["receipt"], "workspace_cleaned_at": iso(a["workspace_cleaned_at"]),
        "kind": a["kind"] or "run", "usage": a["usage"],
    }  # fmt: skip


def task_detail(store: Store, task_id: str) -> dict:
    """A task with its attempts and events, read in one snapshot (``task show``, ``GET /tasks/{id}``)."""
    with store.read():
        task = get_task(store, task_id)
        attempts, events = store.attempts(task_id), store.events(task_id=task_id)
    doc = task_view(task)
    doc["attempts"] = [attempt_view(a) for a in attempts]
    doc["events"] = [event_view(e) for e in events]
    return doc


def check_states(states: Sequence[str]) -> list[str]:
    """Task state names, validated (``UsageError`` naming the first unknown one)."""
    valid = {s.value for s in TaskState}
    for s in states:
        if s not in valid:
            raise UsageError(f"unknown state {s!r}; states are {', '.join(TaskState)}", code="invalid_query")
    return list(states)


def list_tasks(store: Store, *, states: Sequence[str] = (), agent_id: str | None = None, repo: str | None = None,
               cursor: int | None = None, limit: int = DEFAULT_PAGE) -> dict:  # fmt: skip
    """One page of tasks in creation order: ``{"items": [task views], "next": cursor or None}``."""
    states = check_states(states)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"limit must be between 1 and {MAX_PAGE}", code="invalid_query")
    rows = store.tasks(states=states, agent_id=agent_id or None, repo=repo or None, after_seq=cursor,
                       limit=limit + 1)  # fmt: skip
    nxt = rows[limit - 1]["seq"] if len(rows) > limit else None
    return {"items": [task_view(t) for t in rows[:limit]], "next": nxt}


def list_agents(store: Store, *, status: str | None = None, mode: str | None = None,
                capability: str | None = None) -> list[dict]:  # fmt: skip
    """Agents by id, filtered by status, mode and a capability they must have (empty filters are absent)."""
    if status and status not in {s.value for s in AgentStatus}:
        raise UsageError("status must be online, offline or draining", code="invalid_query")
    if mode and mode not in {m.value for m in AgentMode}:
        raise UsageError("mode must be http_pull or ssh_cli", code="invalid_query")
    with store.read():
        agents = store.agents(status=status or None, mode=mode or None)
        return agent_views(store, [a for a in agents if not capability or capability in a["capabilities"]])


def agent_detail(store: Store, agent_id: str, *, recent_events: int = 20) -> dict:
    """One agent's view, with the tasks it holds now and its most recent events."""
    with store.read():
        agent = get_agent(store, agent_id)
        held = store.tasks(states=(TaskState.ASSIGNED, TaskState.RUNNING), agent_id=agent_id)
        events = store.events(agent_id=agent_id, limit=recent_events, newest=True)
        doc = agent_views(store, [agent])[0]
    doc["tasks"] = [t["task_id"] for t in held]
    doc["events"] = [event_view(e) for e in events]
    return doc
