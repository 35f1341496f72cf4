"""Usage and budgets: what agents report they spent, recorded per attempt, and the limits of ``[budgets]``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.config import Config
    from fleetctl.receipts import Receipt


def record_usage(store: Store, cfg: Config | None, task: dict, usage: dict, ts: float, *,
                 receipt: Receipt | None = None) -> bool:  # fmt: skip
    """Record ``usage`` (the attempt's totals so far, already checked by ``receipts.parse_usage``) for the current
    attempt of ``task`` — fenced by the caller, inside its transaction — as ``task.usage`` when it differs from
    the last report (a later report replaces an earlier one). A report that takes the task's spend over its
    per-task budget fails the attempt ``budget_exceeded`` (never retried; the agent is told to stop by its
    heartbeat reply, an ssh_cli run is killed by the sweep) and returns True — except on a success receipt, whose
    work is done and accepted. False otherwise."""
    from fleetctl.services.runs import fail_attempt
    from fleetctl.states import FailureReason

    row = store.attempt(task["task_id"], task["attempt"]) if task["attempt"] else None
    if row is None or row["ended_at"] is not None or row["usage"] == usage:
        return False
    store.emit("task.usage", ts=ts, task_id=task["task_id"], attempt=task["attempt"], data={"usage": usage})
    budget = cfg.budgets.task_budget(task["repo"]) if cfg is not None else None
    spent = store.task(task["task_id"])["spent_usd"] or 0.0
    if budget is None or spent <= budget:
        return False
    if receipt is not None and receipt.outcome == "success":
        return False  # the work is done: it is accepted (and the spend is on record); nothing more starts
    why = f"the task has spent ${spent:.2f}, over its ${budget:.2f} budget"
    fail_attempt(store, cfg.orchestrator, task["task_id"], FailureReason.BUDGET_EXCEEDED, why, attempt=task["attempt"],
                 agent_id=task["agent_id"], now=ts, receipt=receipt.to_json() if receipt is not None else None)  # fmt: skip
    return True


@dataclass(frozen=True)
class Blocking:
    """What the budgets hold back now: every new attempt (``fleet``: the fleet's day budget is spent), those of
    some repositories (lower-cased names: their day budget is spent), and any task at its per-task budget."""

    fleet: str | None = None  # why nothing starts, or None
    repos: Mapping[str, str] = field(default_factory=dict)  # repository → why its tasks do not start
    cfg: Config | None = None

    def why(self, task: dict) -> str | None:
        """Why ``task`` (a row with ``repo`` and ``spent_usd``) may not start a new attempt now, or None."""
        if self.fleet:
            return self.fleet
        repo = (task.get("repo") or "").lower()
        if repo in self.repos:
            return self.repos[repo]
        budget = self.cfg.budgets.task_budget(task.get("repo")) if self.cfg is not None else None
        if budget is not None and (task.get("spent_usd") or 0.0) >= budget:
            return f"the task has spent ${task.get('spent_usd') or 0:.2f} of its ${budget:.2f} budget"
        return None


def blocking(store: Store, cfg: Config, ts: float) -> Blocking:
    """The budgets' hold now (``day_start(ts)`` onwards), read in the caller's snapshot: the same numbers the
    claim checks in SQL (``Store.spend_since``), said in words for reports and ``task.blocked`` events."""
    from fleetctl.services.runs import day_start

    b = cfg.budgets
    if not b.any:
        return Blocking()
    since, memo = day_start(ts), {}
    if b.max_cost_per_day is not None:
        spent = store.spend_since(since, memo=memo)
        if spent >= b.max_cost_per_day:
            return Blocking(fleet=f"the fleet has spent ${spent:.2f} of its ${b.max_cost_per_day:.2f} budget today",
                            cfg=cfg)  # fmt: skip
    repos = {}
    for repo, limits in b.repository.items():
        budget = limits.get("max_cost_per_day")
        if budget is not None and (spent := store.spend_since(since, repo, memo=memo)) >= budget:
            repos[repo] = f"{repo} has spent ${spent:.2f} of its ${budget:.2f} budget today"
    return Blocking(repos=repos, cfg=cfg)


MARK_PER_PASS = 200
"""Queued tasks one pass marks ``blocked_by = "budget"`` (or clears) at most; the next pass does the rest."""


def mark_blocked(store: Store, cfg: Config, ts: float) -> dict | None:
    """Make ``blocked_by`` say what the budgets hold back now: ``task.blocked`` {"by": "budget", "why"} once for
    each ready task held back (not yet marked), ``task.unblocked`` for each marked one no longer held back. What
    it found — ``{"why", "blocked", "unblocked"}`` — or None when no budget holds anything back."""
    with store.read():
        held = blocking(store, cfg, ts)
        ready = store.ready_tasks(ts) if held.fleet or held.repos or cfg.budgets.any else []
        marked = {row["task_id"] for row in store.blocked_tasks("budget", MARK_PER_PASS)}
    block, why_first = [], None
    for task_id, _reqs, repo, spent in ready:
        why = held.why({"repo": repo, "spent_usd": spent})
        if why is not None:
            why_first = why_first or why
            if task_id not in marked and len(block) < MARK_PER_PASS:
                block.append((task_id, why))
    still = {task_id for task_id, _r, repo, spent in ready if held.why({"repo": repo, "spent_usd": spent})}
    unblock = [task_id for task_id in marked if task_id not in still]
    if block or unblock:
        with store.write():
            for task_id, why in block:
                task = store.task(task_id)
                if task["state"] == "queued" and task["blocked_by"] != "budget":
                    store.emit("task.blocked", ts=ts, task_id=task_id, data={"by": "budget", "why": why})
            for task_id in unblock:
                task = store.task(task_id)
                if task["blocked_by"] == "budget":
                    store.emit("task.unblocked", ts=ts, task_id=task_id, data={"by": "budget"})
    if why_first is None and not unblock:
        return None
    return {"why": why_first, "blocked": len(block), "unblocked": len(unblock)}


USAGE_BY = ("task", "repo", "agent", "day")


def usage_report(store: Store, by: str = "task", since: float | None = None) -> dict:
    """Spend as recorded from agents' usage reports, grouped ``by`` task, repo, agent or day (UTC):
    ``{"by", "since", "items": [{"key", "attempts", "input_tokens", "output_tokens", "cost_usd"}], "total": {…}}``.
    The total is the sum of the items, which are the sums of the attempts' last reports."""
    from fleetctl.errors import UsageError
    from fleetctl.services.views import iso

    if by not in USAGE_BY:
        raise UsageError(f"--by must be one of {', '.join(USAGE_BY)}, got {by!r}", code="invalid_field")
    with store.read():
        rows = store.usage_totals(by, since)
    items = [{"key": r["key"] or "(none)", "attempts": r["attempts"], "input_tokens": int(r["input_tokens"]),
              "output_tokens": int(r["output_tokens"]), "cost_usd": round(r["cost_usd"], 6)} for r in rows]  # fmt: skip
    total = {k: sum(i[k] for i in items) for k in ("attempts", "input_tokens", "output_tokens")}
    total["cost_usd"] = round(sum(r["cost_usd"] for r in rows), 6)
    return {"by": by, "since": iso(since) if since else None, "items": items, "total": total}
