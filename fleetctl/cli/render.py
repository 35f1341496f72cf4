"""Rich renderings for people (tables, timelines). Scripts use ``--json`` instead."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from fleetctl.cli._common import print_fields, print_table

STATE_STYLE = {
    "queued": "cyan", "assigned": "blue", "running": "yellow", "awaiting_review": "magenta",
    "completed": "green", "failed": "red", "cancelled": "dim",
}  # fmt: skip


def ago(ts: float | None, now: float | None = None) -> str:
    """'12s ago', '3m ago', 'in 20s' — or '' for None."""
    if ts is None:
        return ""
    delta = (now or time.time()) - ts
    future = delta < 0
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            text = f"{delta / size:.0f}{unit}"
            break
    else:
        text = f"{delta:.0f}s"
    return f"in {text}" if future else f"{text} ago"


def styled_state(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


def render_task_list(rows: Sequence[dict], cursor: int | None) -> None:
    now = time.time()
    print_table(
        None,
        ("ID", "STATE", "PRI", "ATTEMPT", "AGENT", "NEEDS", "TITLE", "UPDATED"),
        (
            (t["task_id"], styled_state(t["state"]), t["priority"], f"{t['attempt']}/{t['max_attempts']}",
             t["agent_id"] or "", ", ".join(t["requirements"]), t["title"][:60], ago(t["updated_at"], now))
            for t in rows
        ),
    )  # fmt: skip
    if cursor is not None:
        from fleetctl.cli._common import err

        err(f"more: --after {cursor}")


def render_task(task: dict, attempts: Sequence[dict], events: Sequence[dict]) -> None:
    from fleetctl.services import iso

    pr = task["pull_request"]
    print_fields(
        f"task {task['task_id']}",
        [
            ("state", styled_state(task["state"])), ("title", task["title"]),
            ("repo", f"{task['repo']}#{task['issue_number']}" if task["repo"] else ""),
            ("labels", ", ".join(task["labels"])), ("requires", ", ".join(task["requirements"])),
            ("priority", task["priority"]), ("attempt", f"{task['attempt']} of {task['max_attempts']}"),
            ("agent", task["agent_id"]), ("lease expires", iso(task["lease_expires_at"])),
            ("not before", iso(task["not_before"])),
            ("failure", f"{task['failure_reason']}: {task['failure_detail']}" if task["failure_reason"] else ""),
            ("pull request", f"{pr.get('repo')}#{pr.get('number')}" if pr else ""),
            ("created", iso(task["created_at"])), ("updated", iso(task["updated_at"])),
        ],
    )  # fmt: skip
    if attempts:
        print_table(
            "attempts",
            ("#", "AGENT", "HOST", "OUTCOME", "REASON", "STARTED", "ENDED", "WORKSPACE"),
            ((a["attempt"], a["agent_id"], a["host_id"] or "", a["outcome"] or "(open)", a["failure_reason"] or "",
              iso(a["started_at"]) or "", iso(a["ended_at"]) or "", a["workspace"] or "") for a in attempts),
        )  # fmt: skip
    render_events(events, title="events")


def describe_event(ev: dict, short: bool = False) -> str:
    """A one-line human description of an event's data (``short``: without the retry arithmetic)."""
    d = ev["data"] or {}
    t = ev["type"]
    if t in ("task.requeued", "task.failed") and short:
        return f"{d.get('reason')}: {d.get('detail', '')}"
    if t == "task.started":
        return f"in {d['workspace']}" if d.get("workspace") else "running"
    if t == "task.created":
        return f"{d.get('title', '')!r} needs {', '.join(d.get('requirements') or []) or 'nothing special'}"
    if t == "task.assigned":
        where = f"on {d['host_id']}" if d.get("host_id") else "claimed over the API"
        return where if short else f"to {ev['agent_id']} {where}"
    if t in ("task.requeued", "task.failed"):
        return f"{d.get('reason')}: {d.get('detail', '')} ({d.get('why', '')})"
    if t in ("task.completed", "task.awaiting_review"):
        receipt = d.get("receipt") or {}
        return receipt.get("summary", "") or ""
    if t == "task.cancelled":
        return d.get("reason", "")
    if t == "task.progress":
        return d.get("message", "")
    if t.startswith("agent."):
        return d.get("reason") or ", ".join(f"{k}={v}" for k, v in d.items() if k != "token_hash")
    return json.dumps(d, sort_keys=True)[:120] if d else ""


def render_events(events: Sequence[dict], title: str | None = None) -> None:
    """Events as a table that stays readable at 80 columns: the agent and attempt go into the detail."""
    print_table(
        title,
        ("ID", "TIME", "TYPE", "TASK", "DETAIL"),
        ((e["id"], time.strftime("%m-%d %H:%M:%S", time.localtime(e["ts"])), e["type"],
          e["task_id"] or e["agent_id"] or "", _detail(e)) for e in events),
    )  # fmt: skip


def _detail(e: dict) -> str:
    who = f"{e['agent_id']}#{e['attempt']}: " if e["task_id"] and e["agent_id"] and e["attempt"] else ""
    return who + describe_event(e, short=True)


def render_agents(rows: Sequence[dict]) -> None:
    now = time.time()
    print_table(
        None,
        ("AGENT", "TYPE", "MODE", "STATUS", "RUNNING", "CAPABILITIES", "HOST", "HEARTBEAT"),
        ((a["agent_id"], a["agent_type"], a["mode"], a["status"], f"{a['running']}/{a['max_concurrency']}",
          ", ".join(a["capabilities"]), a.get("host_id") or "", ago(a.get("_hb"), now)) for a in rows),
    )  # fmt: skip
