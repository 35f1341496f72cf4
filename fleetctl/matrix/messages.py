"""What fleetctl says in the Matrix room, as data: the text and HTML of one event's message (SPEC §9).

Pure: ``message_for`` turns one committed event (and its task row) into ``(body, html)`` or None; nothing
here sends anything. ``KINDS`` are the event kinds that can be announced (``[matrix] events`` picks among
them); ``FIELDS`` are the placeholders of an operator's ``[matrix] template``.

The HTML is built from escaped parts only: every value that comes from a task, an agent or Forgejo goes
through ``html.escape``, and a link is made only of an ``http(s)`` URL. So an issue titled
``<img src=x onerror=…>`` shows as that text, never as markup.
"""

from __future__ import annotations

import html
from typing import Any

KINDS: dict[str, str] = {
    "task.created": "a task was created",
    "task.assigned": "a task was given to an agent",
    "task.requeued": "an attempt failed and the task waits for a retry",
    "task.failed": "a task failed for good (its retries used up, or a failure that is not retried)",
    "task.awaiting_review": "an agent opened a pull request: it waits for review and merge",
    "task.completed": "a task completed (its pull request merged, or its receipt accepted)",
    "task.cancelled": "a task was cancelled",
    "task.rework": "changes were requested on a task's pull request: a rework attempt is queued",
    "task.needs_human": "a task's pull request used up its review rounds: a person must look",
    "agent.offline": "an agent went offline (missed heartbeats, deregistered or removed from the config)",
    "agent.online": "an agent came (back) online",
    "host.down": "an SSH host was marked down (unreachable)",
    "host.up": "an SSH host is reachable again",
}
"""The event kinds a ``[matrix] events`` list may name, with what each announces."""

DEFAULT_KINDS = ("task.failed", "task.awaiting_review", "task.completed", "task.needs_human", "agent.offline")
"""What is announced when ``[matrix] events`` is not set (SPEC §4)."""

FIELDS = (
    "kind", "what", "task_id", "title", "attempt", "agent_id", "host_id", "reason", "detail", "summary", "repo",
    "issue_number", "issue", "issue_url", "pr_number", "pr_url",
)  # fmt: skip
"""The placeholders a ``[matrix] template`` may use (each is text, empty when the event has no such value)."""

MAX_TEXT = 300
"""A free-text value (title, failure detail, summary) is cut to this many characters in a message."""
MAX_URL = 500
"""A longer link (from an agent's receipt) is left out rather than cut into a broken one."""
MAX_MESSAGE = 2000
"""A message (a template can make long ones) is cut to this many characters; its HTML is then the cut text."""

_WHAT = {
    "task.created": "was created",
    "task.assigned": "was given to",
    "task.requeued": "failed an attempt and waits for a retry",
    "task.failed": "failed",
    "task.awaiting_review": "awaits review",
    "task.completed": "completed",
    "task.cancelled": "was cancelled",
    "task.rework": "goes back for rework (changes requested)",
    "task.needs_human": "needs a person (its review rounds are used up)",
    "agent.offline": "went offline",
    "agent.online": "is online",
    "host.down": "is down",
    "host.up": "is up again",
}
_MARK = {"task.failed": "❌", "task.completed": "✅", "task.awaiting_review": "👀", "agent.offline": "⚠️",
         "host.down": "⚠️", "task.requeued": "🔁", "task.rework": "🔁", "task.needs_human": "🙋"}  # fmt: skip


def fields_for(event: dict, task: dict | None, forgejo_url: str | None = None) -> dict[str, str]:
    """Every ``FIELDS`` value for ``event`` (plain text, not escaped), from the event and its task."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    task = task or {}
    kind = event["type"]
    repo, number = task.get("repo"), task.get("issue_number")
    base = (forgejo_url or "").rstrip("/")
    pr = data.get("pull_request") if isinstance(data.get("pull_request"), dict) else {}
    pr_number = pr.get("number") if isinstance(pr.get("number"), int) else None
    review = data.get("review") if isinstance(data.get("review"), dict) else data  # task.rework / task.needs_human
    if pr_number is None and isinstance(review.get("pr"), int):
        pr_number = review["pr"]
    pr_url = pr.get("html_url") or pr.get("url") or ""
    if not pr_url and pr_number is not None and base and (pr.get("repo") or repo):
        pr_url = f"{base}/{pr.get('repo') or repo}/pulls/{pr_number}"
    receipt = data.get("receipt") if isinstance(data.get("receipt"), dict) else {}
    attempt = event.get("attempt")
    values = {
        "kind": kind,
        "what": _WHAT.get(kind, kind),
        "task_id": event.get("task_id") or "",
        "title": task.get("title") or "",
        "attempt": str(attempt) if attempt else "",
        "agent_id": event.get("agent_id") or "",
        "host_id": data.get("host_id") or "",
        "reason": data.get("reason") or "",
        "detail": data.get("detail") or data.get("error") or "",
        "summary": receipt.get("summary") or "",
        "repo": repo or "",
        "issue_number": str(number) if number else "",
        "issue": f"{repo}#{number}" if repo and number else "",
        "issue_url": f"{base}/{repo}/issues/{number}" if base and repo and number else "",
        "pr_number": str(pr_number) if pr_number is not None else "",
        "pr_url": str(pr_url),
    }
    for key in ("issue_url", "pr_url"):
        if len(values[key]) > MAX_URL:
            values[key] = ""
    return {k: _clip(v) if k in ("title", "detail", "summary", "reason") else _one_line(v) for k, v in values.items()}


def message_for(event: dict, task: dict | None, *, forgejo_url: str | None = None,
                template: str | None = None) -> tuple[str, str] | None:  # fmt: skip
    """The message announcing ``event``: ``(body, html)``, or None when its kind is not one of ``KINDS``.

    Example: a ``task.failed`` event of task ``t-1`` ("Fix the parser", issue ``o/r#12``) gives
    ``("❌ Task t-1 failed on attempt 3 (agent_error: exit 3) — Fix the parser — o/r#12 https://…", "…")``.
    """
    if event.get("type") not in KINDS:
        return None
    f = fields_for(event, task, forgejo_url)
    if template:
        body, markup = template.format_map(f), _html_template(template, f)
    else:
        parts = _parts(event["type"], f)
        body = " ".join(text for text, _ in parts if text)
        markup = " ".join(markup for text, markup in parts if text)
    if len(body) > MAX_MESSAGE or len(markup) > 2 * MAX_MESSAGE:
        body = body[: MAX_MESSAGE - 1] + "…" if len(body) > MAX_MESSAGE else body
        markup = _e(body)  # cutting HTML could leave a tag open: the cut text alone, escaped
    return body, markup


def batch_message(messages: list[tuple[str, str]]) -> tuple[str, str]:
    """Several messages as one (a flush sends a burst as a few messages, not one each): one line each."""
    if len(messages) == 1:
        return messages[0]
    return "\n".join(b for b, _ in messages), "<br>\n".join(h for _, h in messages)


# ------------------------------------------------------------------------------------------- building


def _parts(kind: str, f: dict[str, str]) -> list[tuple[str, str]]:
    """The message as (text, html) parts, joined by spaces."""
    mark = _MARK.get(kind, "")
    parts: list[tuple[str, str]] = [(mark, mark)] if mark else []
    if kind.startswith("task."):
        parts.append((f"Task {f['task_id']}", f"Task <code>{_e(f['task_id'])}</code>"))
        what = f["what"] + (f" {f['agent_id']}" if kind == "task.assigned" and f["agent_id"] else "")
        html_what = _e(f["what"]) + (f" <code>{_e(f['agent_id'])}</code>" if kind == "task.assigned" else "")
        if f["attempt"] and kind in ("task.failed", "task.requeued", "task.awaiting_review", "task.assigned"):
            what += f" (attempt {f['attempt']})"
            html_what += f" (attempt {_e(f['attempt'])})"
        parts.append((what, html_what))
        why = ": ".join(x for x in (f["reason"], f["detail"]) if x)
        if why and kind in ("task.failed", "task.requeued", "task.cancelled"):
            parts.append((f"({why})", f"(<code>{_e(f['reason'])}</code>{': ' + _e(f['detail']) if f['detail'] else ''})"
                          if f["reason"] else f"({_e(why)})"))  # fmt: skip
        if f["pr_number"] or f["pr_url"]:
            label = f"pull request #{f['pr_number']}" if f["pr_number"] else "pull request"
            verb = "merged" if kind == "task.completed" else ""
            parts.append(("—", "—"))
            parts.append((f"{label} {f['pr_url']}".strip() + (f" {verb}" if verb else ""),
                          _link(label, f["pr_url"]) + (f" {verb}" if verb else "")))  # fmt: skip
        elif f["summary"] and kind == "task.completed":
            parts.append((f"— {f['summary']}", f"— {_e(f['summary'])}"))
        if f["title"]:
            parts.append((f"— {f['title']}", f"— <b>{_e(f['title'])}</b>"))
        if f["issue"]:
            parts.append((f"— {f['issue']} {f['issue_url']}".rstrip(), "— " + _link(f["issue"], f["issue_url"])))
    elif kind.startswith("agent."):
        parts.append((f"Agent {f['agent_id']} {f['what']}", f"Agent <code>{_e(f['agent_id'])}</code> {_e(f['what'])}"))
        if f["reason"]:
            parts.append((f"({f['reason']})", f"({_e(f['reason'])})"))
    else:  # host.*
        parts.append((f"Host {f['host_id']} {f['what']}", f"Host <code>{_e(f['host_id'])}</code> {_e(f['what'])}"))
        if f["detail"]:
            parts.append((f"({f['detail']})", f"({_e(f['detail'])})"))
    return parts


def _html_template(template: str, f: dict[str, str]) -> str:
    """An operator's template as HTML: its literal text and every value escaped; URL fields become links."""
    import string

    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(_e(literal))
        if name is None:
            continue
        value = string.Formatter().format_field(string.Formatter().convert_field(f[name], conversion), spec or "")
        out.append(_link(value, value) if name in ("issue_url", "pr_url") and value else _e(value))
    return "".join(out)


def _link(text: str, url: str) -> str:
    """``<a href="url">text</a>`` when ``url`` is an http(s) URL, else the escaped text alone."""
    if url.lower().startswith(("http://", "https://")) and not any(c.isspace() for c in url):
        return f'<a href="{_e(url)}">{_e(text)}</a>'
    return _e(text)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _clip(text: Any) -> str:
    text = _one_line(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"
