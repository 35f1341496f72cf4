"""Services: one function per operation, called by the CLI, the HTTP server and the passes alike.

Each function takes the ``Store`` and the configuration it needs, validates its input, decides with the
pure core (``states``, ``retry``, ``matching``, ``receipts``) and writes events through ``Store.emit``
inside one ``Store.write()`` transaction. Time is injected (``now=``), never read from a patched clock.

The rooms: ``tasks`` (create, cancel, retry), ``runs`` (claim, start, status, receipts, how an attempt
ends), ``receipts`` (receipts checked against Forgejo: the verdict computed before the write, pending
receipts, runs that ended without one), ``agents`` (the registry), ``hosts`` (SSH hosts up or down), ``budgets``
(usage reports and what the budgets hold back), ``views`` (the JSON shapes and the read services every caller renders).
Callers use the names re-exported here.
"""

from __future__ import annotations

from fleetctl.services._common import MAX_MESSAGE, get_agent, get_task, hash_token, token_matches
from fleetctl.services.agents import (
    Registration,
    config_agent_ids,
    deregister_agent,
    drain_agent,
    heartbeat,
    register_agent,
    resume_agent,
    set_agent_status,
    sync_config_agents,
)
from fleetctl.services.budgets import Blocking, blocking, mark_blocked, record_usage, usage_report
from fleetctl.services.hosts import lose_attempts_of_down_host, mark_host_down, mark_host_up
from fleetctl.services.receipts import (
    EndedRun,
    ForgejoLink,
    Verdict,
    check_ended_report,
    prepare_ended_run,
    prepare_receipt,
    run_ended_view,
    settle_ended_run,
    settle_prepared_run,
    validate_pending,
)
from fleetctl.services.runs import (
    Claim,
    CompletionResult,
    claim_limits,
    claim_request,
    claim_task,
    claimed,
    complete_task,
    expire_or_time_out,
    fail_attempt,
    hand_in_receipt,
    new_claim_token,
    rate_limit_attempt,
    release_claim,
    report_progress,
    report_status,
    requires_pull_request,
    settle_run,
    start_task,
    workspace_cleaned,
)
from fleetctl.services.tasks import cancel_task, create_task, retry_task, rework_task
from fleetctl.services.views import (
    agent_detail,
    agent_view,
    agent_views,
    attempt_view,
    event_view,
    iso,
    list_agents,
    list_tasks,
    task_detail,
    task_view,
)

__all__ = [
    "Blocking", "blocking", "mark_blocked", "record_usage", "usage_report", "rate_limit_attempt", "rework_task",
    "MAX_MESSAGE", "Claim", "CompletionResult", "ForgejoLink", "Registration", "Verdict", "agent_detail", "agent_view", "agent_views", "attempt_view",
    "cancel_task", "claim_limits", "claim_request", "claim_task", "claimed", "complete_task", "config_agent_ids", "create_task",
    "deregister_agent", "drain_agent", "event_view", "expire_or_time_out", "fail_attempt", "get_agent", "get_task",
    "hand_in_receipt", "hash_token", "prepare_receipt", "settle_ended_run", "EndedRun", "prepare_ended_run",
    "settle_prepared_run", "run_ended_view", "check_ended_report", "validate_pending", "heartbeat", "iso", "list_agents", "list_tasks", "new_claim_token",
    "lose_attempts_of_down_host", "mark_host_down", "mark_host_up",
    "register_agent", "release_claim", "report_progress", "report_status", "requires_pull_request", "resume_agent",
    "retry_task", "set_agent_status", "settle_run", "sync_config_agents", "start_task", "task_detail", "task_view", "token_matches",
    "workspace_cleaned",
]  # fmt: skip
