"""SPEC §7.2 as pure functions: (the task an issue or pull request has now, a change) → one operation.

The webhook route, ``fleetctl ingest-webhook`` and ``fleetctl sync`` all describe what they saw as a
``webhooks.Change`` and let ``fleetctl.services.issues`` apply the ``Op`` decided here, so the three
cannot disagree. Every decision is idempotent: the same change seen twice (a replayed delivery, a sync
after a webhook) decides nothing the second time, and fleetctl's own write-back (its comments and
``fleet/…`` status labels, sent back by Forgejo as deliveries from its own account) changes nothing.

Rules, in an operator's words:
- an open issue with at least one ``agent:`` label has one active task: created when none is active,
  else kept up to date (title, body, requirements, priority, retries, timeout);
- the last ``agent:`` label removed (or every label cleared) cancels the active task; so does closing the
  issue — unless a merged pull request closed it (``commit_id`` set) while the task has a pull request:
  then that pull request completes the task;
- an issue re-opened, or re-labelled after its task failed or was cancelled, re-queues that task with a
  new attempt budget; after a completed task it gets a new task;
- a pull request whose head branch is ``fleet/<task-id>``, or that says ``Closes|Fixes|Resolves #N`` for
  a task's issue, is linked to the task; merged → the task completes; closed unmerged (the task's own pull
  request only) → the attempt fails ``pr_closed``, which is never retried automatically;
- "changes requested" on the task's own pull request while it awaits review → ``review_rejected`` (the review
  service decides: a rework, the ``needs_human`` flag past the cap, or nothing for a head already handled); an
  approval of it while flagged → the flag is cleared;
- pull requests never become tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleetctl.forgejo.webhooks import REVIEW_APPROVED, REVIEW_REJECTED, Change, Issue, Pull
from fleetctl.matching import parse_labels
from fleetctl.states import TERMINAL

MAX_TITLE, MAX_LABEL, MAX_LABELS = 1000, 200, 100  # a task's limits (services refuse more): an issue is cut to fit
STATUS_LABEL_PREFIX = "fleet/"
"""fleetctl's own status labels (``fleet/queued`` …): never part of a task's labels."""
BRANCH_PREFIX = "fleet/"
_CLOSES = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+#(\d{1,9})\b", re.IGNORECASE)
SYNC = "sync"
"""The event type of the changes ``fleetctl sync`` reads from the API (an issue's or pull request's state now)."""
CLOSED_REASON = "the issue was closed"


@dataclass(frozen=True)
class Op:
    """What to do: ``kind`` is one of create, update, cancel, requeue, link_pr, complete, fail_pr_closed, none."""

    kind: str
    why: str
    task_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def task_labels(labels: tuple[str, ...] | list[str]) -> list[str]:
    """An issue's labels as a task keeps them: without fleetctl's own status labels, stripped, unique."""
    out: list[str] = []
    for label in labels:
        label = label.strip()
        if not label or label.startswith(STATUS_LABEL_PREFIX) or label in out:
            continue
        if len(label) <= MAX_LABEL and not any(c in label for c in "\0\n\r"):  # what a task may keep
            out.append(label)
    return out[:MAX_LABELS]


def issue_fields(issue: Issue, prefix: str) -> dict[str, Any]:
    """The task fields an issue determines: title, body, labels and what the labels say."""
    labels = task_labels(issue.labels)
    knobs = parse_labels(labels, prefix)
    return {"title": issue.title.strip()[:MAX_TITLE] or f"issue #{issue.number}", "body": issue.body, "labels": labels,
            "requirements": list(knobs.requirements), "priority": knobs.priority,
            "max_retries": knobs.max_retries, "timeout_secs": knobs.timeout_secs,
            "max_review_rounds": knobs.max_review_rounds}  # fmt: skip


def _differs(task: dict, fields: dict) -> dict[str, Any]:
    """The fields of ``fields`` whose value differs from the task's (max_retries compared by max_attempts)."""
    out = {k: v for k, v in fields.items() if k in ("title", "body", "requirements", "priority", "timeout_secs",
                                                    "max_review_rounds")
           and task.get(k) != v}  # fmt: skip
    if sorted(task.get("labels") or []) != sorted(fields["labels"]) and (out or _knobs_changed(task, fields)):
        out["labels"] = fields["labels"]
    return out


def _knobs_changed(task: dict, fields: dict) -> bool:
    return task.get("requirements") != fields["requirements"] or task.get("priority") != fields["priority"]


def issue_op(change: Change, active: dict | None, last: dict | None, *, prefix: str, bot: str | None) -> Op:
    """The operation for an issue change. ``active``: the issue's task that is not terminal (at most one);
    ``last``: its most recent task in any state (the one a re-open or re-label re-queues), with
    ``cancel_reason`` when it was cancelled."""
    issue = change.issue
    assert issue is not None
    fields = issue_fields(issue, prefix)
    own = bool(bot) and change.sender == bot and change.event_type == "issue_label"
    if own and active is not None and not _differs(active, fields):  # it changed fleet/… labels only
        return Op("none", f"a label change by fleetctl's own account ({bot}): its own write-back")
    wanted = bool(fields["requirements"])
    if issue.state == "closed":
        if active is None:
            return Op("none", "the issue is closed and has no active task")
        if change.commit_id and (active.get("pull_request") or active["state"] == "awaiting_review"):
            return Op("none", "closed by a merged commit: the pull request completes the task", active["task_id"])
        return Op("cancel", CLOSED_REASON, active["task_id"])
    if not wanted:
        if active is None:
            return Op("none", f"no {prefix} label")
        # the task keeps the labels it was cancelled with, so that labelling the issue again is a re-label
        return Op("cancel", f"the last {prefix} label was removed", active["task_id"],
                  {"labels": fields["labels"], "requirements": []})  # fmt: skip
    if active is not None:
        changed = _differs(active, fields)
        if not changed:
            return Op("none", "the task is up to date", active["task_id"])
        return Op("update", "the issue changed: " + ", ".join(sorted(changed)), active["task_id"], changed)
    if last is None:
        return Op("create", f"an open issue with {prefix} labels and no task", fields=fields)
    relabelled = change.event_type in ("issue_label", SYNC) and last.get("requirements") != fields["requirements"]
    # sync sees no "reopened": an open issue whose task was cancelled because the issue closed was re-opened
    reopened = change.action == "reopened" or (change.event_type == SYNC and last["state"] == "cancelled"
                                               and last.get("cancel_reason") == CLOSED_REASON)  # fmt: skip
    if change.action == "opened" or reopened or relabelled:
        if last["state"] in ("failed", "cancelled"):
            return Op("requeue", f"the issue was {'re-opened' if reopened else 're-labelled'}", last["task_id"],
                      fields)  # fmt: skip
        return Op("create", f"the issue was {change.action.replace('_', ' ')} after its task completed",
                  fields=fields)  # fmt: skip
    return Op("none", f"the issue's last task is {last['state']}; re-open or re-label the issue to run it again",
              last["task_id"])  # fmt: skip


COMMANDS = ("retry", "cancel", "rework")
"""What ``/fleet <command>`` in a comment may ask (``forgejo.comment_commands``)."""
_COMMAND = re.compile(r"^/fleet(?=\s|$)\s*(\S*)(.*)$", re.IGNORECASE)


def comment_command(body: str) -> tuple[str, str] | None:
    """The ``/fleet`` command of a comment: its first line that starts with ``/fleet``, as ``(command, the rest
    of the comment)`` — command lower-cased, ``"?word"`` for an unknown one — or None when there is none.

    Example: ``comment_command("/fleet rework\nuse the new API")`` → ``("rework", "use the new API")``.
    """
    lines = (body or "").splitlines()
    for i, line in enumerate(lines):
        m = _COMMAND.match(line.strip())
        if m is None:
            continue
        word = (m.group(1) or "").lower()
        rest = "\n".join([m.group(2).strip(), *lines[i + 1 :]]).strip()
        return (word if word in COMMANDS else f"?{word}"), rest
    return None


def branch_task_id(branch: str) -> str | None:
    """The task id in a head branch ``fleet/<task-id>`` (or ``owner:fleet/<task-id>``), else None."""
    branch = branch.rpartition(":")[2]
    if not branch.startswith(BRANCH_PREFIX):
        return None
    task_id = branch[len(BRANCH_PREFIX) :]
    return task_id or None


def closing_refs(pull: Pull) -> list[int]:
    """Issue numbers a pull request says it closes (``Closes #N``, ``Fixes #N``, ``Resolves #N``)."""
    seen: list[int] = []
    for text in (pull.title, pull.body):
        for m in _CLOSES.finditer(text or ""):
            n = int(m.group(1))
            if n not in seen:
                seen.append(n)
    return seen


def references_task(pull: Pull, task: dict) -> bool:
    """Whether a pull request points at ``task``: its branch (in the task's repository, not a fork's), or a
    closing reference to the task's issue."""
    if branch_task_id(pull.head_branch) == task["task_id"] and not pull.from_fork(task.get("repo") or ""):
        return True
    return task.get("issue_number") is not None and task["issue_number"] in closing_refs(pull)


def pull_op(change: Change, task: dict) -> Op:
    """The operation for a pull request change on the task it references."""
    pull = change.pull
    assert pull is not None
    tid = task["task_id"]
    if task["state"] in TERMINAL:
        return Op("none", f"the task is {task['state']}", tid)
    if change.event_type in (REVIEW_REJECTED, REVIEW_APPROVED):
        return _review_op(change, task)
    link = pull.link(change.repo or task.get("repo") or "")
    own = _is_tasks_pull(pull, task)
    if pull.merged:
        if task["state"] == "queued":  # between attempts: no attempt can complete, and the work is merged
            return Op("cancel", f"pull request #{pull.number} was merged while the task waited for an attempt", tid)
        return Op("complete", f"pull request #{pull.number} was merged", tid, {"pull_request": link})
    if pull.state == "closed":
        if not own:
            return Op("none", f"pull request #{pull.number} was closed but is not the task's own", tid)
        if task["state"] == "queued":
            return Op("none", f"pull request #{pull.number} was closed; the task is queued for a new attempt", tid)
        return Op("fail_pr_closed", f"pull request #{pull.number} was closed without merging", tid,
                  {"pull_request": link})  # fmt: skip
    if _same_link(task.get("pull_request"), link):
        return Op("none", f"pull request #{pull.number} is already linked", tid)
    if task.get("pull_request") and not own and task["pull_request"].get("number") != pull.number:
        return Op("none", f"the task already has pull request #{task['pull_request'].get('number')}", tid)
    return Op("link_pr", f"pull request #{pull.number} references the task", tid, {"pull_request": link})


def _review_op(change: Change, task: dict) -> Op:
    """A review of a pull request that references ``task``: only the task's own, while it awaits review, counts."""
    pull, tid = change.pull, task["task_id"]
    if task["state"] != "awaiting_review" or not _is_tasks_pull(pull, task):
        return Op("none", f"a review of pull request #{pull.number}, which the task is not awaiting", tid)
    if change.event_type == REVIEW_APPROVED:
        if task.get("needs_human"):
            return Op("clear_needs_human", f"pull request #{pull.number} was approved", tid)
        return Op("none", f"pull request #{pull.number} was approved; the task waits for the merge", tid)
    if not pull.head_sha:
        return Op("none", f"changes were requested on pull request #{pull.number}, but its head commit is unknown", tid)
    review = {"pr": pull.number, "head_sha": pull.head_sha, "body": change.review or "", "reviewer": change.sender}
    if change.review_id is not None:
        review["review_id"] = change.review_id
    return Op("review_rejected", f"changes were requested on pull request #{pull.number}", tid, {"review": review})


def _is_tasks_pull(pull: Pull, task: dict) -> bool:
    """The task's own pull request: on its branch ``fleet/<task-id>`` in its repository, or the one its
    accepted receipt named (the task awaits its review). A person's ``Fixes #N`` linked on the way is not."""
    if branch_task_id(pull.head_branch) == task["task_id"] and not pull.from_fork(task.get("repo") or ""):
        return True
    linked = task.get("pull_request") or {}
    return task["state"] == "awaiting_review" and linked.get("number") == pull.number


def _same_link(current: dict | None, link: dict) -> bool:
    if not current:
        return False
    keys = ("number", "head_sha", "state", "url")
    return all(current.get(k) == link.get(k) for k in keys if link.get(k) is not None)
