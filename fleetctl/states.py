"""The task state machine (SPEC §2) as a pure transition table.

Every change of a task's state is one of the ``Transition`` kinds below. ``next_state(state, kind)``
is the only place that decides whether a change is allowed; the store turns each allowed change into
a guarded ``UPDATE … WHERE state = :expected`` plus an event row in the same transaction.
The table is rendered into docs/architecture.md and tested exhaustively (tests/test_states.py).
"""

from __future__ import annotations

from enum import StrEnum

from fleetctl.errors import InvalidTransition


class TaskState(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"  # waiting for an agent (possibly until ``not_before`` after a failed attempt)
    ASSIGNED = "assigned"  # claimed by an agent under a lease; the run has not confirmed its start
    RUNNING = "running"  # the run started (launch confirmed, or the agent reported running)
    AWAITING_REVIEW = "awaiting_review"  # a receipt naming an open pull request was accepted
    COMPLETED = "completed"  # done for good (terminal)
    FAILED = "failed"  # no attempts left, or a failure that must not be retried
    CANCELLED = "cancelled"  # stopped by an operator or by the issue (closed, unlabelled)


TERMINAL = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
ACTIVE = frozenset({TaskState.ASSIGNED, TaskState.RUNNING})  # holding an agent's capacity
LEASED = frozenset({TaskState.ASSIGNED, TaskState.RUNNING, TaskState.AWAITING_REVIEW})


class Transition(StrEnum):
    """The kinds of change a task can go through, named after their event: ``Transition.X`` is ``task.x``."""

    ASSIGNED = "assigned"  # queued → assigned: an agent claimed it
    STARTED = "started"  # assigned → running: the run started
    AWAITING_REVIEW = "awaiting_review"  # a receipt naming an open pull request was accepted
    COMPLETED = "completed"  # done (receipt without a required pull request, or the pull request merged)
    REQUEUED = "requeued"  # the attempt failed and attempts remain: back to queued, with backoff
    FAILED = "failed"  # the attempt failed and none remain (or it must not be retried)
    CANCELLED = "cancelled"  # operator cancel, issue closed or unlabelled
    RETRIED = "retried"  # operator retry / issue re-opened: queued again with a new attempt budget
    REWORK = "rework"  # awaiting_review → queued: the pull request got "changes requested" (not a failure)
    RATE_LIMITED = "rate_limited"  # assigned/running → queued: the agent hit a usage limit (not a failure)


class FailureReason(StrEnum):
    """Why an attempt failed; every failure carries one."""

    TIMEOUT = "timeout"
    AGENT_LOST = "agent_lost"
    AGENT_ERROR = "agent_error"
    NO_RECEIPT = "no_receipt"
    RECEIPT_INVALID = "receipt_invalid"
    LAUNCH_FAILED = "launch_failed"
    PR_CLOSED = "pr_closed"
    RATE_LIMITED = "rate_limited"  # the agent hit a usage limit: re-queued without consuming a retry
    BUDGET_EXCEEDED = "budget_exceeded"  # over the task's spending budget


#: Failures that are never retried automatically, whatever the attempt budget says.
NOT_RETRIED = frozenset({FailureReason.PR_CLOSED, FailureReason.BUDGET_EXCEEDED})

Q, A, R, W, C, F, X = (
    TaskState.QUEUED,
    TaskState.ASSIGNED,
    TaskState.RUNNING,
    TaskState.AWAITING_REVIEW,
    TaskState.COMPLETED,
    TaskState.FAILED,
    TaskState.CANCELLED,
)

#: (from state, transition) -> to state. Anything not listed is refused.
TRANSITIONS: dict[tuple[TaskState, Transition], TaskState] = {
    (Q, Transition.ASSIGNED): A,
    (A, Transition.STARTED): R,
    (A, Transition.AWAITING_REVIEW): W,
    (R, Transition.AWAITING_REVIEW): W,
    (A, Transition.COMPLETED): C,
    (R, Transition.COMPLETED): C,
    (W, Transition.COMPLETED): C,
    (A, Transition.REQUEUED): Q,
    (R, Transition.REQUEUED): Q,
    (W, Transition.REQUEUED): Q,
    (A, Transition.FAILED): F,
    (R, Transition.FAILED): F,
    (W, Transition.FAILED): F,
    (F, Transition.RETRIED): Q,
    (X, Transition.RETRIED): Q,
    (W, Transition.REWORK): Q,
    (A, Transition.RATE_LIMITED): Q,
    (R, Transition.RATE_LIMITED): Q,
    (Q, Transition.CANCELLED): X,
    (A, Transition.CANCELLED): X,
    (R, Transition.CANCELLED): X,
    (W, Transition.CANCELLED): X,
}


def next_state(state: TaskState | str, kind: Transition | str) -> TaskState:
    """The state after ``kind`` from ``state``, or ``InvalidTransition`` if the table forbids it.

    The refusal is said the way an operator thinks ("only failed or cancelled tasks can be retried"),
    never in the table's internal names.
    """
    state, kind = TaskState(state), Transition(kind)
    try:
        return TRANSITIONS[(state, kind)]
    except KeyError:
        raise InvalidTransition(
            f"cannot {_VERBS[kind]} a task that is {_SAID[state]}: {_RULE[kind]}",
            details={"state": state.value, "transition": kind.value},
        ) from None


def from_states(kind: Transition | str) -> frozenset[TaskState]:
    """Every state from which ``kind`` is allowed (used to build guarded updates)."""
    kind = Transition(kind)
    return frozenset(s for (s, k) in TRANSITIONS if k == kind)


_SAID = {s: s.value.replace("_", " ") for s in TaskState}

_VERBS = {
    Transition.ASSIGNED: "assign",
    Transition.STARTED: "start",
    Transition.AWAITING_REVIEW: "put up for review",
    Transition.COMPLETED: "complete",
    Transition.REQUEUED: "re-queue after a failed attempt",
    Transition.FAILED: "fail",
    Transition.CANCELLED: "cancel",
    Transition.RETRIED: "retry",
    Transition.REWORK: "send back for rework",
    Transition.RATE_LIMITED: "re-queue after a usage limit",
}

#: Each transition's rule in an operator's words (tests/test_states.py checks they match the table).
_RULE = {
    Transition.ASSIGNED: "only queued tasks can be assigned",
    Transition.STARTED: "only assigned tasks can start running",
    Transition.AWAITING_REVIEW: "only assigned or running tasks can hand in a receipt",
    Transition.COMPLETED: "only assigned, running or awaiting review tasks can complete",
    Transition.REQUEUED: "only assigned, running or awaiting review tasks have an attempt that can fail",
    Transition.FAILED: "only assigned, running or awaiting review tasks have an attempt that can fail",
    Transition.CANCELLED: "completed, failed and cancelled tasks cannot be cancelled",
    Transition.RETRIED: "only failed or cancelled tasks can be retried",
    Transition.REWORK: "only awaiting review tasks can be sent back for rework",
    Transition.RATE_LIMITED: "only assigned or running tasks have an attempt that can hit a usage limit",
}


class AgentStatus(StrEnum):
    """An agent's availability."""

    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"  # finishes what it has, takes nothing new


class AgentMode(StrEnum):
    """How an agent receives work."""

    SSH_CLI = "ssh_cli"  # fleetctl launches it on a configured host
    HTTP_PULL = "http_pull"  # it dequeues over the HTTP API
