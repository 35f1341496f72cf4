"""Task operations an operator (CLI, admin API) or the issue mapping performs: create, cancel, retry, rework."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fleetctl.config import OrchestratorConfig
from fleetctl.errors import Conflict, UsageError
from fleetctl.ids import check_repo, check_task_id, new_task_id
from fleetctl.matching import parse_labels
from fleetctl.services._common import (
    MAX_BODY,
    MAX_LABEL,
    MAX_LABELS,
    MAX_MESSAGE,
    MAX_TITLE,
    check_positive_int,
    check_text,
    get_task,
    now_or,
)
from fleetctl.states import Transition, next_state
from fleetctl.store import Store


def check_labels(labels: Iterable[Any]) -> list[str]:
    """Labels: non-empty strings without control characters, stripped, unique, at most ``MAX_LABELS``."""
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


def transition(store: Store, task: dict, kind: Transition, ts: float, *, data: dict | None = None,
               attempt: int | None = None, agent_id: str | None = None) -> dict:  # fmt: skip
    """Check the table, emit ``task.<kind>``, return the new task row. Inside ``store.write()``.

    The reducer checks the table again where the data is (``projections.apply``): this first check
    only gives the caller the operator-worded refusal before anything is written.
    """
    next_state(task["state"], kind)
    if task.get("needs_human") and kind in _ENDS_NEEDS_HUMAN:  # the flag (and its label) goes with it
        store.emit("task.needs_human_cleared", ts=ts, task_id=task["task_id"], data={"why": f"task {kind.value}"})
    store.emit(f"task.{kind.value}", ts=ts, task_id=task["task_id"], attempt=attempt, agent_id=agent_id,
               data=data or {})  # fmt: skip
    return store.task(task["task_id"])


_ENDS_NEEDS_HUMAN = frozenset({Transition.COMPLETED, Transition.CANCELLED, Transition.FAILED, Transition.REQUEUED,
                               Transition.REWORK})  # fmt: skip


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
    strict: bool = True,
    now: float | None = None,
) -> dict:
    """Create a queued task; requirements, priority, retries and timeout come from its labels.

    A knob label that does not parse (``retries:-1``, ``timeout:soon``) refuses the task when ``strict``
    (the CLI and the API: the caller can fix it); otherwise (an issue from Forgejo, which cannot be
    refused) the default is used and the problem is kept as a warning. Warnings (also: a label that
    looks like a misspelt requirement) are recorded in the ``task.created`` event and returned in the
    row's ``"warnings"``.

    Example: ``create_task(store, orch, title="Fix CI", labels=["agent:code:python", "priority:5"])``.
    """
    title = check_text(title, "title", MAX_TITLE, required=True)
    body = check_text(body, "body", MAX_BODY)
    labels = check_labels(labels)
    if (repo is None) != (issue_number is None):
        raise UsageError("a repository and an issue number go together (--repo and --issue)", code="invalid_field")
    if repo is not None:
        check_repo(repo)
        check_positive_int(issue_number, "issue number")
    task_id = check_task_id(task_id) if task_id is not None else new_task_id()
    knobs = parse_labels(labels, orch.requirement_prefix)
    if knobs.problems and strict:
        raise UsageError("; ".join(knobs.problems), code="invalid_label")
    warnings = [*knobs.problems, *knobs.warnings]
    retries = knobs.max_retries if knobs.max_retries is not None else orch.default_max_retries
    ts = now_or(now)
    with store.write():
        if store.task(task_id) is not None:
            raise Conflict(f"task {task_id!r} already exists", code="task_exists")
        if repo is not None:
            active = store.active_task_for_issue(repo, issue_number)
            if active:
                raise Conflict(f"{repo}#{issue_number} already has an active task {active}", code="task_exists")
        data = {
            "title": title, "body": body, "labels": labels, "requirements": list(knobs.requirements),
            "priority": knobs.priority, "repo": repo, "issue_number": issue_number,
            "max_attempts": 1 + retries, "timeout_secs": knobs.timeout_secs,
        }  # fmt: skip
        if knobs.max_review_rounds is not None:
            data["max_review_rounds"] = knobs.max_review_rounds
        if warnings:
            data["warnings"] = warnings
        store.emit("task.created", ts=ts, task_id=task_id, data=data)
        return {**store.task(task_id), "warnings": warnings}


def cancel_task(store: Store, task_id: str, reason: str = "cancelled by operator", *,
                now: float | None = None, by: str | None = None) -> dict:  # fmt: skip
    """Cancel a task that is not terminal (``by``: who asked, kept in the event, e.g. ``"@alice via /fleet
    cancel"``)."""
    reason = check_text(reason, "reason", MAX_MESSAGE)
    with store.write():
        task = get_task(store, task_id)
        data = {"reason": reason, **({"by": by} if by else {})}
        return transition(store, task, Transition.CANCELLED, now_or(now), data=data)


def retry_task(store: Store, orch: OrchestratorConfig, task_id: str, *, now: float | None = None,
               by: str | None = None) -> dict:  # fmt: skip
    """Re-queue a failed or cancelled task with a fresh attempt budget (``1 + retries`` more attempts); ``by``
    as in ``cancel_task``."""
    with store.write():
        task = get_task(store, task_id)
        next_state(task["state"], Transition.RETRIED)
        if task["repo"] and task["issue_number"]:
            active = store.active_task_for_issue(task["repo"], task["issue_number"], exclude=task_id)
            if active:
                raise Conflict(f"{task['repo']}#{task['issue_number']} already has an active task {active}")
        knobs = parse_labels(task["labels"], orch.requirement_prefix)
        retries = knobs.max_retries if knobs.max_retries is not None else orch.default_max_retries
        return transition(store, task, Transition.RETRIED, now_or(now),
                          data={"max_attempts": task["attempt"] + 1 + retries, **({"by": by} if by else {})})  # fmt: skip


def rework_task(
    store: Store, task_id: str, review: dict, *, now: float | None = None, expect_pending: dict | None = None
) -> dict | None:
    """awaiting_review → queued as a ``rework`` attempt that carries ``review`` (SPEC §2 ``rework``): not a
    failure, one more attempt allowed, ``review_rounds`` + 1, the ``needs_human`` flag cleared.

    The one write of a rework, for every caller (a review asking for changes, sync, ``/fleet rework``);
    whether one is due (the round cap, one per pull request head) is the caller's decision. ``review`` is
    what the next attempts' prompts show: ``{"body", "comments": [{"path", "line", "body"}], "pr",
    "head_sha", "reviewer", "round"}`` (any of them may be missing). With ``expect_pending``, only if that is
    still the task's pending rejection (``review_pending``), else None and nothing is written.
    """
    with store.write():
        task = get_task(store, task_id)
        if expect_pending is not None and (
            task["review_pending"] != expect_pending or task["state"] != "awaiting_review"
        ):
            return None
        review = {**review, "round": (task["review_rounds"] or 0) + 1}
        return transition(store, task, Transition.REWORK, now_or(now), data={"review": review})
