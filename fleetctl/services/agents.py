"""The agent registry: register, heartbeat, drain, resume, deregister, and going offline.

Tokens: a pull agent gets a fresh token on every registration (the old one stops working); a
deregistration (by the agent or an operator) and a change of mode to ``ssh_cli`` revoke it — the event
carries ``token_hash: null``, so the revocation is itself an event and survives replay. Agents defined
under ``[[hosts]]`` belong to the configuration: they are registered from it by every dispatch pass, so
they cannot be deregistered (remove them from the configuration, or drain them); a drained one stays
drained until ``resume``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetctl.config import OrchestratorConfig
from fleetctl.errors import Conflict, UsageError
from fleetctl.ids import check_id
from fleetctl.services._common import MAX_LABEL, check_caps, check_text, get_agent, hash_token, now_or
from fleetctl.states import ACTIVE, AgentMode, AgentStatus, FailureReason
from fleetctl.store import Store

if TYPE_CHECKING:
    from fleetctl.config import Config


@dataclass(frozen=True)
class Registration:
    """A registered agent and, for pull agents, its token (shown once, stored only as a hash)."""

    agent: dict
    token: str | None
    created: bool


def register_agent(
    store: Store,
    agent_id: str,
    *,
    agent_type: str,
    capabilities: Iterable[str] = (),
    max_concurrency: int = 1,
    mode: AgentMode | str = AgentMode.HTTP_PULL,
    host_id: str | None = None,
    issue_token: bool = True,
    allow_mode_change: bool = False,
    reserved: Collection[str] = (),
    now: float | None = None,
) -> Registration:
    """Create or update an agent and put it online. Pull agents get a fresh token on every registration.

    An existing agent keeps its mode unless ``allow_mode_change`` (the operator's CLI and the config sync):
    a pull agent's registration token must not be able to take over an agent of the configuration. An
    ``ssh_cli`` agent has no token: turning a pull agent into one revokes its token. ``reserved`` are the
    ids the configuration defines (``config_agent_ids``): only the config sync registers those.
    """
    check_id(agent_id, "agent id")
    agent_type = check_text(agent_type, "agent type", MAX_LABEL, required=True)
    caps = check_caps(capabilities)
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or not 1 <= max_concurrency <= 1000:
        raise UsageError("max concurrency must be an integer from 1 to 1000", code="invalid_field")
    try:
        mode = AgentMode(mode)
    except ValueError:
        raise UsageError("mode must be http_pull or ssh_cli", code="invalid_field") from None
    import secrets

    token = secrets.token_urlsafe(32) if issue_token and mode == AgentMode.HTTP_PULL else None
    fields: dict[str, Any] = {"agent_type": agent_type, "capabilities": caps, "max_concurrency": max_concurrency,
                              "mode": mode.value, "host_id": host_id}  # fmt: skip
    if token:
        fields["token_hash"] = hash_token(token)
    elif mode == AgentMode.SSH_CLI:
        fields["token_hash"] = None
    if agent_id in reserved:
        raise Conflict(f"agent {agent_id} is defined in the configuration ([[hosts]]); every dispatch pass registers "
                       "it from there — choose another agent id", code="agent_in_config")  # fmt: skip
    ts = now_or(now)
    with store.write():
        existing = store.agent(agent_id)
        if existing is not None and existing["mode"] != mode.value and not allow_mode_change:
            raise Conflict(f"agent {agent_id} exists as a {existing['mode']} agent; choose another agent id",
                           code="agent_mode_conflict")  # fmt: skip
        if existing is None:
            store.emit("agent.registered", ts=ts, agent_id=agent_id, data={**fields, "status": "online"})
        else:
            changed = {k: v for k, v in fields.items() if existing.get(k) != v}
            if changed:
                store.emit("agent.updated", ts=ts, agent_id=agent_id, data=changed)
            if existing["status"] != AgentStatus.ONLINE:
                store.emit("agent.online", ts=ts, agent_id=agent_id, data={"reason": "registered"})
        store.touch_agent(agent_id, ts)
        return Registration(store.agent(agent_id), token, existing is None)


#: Why an attempt may end while its agent still runs it (other than a cancel), as the heartbeat reply says it.
_STOP_REASONS = {FailureReason.TIMEOUT.value: "timeout", FailureReason.AGENT_LOST.value: "lease_lost",
                 FailureReason.BUDGET_EXCEEDED.value: "over_budget"}  # fmt: skip


def heartbeat(store: Store, orch: OrchestratorConfig, agent_id: str, *, now: float | None = None) -> dict:
    """Record a heartbeat: extend the agent's leases; bring it back online if it was marked offline.

    Returns ``{"agent": …, "stop": [{"task_id", "attempt", "reason"}], "cancelled": [task ids]}``: every
    attempt the agent held that is no longer its own — cancelled, timed out, lease lost, failed by
    anyone else — ended since its previous heartbeat (with a lease's margin), so that it stops those runs.
    """
    ts = now_or(now)
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] == AgentStatus.OFFLINE:
            store.emit("agent.online", ts=ts, agent_id=agent_id, data={"reason": "heartbeat"})
        store.touch_agent(agent_id, ts)
        store.extend_leases(agent_id, ts + orch.lease_secs)
        since = (agent["last_heartbeat_at"] or agent["registered_at"]) - orch.lease_secs
        held = {(t["task_id"], t["attempt"]) for t in store.tasks(states=tuple(ACTIVE), agent_id=agent_id)}
        stop = [
            {"task_id": a["task_id"], "attempt": a["attempt"],
             "reason": "cancelled" if a["outcome"] == "cancelled" else _STOP_REASONS.get(a["failure_reason"],
                                                                                        a["failure_reason"])}
            for a in store.ended_attempts_of(agent_id, since)
            if (a["task_id"], a["attempt"]) not in held
            and (a["outcome"] == "cancelled" or a["failure_reason"] in _STOP_REASONS)  # not its own failure receipt
        ]  # fmt: skip
        # task ids for clients that read only ``cancelled``: never a task whose current attempt it still holds
        held_ids = {task_id for task_id, _ in held}
        cancelled = list(dict.fromkeys(s["task_id"] for s in stop if s["task_id"] not in held_ids))
        return {"agent": store.agent(agent_id), "stop": stop, "cancelled": cancelled}


def _fail_held(store: Store, orch: OrchestratorConfig, agent_id: str, why: str, ts: float) -> None:
    from fleetctl.services.runs import _receipt_pending, fail_attempt

    for task in store.tasks(states=tuple(ACTIVE), agent_id=agent_id):
        if _receipt_pending(store, task):  # its receipt is in: it waits for Forgejo, not for the agent
            continue
        fail_attempt(store, orch, task["task_id"], FailureReason.AGENT_LOST, f"agent {agent_id} {why}",
                     attempt=task["attempt"], now=ts, states=ACTIVE)  # fmt: skip


def set_agent_status(store: Store, orch: OrchestratorConfig, agent_id: str, status: AgentStatus, reason: str,
                     *, now: float | None = None) -> dict:  # fmt: skip
    """Change an agent's status. Going offline fails its assigned and running attempts (``agent_lost``)."""
    ts = now_or(now)
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] != status:
            store.emit(f"agent.{status.value}", ts=ts, agent_id=agent_id, data={"reason": reason})
        if status == AgentStatus.OFFLINE:
            _fail_held(store, orch, agent_id, reason, ts)
        return store.agent(agent_id)


def config_agent_ids(cfg: Config) -> set[str]:
    """The agents the configuration defines under ``[[hosts]]``."""
    return {spec.agent_id for _, spec in cfg.agent_specs()}


def deregister_agent(store: Store, cfg: Config, agent_id: str, *, by: str = "operator",
                     now: float | None = None) -> dict:  # fmt: skip
    """Take an agent out of the fleet: offline, its token revoked, its attempts failed (``agent_lost``).

    ``by`` is ``"operator"`` or ``"agent"`` (its own ``POST /agents/deregister``); both revoke the token,
    so coming back takes a new registration. An agent of the configuration cannot be deregistered.
    """
    ts = now_or(now)
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["mode"] == AgentMode.SSH_CLI and agent_id in config_agent_ids(cfg):
            raise Conflict(
                f"agent {agent_id} is defined in the configuration ([[hosts]] host {agent['host_id']}) and comes "
                f"back with every dispatch; remove it there, or run 'fleetctl agent drain {agent_id}' to give it "
                "no new work",
                code="agent_in_config",
            )
        if agent["status"] != AgentStatus.OFFLINE or agent["token_hash"] is not None:
            store.emit("agent.deregistered", ts=ts, agent_id=agent_id, data={"reason": f"deregistered by {by}",
                                                                             "token_hash": None})  # fmt: skip
        _fail_held(store, cfg.orchestrator, agent_id, "deregistered", ts)
        return store.agent(agent_id)


def drain_agent(store: Store, orch: OrchestratorConfig, agent_id: str, *, now: float | None = None) -> dict:
    """The agent finishes what it has and takes nothing new until ``resume_agent``."""
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] == AgentStatus.OFFLINE:
            raise Conflict(f"agent {agent_id} is offline; only an online agent can be drained", code="agent_offline")
        return set_agent_status(store, orch, agent_id, AgentStatus.DRAINING, "drained by operator", now=now)


def resume_agent(store: Store, orch: OrchestratorConfig, agent_id: str, *, now: float | None = None) -> dict:
    """A drained agent takes work again (online). Resuming an online agent changes nothing."""
    with store.write():
        agent = get_agent(store, agent_id)
        if agent["status"] == AgentStatus.OFFLINE:
            raise Conflict(
                f"agent {agent_id} is offline, not drained: a pull agent comes back when it heartbeats or "
                "registers again, an agent of the configuration with the next dispatch pass",
                code="agent_offline",
            )
        if agent["status"] == AgentStatus.DRAINING:
            store.emit("agent.online", ts=now_or(now), agent_id=agent_id, data={"reason": "resumed by operator"})
        return store.agent(agent_id)


def sync_config_agents(store: Store, cfg: Config, now: float) -> None:
    """Make the registry match the ``[[hosts]]`` agents (every dispatch pass): register new ones, update
    changed ones (taking over a pull agent of the same id revokes its token), bring back ones that were
    offline, take removed ones offline: they get no new work, and their running attempts finish or time out as
    usual (the sweep still probes them on their host). An agent an operator drained stays draining until
    resumed."""
    configured = set()
    for host, spec in cfg.agent_specs():
        configured.add(spec.agent_id)
        current = store.agent(spec.agent_id)
        wanted = {"agent_type": spec.agent_type, "capabilities": sorted(set(spec.capabilities)),
                  "max_concurrency": spec.max_concurrency, "mode": AgentMode.SSH_CLI.value, "host_id": host.host_id,
                  "token_hash": None}  # fmt: skip
        changed = current is None or any(current.get(k) != v for k, v in wanted.items())
        if current is not None and current["status"] == AgentStatus.DRAINING:
            if changed:
                with store.write():
                    store.emit("agent.updated", ts=now, agent_id=spec.agent_id,
                               data={k: v for k, v in wanted.items() if current.get(k) != v})  # fmt: skip
            continue
        if changed or current["status"] == AgentStatus.OFFLINE:
            register_agent(store, spec.agent_id, agent_type=spec.agent_type, capabilities=spec.capabilities,
                           max_concurrency=spec.max_concurrency, mode=AgentMode.SSH_CLI, host_id=host.host_id,
                           issue_token=False, allow_mode_change=True, now=now)  # fmt: skip
    for agent in store.agents(mode=AgentMode.SSH_CLI.value):
        if agent["agent_id"] not in configured and agent["status"] != AgentStatus.OFFLINE:
            with store.write():
                store.emit("agent.offline", ts=now, agent_id=agent["agent_id"],
                           data={"reason": "removed from the configuration"})  # fmt: skip
