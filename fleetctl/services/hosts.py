"""SSH host health: a host that cannot be reached is marked down (an event) and skipped by dispatch until
the sweep reaches it again; its open attempts fail ``agent_lost`` once it has stayed down past the
heartbeat threshold (``heartbeat_interval_secs × heartbeat_timeout_threshold``), as a silent pull agent's do.

Only the changes are events (``host.down``, ``host.up``): a failed re-check of a host that is already
down writes nothing, so a dead host costs the event log nothing pass after pass.
"""

from __future__ import annotations

from fleetctl.config import OrchestratorConfig
from fleetctl.errors import FleetError
from fleetctl.services._common import MAX_MESSAGE, now_or
from fleetctl.states import ACTIVE, FailureReason
from fleetctl.store import Store


def mark_host_down(store: Store, host_id: str, error: str, *, now: float | None = None) -> bool:
    """Mark ``host_id`` down with the reason it could not be reached; True if it was up (an event written)."""
    ts = now_or(now)
    with store.write():
        current = store.hosts().get(host_id)
        if current is not None and current["status"] == "down":
            return False
        store.emit("host.down", ts=ts, data={"host_id": host_id, "error": error[:MAX_MESSAGE]})
        return True


def mark_host_up(store: Store, host_id: str, *, now: float | None = None) -> bool:
    """Mark a down host up again (it answered); True if it was down."""
    ts = now_or(now)
    with store.write():
        current = store.hosts().get(host_id)
        if current is None or current["status"] != "down":
            return False
        store.emit("host.up", ts=ts, data={"host_id": host_id})
        return True


def lose_attempts_of_down_host(store: Store, orch: OrchestratorConfig, host_id: str, down: dict,
                               *, now: float | None = None) -> list[dict]:  # fmt: skip
    """Fail the open attempts on a host that has been down past the heartbeat threshold (``agent_lost``);
    the tasks failed (attempt, agent), or ``[]`` while the host is still within the threshold."""
    from fleetctl.services.runs import _receipt_pending, fail_attempt

    ts = now_or(now)
    limit = orch.heartbeat_interval_secs * orch.heartbeat_timeout_threshold
    if ts - down["since"] <= limit:
        return []
    lost = []
    for att in store.open_attempts():
        if att["host_id"] != host_id:
            continue
        task = store.task(att["task_id"])
        if task is None or _receipt_pending(store, task):  # its receipt is in: it waits for Forgejo, not the host
            continue
        why = f"host {host_id} unreachable for {ts - down['since']:.0f}s: {down.get('error') or 'no answer'}"
        try:
            fail_attempt(store, orch, att["task_id"], FailureReason.AGENT_LOST, why, attempt=att["attempt"],
                         agent_id=att["agent_id"], now=ts, states=ACTIVE)  # fmt: skip
        except FleetError:  # the task moved on meanwhile (its receipt came in): nothing to lose
            continue
        lost.append({"task": att["task_id"], "attempt": att["attempt"], "agent": att["agent_id"]})
    return lost
