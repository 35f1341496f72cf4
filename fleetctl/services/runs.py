"""Runs: claiming a task for an agent, its start and progress, its receipt, and how an attempt ends.

One implementation for every caller: ``dispatch`` (ssh_cli agents) and the server's ``dequeue`` (pull
agents) claim through ``claim_request`` → ``Store.claim``/``claim_many`` → ``claimed``; the CLI, the API
and the run wrapper report through ``report_status``, ``hand_in_receipt`` and ``settle_run``.

Writes about an attempt are fenced by (task id, agent id, attempt): a caller that lost its lease gets
``LeaseLost`` and changes nothing. An attempt is settled with the retry policy it was launched with (kept
in its ``task.assigned`` event), whichever process settles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetctl.config import Config, OrchestratorConfig
from fleetctl.errors import ConfigError, LeaseLost, UsageError, ValidationFailed
from fleetctl.services._common import MAX_MESSAGE, check_text, get_task, new_token, now_or
from fleetctl.services.tasks import transition
from fleetctl.services.views import iso, task_view
from fleetctl.states import ACTIVE, LEASED, TERMINAL, FailureReason, TaskState, Transition
from fleetctl.store import ClaimLimits, ClaimRequest, Store

if TYPE_CHECKING:
    from fleetctl.receipts import Receipt
    from fleetctl.retry import RetryPolicy
    from fleetctl.services.receipts import Verdict

STATUSES = ("running", "progress", "rate_limited")


# ---------------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """A claimed attempt: the task, the token that acts on this attempt only, and the rendered prompt."""

    task: dict
    token: str
    prompt: str

    @property
    def attempt(self) -> int:
        return self.task["attempt"]

    def to_json(self) -> dict:
        """The dequeue reply (SPEC §6)."""
        return {"task": task_view(self.task), "attempt": self.attempt,
                "lease_expires_at": iso(self.task["lease_expires_at"]), "task_token": self.token,
                "prompt": self.prompt}  # fmt: skip


def new_claim_token() -> tuple[str, str]:
    """A per-attempt task token and its hash (the hash goes into the claim, the token to the run)."""
    return new_token()


def claim_request(cfg: Config, agent: dict, token_hash: str, *, ts: float, task_id: str | None = None,
                  host_id: str | None = None) -> ClaimRequest:  # fmt: skip
    """The conditional claim for ``agent`` (its capabilities and limit as read), with the attempt's token
    hash and the retry policy the attempt is launched with."""
    orch = cfg.orchestrator
    extra: dict[str, Any] = {
        "token_hash": token_hash,
        "retry_policy": {"backoff_secs": orch.retry_backoff_secs, "backoff_max_secs": orch.retry_backoff_max_secs},
    }
    if host_id is not None:
        extra["host_id"] = host_id
    return ClaimRequest(agent["agent_id"], agent["capabilities"], agent["max_concurrency"], orch.lease_secs, ts,
                        task_id=task_id, extra=extra, limits=claim_limits(cfg, ts))  # fmt: skip


def claim_limits(cfg: Config, ts: float) -> ClaimLimits | None:
    """The fleet's limits every claim honours (dispatch and dequeue alike): the per-repository caps of
    ``[forgejo]`` and the budgets of ``[budgets]``; None when none is configured."""
    fj, budgets = cfg.forgejo, cfg.budgets
    # a repository's own limit wins over the fleet's; its own 0 in the file (None here) means "no limit there"
    repo_caps = tuple((r, _NO_CAP if v["max_active_per_repo"] is None else v["max_active_per_repo"])
                      for r, v in fj.repository.items() if "max_active_per_repo" in v)  # fmt: skip
    if fj.max_active_per_repo is None and not repo_caps and not budgets.any:
        return None
    per_repo = budgets.repository.items()
    return ClaimLimits(
        repo_cap=fj.max_active_per_repo, repo_caps=repo_caps, task_budget=budgets.max_cost_per_task,
        repo_task_budgets=tuple((r, _NO_BUDGET if v["max_cost_per_task"] is None else v["max_cost_per_task"])
                                for r, v in per_repo if "max_cost_per_task" in v),
        day_budget=budgets.max_cost_per_day,
        repo_day_budgets=tuple((r, v["max_cost_per_day"]) for r, v in per_repo if v.get("max_cost_per_day") is not None),
        day_start=day_start(ts),
    )  # fmt: skip


_NO_CAP, _NO_BUDGET = 2**62, 9e99


def day_start(ts: float) -> float:
    """UTC midnight before ``ts``: the start of the day a ``max_cost_per_day`` budget counts."""
    return ts - ts % 86400


def claimed(store_or_none: Store | None, cfg: Config, task: dict, token: str) -> Claim:
    """The ``Claim`` of a task just claimed: its prompt rendered. A template that cannot be rendered is a
    configuration error (``config check`` refuses it first); should one slip through, the attempt is
    failed ``launch_failed`` here (when a store is given) so no claimed task is left behind."""
    from fleetctl.prompt import render_prompt

    try:
        prompt = render_prompt(task, task["attempt"], cfg.orchestrator.prompt_template, cfg.forgejo.url)
    except (ConfigError, ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        error = ConfigError(f"orchestrator.prompt_template cannot be rendered: {message}", code="bad_template")
        error.http_status = 503  # the server cannot hand out work until its configuration is fixed
        if store_or_none is not None:
            release_claim(store_or_none, cfg.orchestrator, task, error.message)
        raise error from None
    return Claim(task, token, prompt)


def release_claim(store: Store, orch: OrchestratorConfig, task: dict, why: str, *, now: float | None = None) -> None:
    """Fail a just-claimed attempt that could not be handed out (``launch_failed``, retried as usual)."""
    try:
        fail_attempt(store, orch, task["task_id"], FailureReason.LAUNCH_FAILED, why, attempt=task["attempt"],
                     agent_id=task["agent_id"], now=now, states=ACTIVE)  # fmt: skip
    except LeaseLost:
        pass  # it moved on meanwhile


def claim_task(store: Store, cfg: Config, agent: dict, *, task_id: str | None = None, host_id: str | None = None,
               now: float | None = None) -> Claim | None:  # fmt: skip
    """Claim the best eligible task (or ``task_id``) for ``agent``: the conditional claim, the per-attempt
    token and the rendered prompt; None when nothing could be claimed."""
    token, token_hash = new_claim_token()
    task = store.claim(**vars(claim_request(cfg, agent, token_hash, ts=now_or(now), task_id=task_id, host_id=host_id)))
    return None if task is None else claimed(store, cfg, task, token)


# ---------------------------------------------------------------------------------------------- fencing


def _fenced(store: Store, task_id: str, agent_id: str | None, attempt: int | None,
            states: frozenset = ACTIVE) -> dict:  # fmt: skip
    """The task if ``(agent_id, attempt)`` still holds it in one of ``states``, else ``LeaseLost``."""
    task = get_task(store, task_id)
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise UsageError("attempt must be a positive integer", code="invalid_field")
    holder_ok = agent_id is None or task["agent_id"] == agent_id
    attempt_ok = attempt is None or task["attempt"] == attempt
    if task["state"] in states and holder_ok and attempt_ok:
        return task
    n = attempt or task["attempt"]
    state = task["state"].replace("_", " ")
    details = {"state": task["state"], "attempt": task["attempt"]}
    if holder_ok and attempt_ok and task["state"] in (TaskState.AWAITING_REVIEW, TaskState.COMPLETED):
        raise LeaseLost(f"task {task_id} attempt {n} has already handed in its receipt (the task is {state}); "
                        "nothing more can be reported for this attempt", details=details)  # fmt: skip
    if holder_ok and attempt_ok:
        raise LeaseLost(f"task {task_id} attempt {n} is over: the task is {state}", details=details)
    now_held = f"attempt {task['attempt']} is held by {task['agent_id']}" if task["agent_id"] and task["state"] \
        not in TERMINAL else f"the task is {state}"  # fmt: skip
    who = f"agent {agent_id} " if agent_id else ""
    raise LeaseLost(f"{who}no longer holds task {task_id} attempt {n}: {now_held}", details=details)


# ---------------------------------------------------------------------------------------------- reports


def start_task(store: Store, task_id: str, *, agent_id: str | None = None, attempt: int | None = None,
               workspace: str | None = None, now: float | None = None) -> dict:  # fmt: skip
    """assigned → running (the run started). Repeating it while running is a no-op."""
    ts = now_or(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt)
        if task["state"] == TaskState.RUNNING:
            return task
        return transition(store, task, Transition.STARTED, ts, data={"workspace": workspace} if workspace else {})


def report_status(store: Store, orch: OrchestratorConfig, task_id: str, status: str = "progress", message: str = "",
                  *, agent_id: str | None = None, attempt: int | None = None, now: float | None = None,
                  retry_after: Any = None, usage: Any = None, cfg: Config | None = None) -> dict:  # fmt: skip
    """What an agent reports while it works, in one transaction: ``running`` (assigned → running; a no-op when
    already running) and/or a progress ``message`` (an event); its ``usage`` so far (``task.usage``, checked
    against the budgets of ``cfg``); or ``rate_limited``: it hit a usage limit (``rate_limit_attempt``, with
    the ``message`` as the detail and ``retry_after`` seconds). Input is checked before anything is written,
    so a refused report leaves the task as it was."""
    from fleetctl.receipts import parse_retry_after, parse_usage
    from fleetctl.services.budgets import record_usage

    if status not in STATUSES:
        raise UsageError("status must be running, progress or rate_limited", code="invalid_field")
    message = check_text(message, "message", MAX_MESSAGE)
    retry_after = parse_retry_after(retry_after)
    if retry_after is not None and status != "rate_limited":
        raise UsageError("retry_after_secs goes with status rate_limited", code="invalid_field")
    usage = parse_usage(usage)
    ts = now_or(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt)
        if usage is not None and record_usage(store, cfg, task, usage, ts):
            return store.task(task_id)  # over its budget: the attempt failed budget_exceeded
        if status == "rate_limited":
            return rate_limit_attempt(store, orch, task_id, retry_after, message, agent_id=agent_id,
                                      attempt=attempt, now=ts)  # fmt: skip
        if status == "running" and task["state"] == TaskState.ASSIGNED:
            task = transition(store, task, Transition.STARTED, ts)
        if message or (status == "progress" and usage is None):
            store.emit("task.progress", ts=ts, task_id=task_id, data={"message": message})
        return store.task(task_id)


def rate_limit_attempt(store: Store, orch: OrchestratorConfig, task_id: str, retry_after: float | None = None,
                       detail: str = "", *, agent_id: str | None = None, attempt: int | None = None,
                       receipt: dict | None = None, now: float | None = None) -> dict:  # fmt: skip
    """The current attempt hit a usage limit (SPEC §2 ``rate_limited``): the task goes back to the queue without
    consuming a retry (one more attempt allowed, no backoff: another agent may take it at once) and the agent
    that ran it cools down until ``now + retry_after`` (else ``orchestrator.rate_limit_cooldown_secs``) —
    skipped by dispatch and dequeue meanwhile. Both are events of one transaction (``task.rate_limited``,
    ``agent.cooled_down``); a cooldown already running longer is kept."""
    ts = now_or(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt)
        wait = retry_after if retry_after is not None else orch.rate_limit_cooldown_secs
        holder, n, until = task["agent_id"], task["attempt"], ts + wait
        data: dict[str, Any] = {"reason": FailureReason.RATE_LIMITED.value, "detail": (detail or "")[:MAX_MESSAGE],
                                "retry_after_secs": retry_after, "cooldown_until": until}  # fmt: skip
        if receipt is not None:
            data["receipt"] = receipt
        task = transition(store, task, Transition.RATE_LIMITED, ts, data=data)
        agent = store.agent(holder) if holder else None
        if agent is not None and (agent["cooldown_until"] or 0) < until:
            store.emit("agent.cooled_down", ts=ts, agent_id=holder,
                       data={"until": until, "reason": f"usage limit on task {task_id} attempt {n}",
                             "task_id": task_id, "attempt": n})  # fmt: skip
        return task


def report_progress(store: Store, task_id: str, message: str, *, agent_id: str | None = None,
                    attempt: int | None = None, now: float | None = None) -> dict:  # fmt: skip
    """A progress note from the task's current holder (``report_status`` with status ``progress``)."""
    return report_status(store, OrchestratorConfig(), task_id, "progress", message, agent_id=agent_id,
                         attempt=attempt, now=now)  # fmt: skip


# ---------------------------------------------------------------------------------------------- endings


def _policy(store: Store, orch: OrchestratorConfig, task: dict) -> RetryPolicy:
    """The retry policy the current attempt was launched with (else the given configuration's)."""
    from fleetctl.retry import RetryPolicy

    launched = store.assignment(task["task_id"], task["attempt"]).get("retry_policy") if task["attempt"] else None
    if isinstance(launched, dict):
        try:
            return RetryPolicy(base=float(launched["backoff_secs"]), cap=float(launched["backoff_max_secs"]))
        except (KeyError, TypeError, ValueError):
            pass
    return RetryPolicy(base=orch.retry_backoff_secs, cap=orch.retry_backoff_max_secs)


def fail_attempt(
    store: Store,
    orch: OrchestratorConfig,
    task_id: str,
    reason: FailureReason | str,
    detail: str | None = None,
    *,
    agent_id: str | None = None,
    attempt: int | None = None,
    receipt: dict | None = None,
    now: float | None = None,
    states: frozenset = LEASED,
) -> dict:
    """The current attempt failed: re-queue with backoff if the policy allows, else fail the task."""
    reason = FailureReason(reason)
    ts = now_or(now)
    with store.write():
        task = _fenced(store, task_id, agent_id, attempt, states)
        decision = _policy(store, orch, task).decide(attempt=task["attempt"], max_attempts=task["max_attempts"],
                                                     reason=reason, now=ts)  # fmt: skip
        data: dict[str, Any] = {"reason": reason.value, "detail": (detail or "")[:MAX_MESSAGE], "why": decision.why}
        if receipt is not None:
            data["receipt"] = receipt
        if decision.retry:
            data["not_before"] = decision.not_before
            return transition(store, task, Transition.REQUEUED, ts, data=data)
        return transition(store, task, Transition.FAILED, ts, data=data)


@dataclass(frozen=True)
class CompletionResult:
    """What ``hand_in_receipt`` did: the task now, and whether this call was a repeat of a stored one."""

    task: dict
    repeated: bool = False
    rejected: str | None = None  # why the receipt was refused (the attempt then failed receipt_invalid)
    pending: bool = False  # stored, to be validated when Forgejo answers (HTTP 202, CLI exit 0)

    def raise_if_rejected(self) -> CompletionResult:
        """``ValidationFailed`` for a refused receipt (call it after the transaction committed)."""
        if self.rejected:
            raise ValidationFailed(
                f"receipt rejected: {self.rejected}; the attempt failed and the task is {self.task['state']}",
                code="receipt_invalid",
                details={"task_id": self.task["task_id"], "state": self.task["state"]},
            )
        return self


def requires_pull_request(cfg: Config, task: dict) -> bool:
    """The completion policy: a success receipt must name a pull request for a Forgejo task (an issue in a
    repository, with Forgejo configured) unless ``forgejo.require_pull_request = false``."""
    return bool(cfg.forgejo.url) and cfg.forgejo.require_pull_request and bool(task["repo"])


def complete_task(store: Store, cfg: Config, task_id: str, receipt_doc: Any, **kwargs: Any) -> CompletionResult:
    """``hand_in_receipt`` that raises ``ValidationFailed`` (after committing) when the receipt is refused."""
    return hand_in_receipt(store, cfg, task_id, receipt_doc, **kwargs).raise_if_rejected()


def hand_in_receipt(
    store: Store,
    cfg: Config,
    task_id: str,
    receipt_doc: Any,
    *,
    agent_id: str | None = None,
    attempt: int | None = None,
    now: float | None = None,
    verdict: Verdict | None = None,
) -> CompletionResult:
    """Hand in a receipt for the current attempt (SPEC §7.4); never raises for a refused receipt.

    ``verdict`` is Forgejo's answer about the pull requests the receipt names, computed beforehand by
    ``services.receipts.prepare_receipt`` (never inside this transaction: no network call under the write
    lock); None means only the checks on the receipt's face are made.

    Success naming a pull request → awaiting_review (the pull request is followed to its merge), or completed
    when Forgejo says it is already merged; on a task with no repository there is no issue and no pull
    request to follow, so such a receipt completes the task and the pull request is kept as its record.
    Success without one → completed (or, when the completion policy requires one, the attempt fails
    ``receipt_invalid``); failure → the attempt fails ``agent_error``. A verdict that Forgejo could not be
    reached stores the receipt as pending (``task.receipt_pending``; the attempt keeps its state and lease)
    and comes back as ``result.pending``. A repeat of an already accepted (or still pending) identical
    receipt returns the stored result and records nothing; any other late write raises ``LeaseLost``. A
    refused receipt fails the attempt (``receipt_invalid``) and comes back as ``result.rejected``:
    committing that failure and telling the caller are separate steps, so that a batch of writes (the
    server) commits it before answering 422.
    """
    from fleetctl.receipts import parse_receipt

    receipt = parse_receipt(receipt_doc)
    ts = now_or(now)
    with store.write():
        task = get_task(store, task_id)
        n = attempt if attempt is not None else task["attempt"]
        prior = store.attempt(task_id, n) if isinstance(n, int) and n > 0 else None
        if prior is not None and prior["receipt"] == receipt.to_json() and agent_id in (None, prior["agent_id"]):
            pending = bool(prior["receipt_pending"]) and prior["ended_at"] is None
            # a pending receipt is applied once Forgejo answers; until then a repeat records nothing
            if not pending or verdict is None or verdict.unreachable:
                return CompletionResult(task, repeated=True, pending=pending)
        task = _fenced(store, task_id, agent_id, attempt)  # not ``n``: a never-claimed task has attempt 0
        return _apply_receipt(store, cfg, task, receipt, verdict, ts)


def _apply_receipt(store: Store, cfg: Config, task: dict, receipt: Receipt, verdict: Verdict | None,
                   ts: float) -> CompletionResult:  # fmt: skip
    """The one write of a receipt for the fenced ``task`` (inside the caller's transaction)."""
    from fleetctl.services.budgets import record_usage

    orch, task_id = cfg.orchestrator, task["task_id"]
    if receipt.usage is not None and record_usage(store, cfg, task, receipt.usage, ts, receipt=receipt):
        return CompletionResult(store.task(task_id))  # over its budget: the attempt failed budget_exceeded
    if receipt.outcome == "rate_limited":
        result = rate_limit_attempt(store, orch, task_id, receipt.retry_after_secs, receipt.summary,
                                    receipt=receipt.to_json(), now=ts)  # fmt: skip
        return CompletionResult(result)
    if receipt.outcome == "failure":
        result = fail_attempt(store, orch, task_id, FailureReason.AGENT_ERROR, receipt.summary or "failure receipt",
                              receipt=receipt.to_json(), now=ts)  # fmt: skip
        return CompletionResult(result)
    problem = _receipt_problem(task, receipt, requires_pull_request(cfg, task))
    if problem is None and verdict is not None and verdict.unreachable:
        store.emit("task.receipt_pending", ts=ts, task_id=task_id, data={"receipt": receipt.to_json()})
        return CompletionResult(store.task(task_id), pending=True)
    if problem is None and verdict is not None and not verdict.ok:
        problem = verdict.reason
    if problem:
        rejected = fail_attempt(store, orch, task_id, FailureReason.RECEIPT_INVALID, problem,
                                receipt=receipt.to_json(), now=ts)  # fmt: skip
        return CompletionResult(rejected, rejected=problem)
    prs = receipt.pull_requests()
    data: dict[str, Any] = {"receipt": receipt.to_json()}
    if verdict is not None and verdict.pull_request is not None:
        data["pull_request"] = verdict.pull_request
    elif prs:
        pr = dict(prs[0])
        if task["repo"]:
            pr.setdefault("repo", task["repo"])
        data["pull_request"] = pr
    merged = bool(data.get("pull_request", {}).get("merged"))  # nothing left to review
    if prs and task["repo"] and not merged:
        return CompletionResult(transition(store, task, Transition.AWAITING_REVIEW, ts, data=data))
    return CompletionResult(transition(store, task, Transition.COMPLETED, ts, data=data))


def _receipt_problem(task: dict, receipt: Receipt, require_pull_request: bool) -> str | None:
    """Why a success receipt is not acceptable on its face (Forgejo checks come on top), or None."""
    prs = receipt.pull_requests()
    if require_pull_request and not prs:
        return "a pull request is required for this task and the receipt names none"
    for pr in prs:
        if task["repo"] and pr.get("repo") and pr["repo"].lower() != task["repo"].lower():
            return f"pull request {pr['repo']}#{pr['number']} is not in the task's repository {task['repo']}"
    return None


def settle_run(store: Store, orch: OrchestratorConfig, task_id: str, attempt: int, exit_code: int | None,
               detail: str = "", *, now: float | None = None, retry_after: float | None = None) -> dict | None:  # fmt: skip
    """A run ended. If its attempt is still open (no receipt came), fail it by exit status; else no-op. Exit 75
    (``EX_TEMPFAIL``) is a usage limit: ``rate_limit_attempt`` with ``retry_after`` (from ``.fleet/retry_after``).

    An attempt whose receipt is pending (Forgejo could not be asked) is not settled: it did hand one in.
    """
    from fleetctl.receipts import RATE_LIMITED_EXIT

    with store.write():
        task = get_task(store, task_id)
        if task["attempt"] != attempt or task["state"] not in ACTIVE or _receipt_pending(store, task):
            return None
        if exit_code == RATE_LIMITED_EXIT:
            why = f"the run exited {RATE_LIMITED_EXIT} (a usage limit){': ' + detail if detail else ''}"
            return rate_limit_attempt(store, orch, task_id, retry_after, why, attempt=attempt, now=now)
        if exit_code in (126, 127):  # the shell's "not executable" / "command not found": it never ran
            reason, why = FailureReason.LAUNCH_FAILED, f"the agent command could not be started (exit {exit_code})"
        elif exit_code == 0:
            reason, why = FailureReason.NO_RECEIPT, "the run exited 0 without handing in a receipt"
        elif exit_code is None:
            reason, why = FailureReason.AGENT_ERROR, "the run ended without an exit status"
        else:
            reason, why = FailureReason.AGENT_ERROR, f"the run exited with status {exit_code}"
        return fail_attempt(store, orch, task_id, reason, f"{why}{': ' + detail if detail else ''}",
                            attempt=attempt, now=now, states=ACTIVE)  # fmt: skip


def expire_or_time_out(store: Store, orch: OrchestratorConfig, task: dict, reason: FailureReason, detail: str,
                       *, now: float | None = None) -> dict | None:  # fmt: skip
    """Fail the current attempt of ``task`` (as read by a sweep) unless it moved on meanwhile, or its receipt
    is pending (it waits for Forgejo, not for the agent: its lease does not expire)."""
    try:
        with store.write():
            if _receipt_pending(store, task):
                return None
            return fail_attempt(store, orch, task["task_id"], reason, detail, attempt=task["attempt"],
                                agent_id=task["agent_id"], now=now, states=ACTIVE)  # fmt: skip
    except LeaseLost:
        return None


def _receipt_pending(store: Store, task: dict) -> bool:
    """Whether the current attempt of ``task`` handed in a receipt that waits for Forgejo."""
    row = store.attempt(task["task_id"], task["attempt"]) if task.get("attempt") else None
    return bool(row and row["receipt_pending"] and row["ended_at"] is None)


# ---------------------------------------------------------------------------------------------- workspaces


def workspace_cleaned(store: Store, task_id: str, attempt: int, *, now: float | None = None) -> bool:
    """Record that the sweep removed the workspace of a settled attempt (``attempt.workspace_cleaned``, with
    the host and the path it was at). False, writing nothing, if the attempt is unknown, not settled, has no
    workspace or was already recorded as cleaned."""
    ts = now_or(now)
    with store.write():
        row = store.attempt(task_id, attempt)
        if row is None or row["ended_at"] is None or not row["workspace"] or row["workspace_cleaned_at"] is not None:
            return False
        store.emit("attempt.workspace_cleaned", ts=ts, task_id=task_id, agent_id=row["agent_id"], attempt=attempt,
                   data={"host_id": row["host_id"], "workspace": row["workspace"]})  # fmt: skip
        return True
