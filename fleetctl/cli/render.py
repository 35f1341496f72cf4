"""Renderings for people (tables, timelines) of the services' views. Scripts use ``--json`` instead.

Tables keep ids whole, ellipsize titles and drop low-value columns first when the terminal is narrow
(``fleetctl.cli._common.table_lines``); piped output is never cut. Values never show as Python reprs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime

from fleetctl.cli._common import Col, human, output_width, print_fields, print_table, styled

STATE_STYLE = {
    "queued": "cyan", "assigned": "blue", "running": "yellow", "awaiting_review": "magenta",
    "completed": "green", "failed": "red", "cancelled": "dim",
}  # fmt: skip


def ts(value: str | float | None) -> float | None:
    """Seconds since the epoch from a view's ISO time (or a store row's float), None for None."""
    if value is None or isinstance(value, (int, float)):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ago(when: str | float | None, now: float | None = None) -> str:
    """'12s ago', '3m ago', 'in 20s' — or '' for None."""
    when = ts(when)
    if when is None:
        return ""
    delta = (now or time.time()) - when
    future = delta < 0
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            text = f"{delta / size:.0f}{unit}"
            break
    else:
        text = f"{delta:.0f}s"
    return f"in {text}" if future else f"{text} ago"


def clock(when: str | float | None, now: float | None = None) -> str:
    """Local wall-clock time: 'HH:MM:SS' today, 'MM-DD HH:MM' on another day."""
    when = ts(when)
    if when is None:
        return ""
    same_day = time.localtime(when)[:3] == time.localtime(now or time.time())[:3]
    return time.strftime("%H:%M:%S" if same_day else "%m-%d %H:%M", time.localtime(when))


def styled_state(state: str) -> str:
    """The state in rich markup (the demo's live table)."""
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


def _cell_style(column: str, value: str) -> str | None:
    return STATE_STYLE.get(value) if column in ("STATE", "STATUS", "OUTCOME") else None


def waits(task: dict, now: float) -> str:
    """'until 20:31:05 (in 25s)' for a queued task waiting out a retry backoff, else ''."""
    not_before = ts(task.get("not_before"))
    if task["state"] != "queued" or not_before is None or not_before <= now:
        return ""
    return f"until {clock(not_before, now)} ({ago(not_before, now)})"


def render_task_list(items: Sequence[dict], cursor: int | None) -> None:
    """``task list``: task views as a table; a queued task in backoff shows until when it waits."""
    now = time.time()
    backoff = [waits(t, now) for t in items]
    cols = [Col("ID", "id"), Col("STATE"), Col("PRI", drop=4), Col("ATTEMPT", drop=3), Col("AGENT", "id", drop=2),
            Col("NEEDS", drop=5), Col("TITLE", "text", min=24), Col("UPDATED", drop=6)]  # fmt: skip
    rows = [[t["task_id"], t["state"], t["priority"], f"{t['attempt']}/{t['max_attempts']}", t["agent_id"],
             t["requirements"], t["title"], ago(t["updated_at"], now)] for t in items]  # fmt: skip
    if any(backoff):
        cols.insert(2, Col("BACKOFF", drop=1))
        for row, b in zip(rows, backoff, strict=True):
            row.insert(2, b)
    print_table(None, cols, rows, _cell_style)
    if cursor is not None:
        from fleetctl.cli._common import err

        err(f"more: --after {cursor}")


def pull_request_text(pr: dict | None) -> str:
    """'acme/tool#12', '#12' when the repository is unknown, or the URL — never 'None#12'."""
    if not pr:
        return ""
    number = f"#{pr['number']}" if pr.get("number") is not None else ""
    text = f"{pr['repo']}{number}" if pr.get("repo") else number
    return text or pr.get("url") or ""


def workspace_text(attempt: dict) -> str:
    """Where an attempt's workspace is (``host:path``), or ``(cleaned TIME)`` once the sweep removed it."""
    if attempt.get("workspace_cleaned_at"):
        return f"(cleaned {attempt['workspace_cleaned_at']})"
    if not attempt.get("workspace"):
        return ""
    return f"{attempt['host_id']}:{attempt['workspace']}" if attempt.get("host_id") else attempt["workspace"]


def render_task(doc: dict) -> None:
    """``task show``: a task detail view (``services.task_detail``)."""
    now = time.time()
    failure = f"{doc['failure_reason']}: {doc['failure_detail']}" if doc["failure_reason"] else ""
    print_fields(
        f"task {doc['task_id']}",
        [
            ("state", styled(doc["state"], STATE_STYLE.get(doc["state"]))), ("title", doc["title"]),
            ("repo", f"{doc['repo']}#{doc['issue_number']}" if doc["repo"] else ""),
            ("labels", doc["labels"]), ("requires", doc["requirements"]),
            ("priority", doc["priority"]), ("attempt", f"{doc['attempt']} of {doc['max_attempts']}"),
            ("agent", doc["agent_id"]), ("lease expires", doc["lease_expires_at"]),
            ("not before", f"{doc['not_before']} (waits out a retry backoff: {ago(doc['not_before'], now)})"
             if waits(doc, now) else doc["not_before"]),
            ("failure", failure), ("pull request", pull_request_text(doc["pull_request"])),
            ("created", doc["created_at"]), ("updated", doc["updated_at"]),
        ],
    )  # fmt: skip
    if doc["attempts"]:
        print()
        print_table(
            "attempts",
            [Col("#"), Col("AGENT", "id"), Col("HOST", "id", drop=4), Col("OUTCOME"), Col("REASON", drop=1),
             Col("STARTED", drop=3), Col("ENDED", drop=2), Col("WORKSPACE", "text", drop=5, min=20)],
            ([a["attempt"], a["agent_id"], a["host_id"], a["outcome"] or "(open)", a["failure_reason"],
              a["started_at"], a["ended_at"], workspace_text(a)] for a in doc["attempts"]),
            _cell_style,
        )  # fmt: skip
    print()
    render_events(doc["events"], title="events")


def describe_event(ev: dict, short: bool = False) -> str:
    """A one-line human description of an event's data (``short``: without the retry arithmetic)."""
    d = ev["data"] or {}
    t = ev["type"]
    if t in ("task.requeued", "task.failed") and short:
        return f"{d.get('reason')}: {d.get('detail', '')}"
    if t == "task.started":
        return f"in {d['workspace']}" if d.get("workspace") else "running"
    if t == "task.created":
        return f"{d.get('title', '')!r} needs {human(d.get('requirements') or []) or 'nothing special'}"
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
    if t == "attempt.workspace_cleaned":
        return f"removed {d.get('host_id')}:{d.get('workspace')}"
    if t.startswith("agent."):
        return d.get("reason") or ", ".join(f"{k}={human(v)}" for k, v in d.items() if k != "token_hash")
    return json.dumps(d, sort_keys=True)[:120] if d else ""


#: The one event line format, for ``events`` (backlog and --follow alike), ``task show`` and ``agent show``.
EVENT_HEADER = ("ID", "TIME", "TYPE", "TASK", "DETAIL")  # TASK: the task, else the agent
_TYPE_WIDTH = 20  # task.awaiting_review, the longest type
_SUBJECT_WIDTH = 12  # a generated task id (t- and ten hex digits); longer ids are never cut, they push


def event_line(cells: Sequence[str], width: int | None) -> str:
    ident, when, kind, subject, detail = cells
    head = f"{ident:>6}  {when:<14}  {kind:<{_TYPE_WIDTH}}  {subject:<{_SUBJECT_WIDTH}}  "
    if width is not None and detail:
        detail = detail if len(head) + len(detail) <= width else detail[: max(width - len(head) - 1, 0)] + "…"
    return (head + detail).rstrip()


def event_cells(ev: dict) -> tuple[str, str, str, str, str]:
    when = time.strftime("%m-%d %H:%M:%S", time.localtime(ts(ev["ts"])))
    who = f"{ev['agent_id']}#{ev['attempt']}: " if ev["task_id"] and ev["agent_id"] and ev["attempt"] else ""
    detail = (who + describe_event(ev, short=True)).replace("\n", " ")
    return str(ev["id"]), when, ev["type"], ev["task_id"] or ev["agent_id"] or "", detail


def print_event_header() -> None:
    print(styled(event_line(EVENT_HEADER, None), "bold"))


def print_event(ev: dict) -> None:
    print(event_line(event_cells(ev), output_width()))


def render_events(events: Sequence[dict], title: str | None = None) -> None:
    """Events, one line each, in the one format (the agent and attempt go into the detail)."""
    if title:
        print(styled(title, "bold"))
    print_event_header()
    for ev in events:
        print_event(ev)


def _host_cell(agent: dict) -> str | None:
    """An agent's host, with "(down)" while dispatch skips it."""
    host = agent.get("host_id")
    return f"{host} (down)" if host and agent.get("host_status") == "down" else host


def cooldown(agent: dict, now: float) -> str:
    """'until 21:30:00 (in 12m)' while an agent rests after a usage limit, else ''."""
    until = ts(agent.get("cooldown_until"))
    if until is None or until <= now:
        return ""
    return f"until {clock(until, now)} ({ago(until, now)})"


def render_agents(items: Sequence[dict]) -> None:
    """``agent list``: agent views as a table."""
    now = time.time()
    print_table(
        None,
        [Col("AGENT", "id"), Col("TYPE", drop=3), Col("MODE", drop=4), Col("STATUS"), Col("COOLDOWN", drop=6),
         Col("RUNNING", drop=1), Col("CAPABILITIES", "text", min=14), Col("HOST", "id", drop=5),
         Col("HEARTBEAT", drop=2)],
        ([a["agent_id"], a["agent_type"], a["mode"], a["status"], cooldown(a, now),
          f"{a['running']}/{a['max_concurrency']}", a["capabilities"], _host_cell(a),
          ago(a.get("last_heartbeat_at"), now)] for a in items),
        _cell_style,
    )  # fmt: skip


OUTBOX_STYLE = {"pending": "yellow", "done": "green", "superseded": "dim", "dead": "red"}
MAX_ERROR_CELL = 80
"""``outbox list`` cuts a last error to this many characters even when piped (the whole one is in --json)."""


def render_outbox(doc: dict) -> None:
    """``outbox list``: rows newest first, then the count of every state."""
    now = time.time()

    def style(column: str, value: str) -> str | None:
        return OUTBOX_STYLE.get(value) if column == "STATE" else None

    def next_try(row: dict) -> str:
        return ago(row["next_try_at"], now) if row["state"] == "pending" else ""

    def error(row: dict) -> str:
        text = " ".join((row.get("last_error") or "").split())
        return text if len(text) <= MAX_ERROR_CELL else text[: MAX_ERROR_CELL - 1] + "…"

    print_table(
        None,
        [Col("ID", "id"), Col("STATE"), Col("TARGET", drop=4), Col("KIND"), Col("ISSUE", "id"), Col("TASK", "id", drop=3),
         Col("TRIES", drop=2), Col("NEXT TRY", drop=1), Col("LAST ERROR", "text", min=16)],
        ([r["id"], r["state"], r["target"], r["kind"], f"{r['repo']}#{r['issue_number']}" if r["repo"] else "",
          r["task_id"] or "", r["tries"], next_try(r), error(r)] for r in doc["items"]),
        style,
    )  # fmt: skip
    print(", ".join(f"{state} {n}" for state, n in doc["counts"].items()))
