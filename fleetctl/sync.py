"""``fleetctl sync``: reconcile with Forgejo what webhooks missed (Forgejo never retries a failed delivery).

For each configured repository, one pass reads the state of things *now* through the API and hands each
to the same mapping service as a webhook (``services.issues.apply_change``), as a change of event type
``sync``:

1. the pull requests of the repository's active tasks — the linked one (``GET …/pulls/{n}``), else the one
   on the task's branch ``fleet/<task-id>`` — so a missed merge completes the task before step 3 could
   take the issue's closing for a cancellation;
2. the open issues (``type=issues``: Forgejo lists pull requests as issues otherwise; every page) — a
   missed "labelled" creates the task, a missed edit updates it, a missed re-open re-queues it;
3. the issues of active tasks that step 2 did not list (closed, or no longer labelled) — a missed close
   or un-label cancels the task.

Every decision is the mapping's, and the mapping is idempotent: a second run changes nothing. Safe to run
every few minutes: a pass lock keeps two syncs from overlapping, reads are paged and bounded, and nothing is
written while a request to Forgejo is in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetctl.config import Config
from fleetctl.errors import ConfigError, FleetError, RemoteError
from fleetctl.forgejo import mapping
from fleetctl.forgejo.webhooks import BadPayload, Change, issue_from, pull_from
from fleetctl.log import log
from fleetctl.services import issues
from fleetctl.store import Store


@dataclass
class SyncReport:
    """What one sync did, per repository."""

    skipped: str | None = None
    repositories: list[str] = field(default_factory=list)
    issues_seen: int = 0
    changes: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"skipped": self.skipped, "repositories": self.repositories, "issues_seen": self.issues_seen,
                "changes": self.changes, "errors": self.errors}  # fmt: skip


def open_client(cfg: Config) -> Any:
    """A ``ForgejoClient`` for the configured Forgejo; ``ConfigError`` when there is no URL or token."""
    from fleetctl.forgejo.client import client_for

    return client_for(cfg.forgejo)


def sync(store: Store, cfg: Config, *, client: Any = None, repos: list[str] | None = None,
         now: Callable[[], float] = time.time) -> SyncReport:  # fmt: skip
    """One reconciliation pass over ``repos`` (default: ``forgejo.repositories``)."""
    from fleetctl.passes import pass_lock

    report = SyncReport(repositories=list(repos if repos is not None else cfg.forgejo.repositories))
    if not report.repositories:
        raise ConfigError("no repositories to sync: set forgejo.repositories = [\"owner/name\", …]",
                          code="no_repositories")  # fmt: skip
    with pass_lock(store.path, "sync") as locked:
        if not locked:
            report.skipped = "another sync is running"
            log("sync.skipped", reason=report.skipped)
            return report
        own = client is None
        client = client or open_client(cfg)
        try:
            issues.remember_login(store, client.whoami().get("login"))
            for repo in report.repositories:
                try:
                    _sync_repo(store, cfg, client, repo, report, now)
                except RemoteError as exc:
                    report.errors.append({"repo": repo, "error": exc.message})
                    log("sync.failed", repo=repo, error=exc.message)
            from fleetctl.services.reviews import settle_pending

            for entry in settle_pending(store, cfg, client, now=now()):
                report.changes.append({**entry, "detail": f"rework {entry['round']}: the review's comments were read"})
        finally:
            if own:
                client.close()
    return report


def _apply(store: Store, cfg: Config, change: Change, report: SyncReport, now: Callable[[], float]) -> None:
    try:
        applied = issues.apply_change(store, cfg, change, now=now())
    except FleetError as exc:  # refused by the state machine (a race with another writer): the next run sees
        report.errors.append({"repo": change.repo, "number": change.number, "error": exc.message})
        return
    if applied.changed:
        entry = {"repo": change.repo, "number": change.number, "task_id": applied.task_id, "detail": applied.detail}
        report.changes.append(entry)
        log("sync.applied", **entry)


def _sync_repo(store: Store, cfg: Config, client: Any, repo: str, report: SyncReport,
               now: Callable[[], float]) -> None:  # fmt: skip
    # 1. pull requests of active tasks (a missed merge must complete before a missed close could cancel)
    base = None
    for task in store.tasks(states=("assigned", "running", "awaiting_review"), repo=repo):
        linked = (task["pull_request"] or {}).get("number")
        if linked:
            raw = client.get_pull(repo, linked)
        else:
            base = base or client.get_repo(repo).get("default_branch") or "main"
            raw = client.pull_by_branch(repo, base, f"{mapping.BRANCH_PREFIX}{task['task_id']}")
        change = _change(repo, pull=raw) if raw is not None else None
        if change is not None:
            _apply(store, cfg, change, report, now)
            if task["state"] == "awaiting_review" and raw.get("state") == "open":
                _sync_review(store, cfg, client, repo, raw, report, now)
    # 2. open issues (issues only, every page)
    listed: set[int] = set()
    for raw in client.list_issues(repo, state="open", type="issues"):
        if raw.get("pull_request") is not None:
            continue  # a pull request listed as an issue: never a task
        report.issues_seen += 1
        change = _change(repo, issue=raw)
        if change is not None:
            listed.add(change.issue.number)
            _apply(store, cfg, change, report, now)
    # 3. issues of active tasks not listed as open: closed (or gone)
    for task in store.tasks(states=("queued", "assigned", "running", "awaiting_review"), repo=repo):
        if task["issue_number"] in listed:
            continue
        raw = client.get_issue(repo, task["issue_number"])
        if raw is None:  # deleted (or moved): nothing will ever close it
            _cancel_orphan(store, task, report, now)
            continue
        change = _change(repo, issue=raw)
        if change is not None:
            _apply(store, cfg, change, report, now)


def _sync_review(store: Store, cfg: Config, client: Any, repo: str, raw: dict, report: SyncReport,
                 now: Callable[[], float]) -> None:  # fmt: skip
    """The pull request's newest decisive review on its current head, as the webhook would have said it: changes
    requested (→ the same ``review_rejected`` as a delivery; a head already handled changes nothing) or approved."""
    from fleetctl.forgejo.webhooks import REVIEW_APPROVED, REVIEW_REJECTED

    head = (raw.get("head") or {}).get("sha")
    decisive = [r for r in client.list_reviews(repo, raw["number"]) if r.get("state") in ("REQUEST_CHANGES", "APPROVED")
                and not r.get("dismissed") and r.get("commit_id") == head]  # fmt: skip
    if not decisive:
        return
    review = decisive[-1]
    kind = REVIEW_REJECTED if review["state"] == "REQUEST_CHANGES" else REVIEW_APPROVED
    user = (review.get("user") or {}).get("login")
    try:
        change = Change(kind, "reviewed", repo, user, pull=pull_from(raw), review=str(review.get("body") or ""),
                        review_id=review.get("id") if isinstance(review.get("id"), int) else None)  # fmt: skip
    except BadPayload as exc:
        log("sync.unreadable", repo=repo, error=exc.message)
        return
    _apply(store, cfg, change, report, now)


def _cancel_orphan(store: Store, task: dict, report: SyncReport, now: Callable[[], float]) -> None:
    from fleetctl.services import cancel_task

    why = "the issue no longer exists in Forgejo"
    try:
        cancel_task(store, task["task_id"], why, now=now())
    except FleetError as exc:
        report.errors.append({"repo": task["repo"], "number": task["issue_number"], "error": exc.message})
        return
    entry = {"repo": task["repo"], "number": task["issue_number"], "task_id": task["task_id"], "detail": why}
    report.changes.append(entry)
    log("sync.applied", **entry)


def _change(repo: str, *, issue: dict | None = None, pull: dict | None = None) -> Change | None:
    """A ``sync`` change from an API object; None (logged) for one that cannot be read."""
    try:
        if issue is not None:
            return Change(mapping.SYNC, mapping.SYNC, repo, issue=issue_from(issue))
        return Change(mapping.SYNC, mapping.SYNC, repo, pull=pull_from(pull))
    except BadPayload as exc:
        log("sync.unreadable", repo=repo, error=exc.message)
        return None
