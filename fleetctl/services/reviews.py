"""Review feedback becomes the next attempt (SPEC §2 ``rework``; §7.2 "changes requested").

Two steps, so that no network call ever runs in a webhook request or under the write lock:

1. ``changes_requested`` (the webhook route, ``ingest-webhook`` and ``sync`` through ``apply_change``), inside
   the delivery's write: a head commit already handled changes nothing (one rework per pull request head);
   past ``max_review_rounds`` the task is flagged ``needs_human`` (``task.needs_human``: a comment, the
   ``fleet/needs-human`` label, a Matrix message); otherwise the rejection is recorded
   (``task.review_rejected``: the task's ``review_pending``).
2. ``settle_pending`` (the dispatch and sweep passes, and ``sync``): for each pending rejection, the review and
   its inline comments are read from Forgejo (outside any transaction), then ``rework_task`` re-queues the task
   as a ``rework`` attempt carrying them — if the rejection is still the pending one. Forgejo failing: it
   stays pending for the next pass (unreachable: the pass stops asking at the first task, it would only wait
   again for each of the others).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetctl.errors import FleetError
from fleetctl.log import log
from fleetctl.services._common import forgejo_api, now_or
from fleetctl.services.tasks import rework_task
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.config import Config

MAX_COMMENTS = 100
"""Inline comments a rework prompt carries at most (the first ones, in the review's order)."""
MAX_COMMENT = 4000
"""Characters of one inline comment kept in the prompt."""
PER_PASS = 20
"""Pending rejections one pass settles at most (the next pass takes the rest)."""


def review_cap(cfg: Config, task: dict) -> int:
    """How many rework attempts ``task`` may have: its label ``review-rounds:N``, else the fleet's setting."""
    own = task.get("max_review_rounds")
    return cfg.orchestrator.max_review_rounds if own is None else own


def changes_requested(store: Store, cfg: Config, task_id: str, review: dict, ts: float) -> str:
    """Changes were requested on the task's pull request (its head ``review["head_sha"]``): record what that
    means, inside the caller's write. Returns what was done, in words ("nothing: …" when nothing)."""
    task = store.task(task_id)
    head = review["head_sha"]
    if store.review_handled(task_id, head):
        return f"nothing: changes requested on {head[:12]} were already handled"
    rounds, cap = task["review_rounds"] or 0, review_cap(cfg, task)
    if rounds >= cap:
        if task["needs_human"]:
            return "nothing: the task already waits for a person"
        store.emit("task.needs_human", ts=ts, task_id=task_id,
                   data={**review, "review_rounds": rounds, "max_review_rounds": cap})  # fmt: skip
        return f"all {cap} review rounds are used: the task needs a person"
    store.emit("task.review_rejected", ts=ts, task_id=task_id, data=review)
    return f"rework {rounds + 1} of {cap} is due once the review's comments are read"


def settle_pending(store: Store, cfg: Config, client: Any = None, *, now: float | None = None) -> list[dict]:
    """Turn pending rejections into rework attempts (see the module docstring). What was done, one entry per
    task. Without Forgejo's API at hand (no token in this process) nothing is done."""
    with store.read():
        pending = store.reviews_pending(PER_PASS)
    if not pending:
        return []
    done = []
    with forgejo_api(cfg, client) as client:
        for task in pending if client is not None else ():
            rejection = task["review_pending"]
            try:
                feedback = _feedback(client, task["repo"], rejection)
            except FleetError as exc:  # Forgejo down or refusing: the rejection stays pending
                log("review.fetch_failed", task=task["task_id"], error=exc.message)
                if getattr(exc, "unreachable", False):  # each next task would wait as long: the next pass tries
                    break
                continue
            reworked = rework_task(store, task["task_id"], feedback, now=now_or(now), expect_pending=rejection)
            if reworked is not None:
                entry = {"task_id": task["task_id"], "round": reworked["review_rounds"],
                         "comments": len(feedback["comments"])}  # fmt: skip
                log("task.rework", **entry)
                done.append(entry)
    return done


def _feedback(client: Any, repo: str, rejection: dict) -> dict:
    """The review a rework carries: the rejection's body and the inline comments of the review it was (by id
    when known; else the newest undismissed "changes requested" on its head commit by its reviewer — with its
    body, if still so —, else by anyone, else the newest one)."""
    pr, head = rejection["pr"], rejection["head_sha"]
    asked = [r for r in client.list_reviews(repo, pr) if r.get("state") == "REQUEST_CHANGES"]
    review = None
    if rejection.get("review_id") is not None:
        review = next((r for r in asked if r.get("id") == rejection["review_id"]), None)
    if review is None:  # a webhook names no review id: the reviewer's (with that body, if still so) on that head
        on_head = [r for r in asked if r.get("commit_id") == head and not r.get("dismissed")]
        theirs = [r for r in on_head if _login(r) == rejection.get("reviewer")]
        same = [r for r in theirs if (r.get("body") or "") == (rejection.get("body") or "")]
        review = (same or theirs or on_head or asked or [None])[-1]
    comments = []
    if review is not None and isinstance(review.get("id"), int):
        for c in (client.review_comments(repo, pr, review["id"]) or [])[:MAX_COMMENTS]:
            comments.append(_comment(c))
    body = rejection.get("body") or (review or {}).get("body") or ""
    out = {"pr": pr, "head_sha": head, "reviewer": rejection.get("reviewer") or _login(review), "body": body,
           "comments": comments}  # fmt: skip
    if review is not None:
        out["review_id"] = review.get("id")
    return out


def _comment(c: dict) -> dict:
    """One inline comment as a prompt shows it. Forgejo's ``position`` is the line in the pull request's version
    of the file; a comment on a removed line has ``position`` 0 and its line in the old version in
    ``original_position`` (kept with ``"old": True``); neither: a comment on the file as a whole."""
    new, old = c.get("position"), c.get("original_position")
    out: dict[str, Any] = {
        "path": str(c.get("path") or ""),
        "line": None,
        "body": str(c.get("body") or "")[:MAX_COMMENT],
    }
    if isinstance(new, int) and new > 0:
        out["line"] = new
    elif isinstance(old, int) and old > 0:
        out.update(line=old, old=True)
    return out


def _login(review: dict | None) -> str | None:
    user = (review or {}).get("user")
    return user.get("login") if isinstance(user, dict) else None
