"""Side effects of events, as data: which Forgejo comment or status label, and which Matrix message, an event
calls for (SPEC §7.3, §9).

Pure: ``effects_for`` and ``matrix_effects`` turn one committed event (and its task row) into outbox rows;
they perform nothing.
``fleetctl.outbox`` derives these rows from the event log by a cursor and performs them later. Keeping the
decision here, apart from the I/O, means it is tested table-driven and the same event always gives the
same rows — so re-deriving after a crash inserts nothing new (the outbox is unique on event, target, kind).

The task row may be the task as it is *now* (read when the effects are derived, possibly long after the
event): so what a comment says (agent, attempt, reason, pull request) comes from the event; the task only
says where the issue is.
"""

from __future__ import annotations

from typing import Any

from fleetctl.config import ForgejoConfig, MatrixConfig

TARGET = "forgejo"
COMMENT = "comment"
STATUS_LABEL = "status_label"
FLAG_LABEL = "flag_label"
NEEDS_HUMAN_LABEL = "fleet/needs-human"
NEEDS_HUMAN_COLOR = ("#e99695", "fleetctl: its review rounds are used up; a person must look")
MATRIX = "matrix"
MESSAGE = "message"

#: The status labels fleetctl keeps on an issue (exactly one at a time): name -> (colour, description).
#: ``fleet/needs-human`` is not among them: it is a flag beside the status, not a status.
STATUS_LABELS: dict[str, tuple[str, str]] = {
    "fleet/queued": ("#c5def5", "fleetctl: waiting for an agent"),
    "fleet/running": ("#fbca04", "fleetctl: an agent is working on it"),
    "fleet/review": ("#d4c5f9", "fleetctl: pull request waiting for review"),
    "fleet/done": ("#0e8a16", "fleetctl: completed"),
    "fleet/failed": ("#b60205", "fleetctl: failed, needs a person"),
}
#: Event type -> the status label it puts on the issue (None: take fleetctl's label off).
_LABEL_OF: dict[str, str | None] = {
    "task.created": "fleet/queued",
    "task.requeued": "fleet/queued",
    "task.retried": "fleet/queued",
    "task.rate_limited": "fleet/queued",
    "task.rework": "fleet/queued",
    "task.assigned": "fleet/running",
    "task.started": "fleet/running",
    "task.awaiting_review": "fleet/review",
    "task.completed": "fleet/done",
    "task.failed": "fleet/failed",
    "task.cancelled": None,
}
#: Re-queues that are not a failed attempt: nobody needs to look (a review asked for rework; a usage limit).
_NOT_ATTENTION = frozenset({"rework", "rate_limited"})
MAX_DETAIL = 500
"""A failure detail is cut to this many characters in a comment (the full text stays in the event)."""


def marker(event_id: int) -> str:
    """The hidden marker a comment for event ``event_id`` ends with: a re-post finds it and does not repeat."""
    return f"<!-- fleetctl:event:{int(event_id)} -->"


def effects_for(event: dict, task: dict | None, forgejo: ForgejoConfig) -> list[dict]:
    """The outbox rows event ``event`` calls for (``[]`` when none): a comment and/or a status label.

    Only for a task of an issue (``repo`` and ``issue_number``) and only with Forgejo configured.
    Example: a ``task.failed`` event gives a comment row (reason and detail) and a ``fleet/failed`` row.
    """
    if event["type"] == "command.reply":  # an answer to a /fleet comment: on the issue it was written on
        data = event.get("data") or {}
        if not forgejo.url or not data.get("repo") or not data.get("number"):
            return []
        where = {"task_id": event.get("task_id"), "repo": data["repo"], "issue_number": data["number"]}
        return [_row(event, where, COMMENT, {"body": f"**fleetctl**: {data['text']}\n\n" + marker(event["id"])})]
    if not forgejo.url or not task or not task.get("repo") or not task.get("issue_number"):
        return []
    rows = []
    if forgejo.comments:
        body = comment_body(event, task, forgejo.url, commands=forgejo.comment_commands)
        if body is not None:
            rows.append(_row(event, task, COMMENT, {"body": body + "\n\n" + marker(event["id"])}))
    if forgejo.status_labels and event["type"] in _LABEL_OF:
        rows.append(_row(event, task, STATUS_LABEL, {"label": _LABEL_OF[event["type"]]}))
    if event["type"] in ("task.needs_human", "task.needs_human_cleared"):  # a flag beside the status, always kept
        rows.append(_row(event, task, FLAG_LABEL, {"label": NEEDS_HUMAN_LABEL,
                                                   "on": event["type"] == "task.needs_human"}))  # fmt: skip
    return rows


def matrix_effects(event: dict, task: dict | None, matrix: MatrixConfig, forgejo_url: str | None = None) -> list[dict]:
    """The Matrix message row event ``event`` calls for (``[]`` when none): only for the kinds in
    ``matrix.events``, and only with Matrix configured (a homeserver and a room)."""
    from fleetctl.matrix.messages import message_for

    if not matrix.enabled or event["type"] not in matrix.events:
        return []
    message = message_for(event, task, forgejo_url=forgejo_url, template=matrix.template)
    if message is None:
        return []
    task = task or {}
    payload = {"body": message[0], "html": message[1], "event": event["type"]}
    return [{"event_id": event["id"], "target": MATRIX, "kind": MESSAGE, "task_id": event.get("task_id"),
             "repo": task.get("repo"), "issue_number": task.get("issue_number"), "payload": payload, "ts": event["ts"]}]  # fmt: skip


def _row(event: dict, task: dict, kind: str, payload: dict[str, Any]) -> dict:
    return {"event_id": event["id"], "target": TARGET, "kind": kind, "task_id": task["task_id"],
            "repo": task["repo"], "issue_number": task["issue_number"], "payload": payload, "ts": event["ts"]}  # fmt: skip


def comment_body(event: dict, task: dict, forgejo_url: str, *, commands: bool = False) -> str | None:
    """The Markdown of the comment an event announces on its issue (without the marker), or None. ``commands``:
    ``/fleet`` comment commands are on (a comment may suggest one)."""
    data = event.get("data") or {}
    attempt = event.get("attempt")
    kind = event["type"]
    if kind == "task.assigned":
        return f"**fleetctl**: assigned to agent `{_code(event.get('agent_id'))}` (attempt {attempt})."
    if kind == "task.requeued" and data.get("reason") and data["reason"] not in _NOT_ATTENTION:
        return (f"**fleetctl**: needs attention: attempt {attempt} failed (`{_code(data['reason'])}`)"
                f"{_detail(data)}; retrying after backoff.")  # fmt: skip
    if kind == "task.failed":
        return f"**fleetctl**: the task failed on attempt {attempt} (`{_code(data.get('reason'))}`){_detail(data)}."
    if kind == "task.awaiting_review":
        return (f"**fleetctl**: attempt {attempt} opened {_pr_link(data.get('pull_request'), task, forgejo_url)}; "
                "waiting for review and merge.")  # fmt: skip
    if kind == "task.completed":
        return f"**fleetctl**: the task is completed{_completion(data, task, forgejo_url)}."
    if kind == "task.rework":
        review = data.get("review") if isinstance(data.get("review"), dict) else {}
        pr = {"number": review.get("pr"), "repo": task["repo"]}
        return (f"**fleetctl**: changes were requested on {_pr_link(pr, task, forgejo_url)}; a rework attempt "
                f"(review round {review.get('round', '?')}) is queued with the review's comments.")  # fmt: skip
    if kind == "task.needs_human":
        pr = {"number": data.get("pr"), "repo": task["repo"]}
        # a task awaiting review cannot be retried (only failed or cancelled ones): never suggest it
        again = "comment `/fleet rework` for one more rework attempt, " if commands else ""
        return (f"**fleetctl**: changes were requested on {_pr_link(pr, task, forgejo_url)} again, and its "
                f"{data.get('max_review_rounds', '?')} review rounds are used up: this needs a person. Approve or "
                f"merge the pull request (pushing the fix yourself, if you like), {again}or cancel the task "
                f"(label `{NEEDS_HUMAN_LABEL}`).")  # fmt: skip
    return None


def _pr_link(pr: Any, task: dict, forgejo_url: str) -> str:
    """``[pull request #12](URL)``: the receipt's URL, else one built from the repository and number."""
    if not isinstance(pr, dict):
        return "a pull request"
    number = pr.get("number")
    url = pr.get("html_url") or pr.get("url")
    repo = pr.get("repo") or task["repo"]
    if not url and isinstance(number, int):
        url = f"{forgejo_url.rstrip('/')}/{repo}/pulls/{number}"
    text = f"pull request #{number}" if isinstance(number, int) else "a pull request"
    return f"[{text}]({_plain(str(url))})" if url else text


def _completion(data: dict, task: dict, forgejo_url: str) -> str:
    """What completed it: the merged pull request, or the receipt's summary."""
    if isinstance(data.get("pull_request"), dict):
        return f" ({_pr_link(data['pull_request'], task, forgejo_url)} merged)"
    summary = (data.get("receipt") or {}).get("summary") if isinstance(data.get("receipt"), dict) else None
    return f": {_clip(summary)}" if summary else ""


def _detail(data: dict) -> str:
    return f": {_clip(data['detail'])}" if data.get("detail") else ""


def _clip(text: Any) -> str:
    """One line of at most ``MAX_DETAIL`` characters, never able to fake another event's marker."""
    text = " ".join(str(text).split())
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 1] + "…"
    return _plain(text)


def _plain(text: str) -> str:
    # "<!--" in agent-written text could hide the rest of the comment or forge a marker of another event
    return text.replace("<!--", "&lt;!--").replace("-->", "--&gt;")


def _code(text: Any) -> str:
    return str(text).replace("`", "'")
