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
    the last report (a later report replaces an earlier one). True when the attempt ended because of it (over
    the task's budget); False otherwise."""
    row = store.attempt(task["task_id"], task["attempt"]) if task["attempt"] else None
    if row is None or row["ended_at"] is not None or row["usage"] == usage:
        return False
    store.emit("task.usage", ts=ts, task_id=task["task_id"], attempt=task["attempt"], data={"usage": usage})
    return False


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
