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
    """The kinds of change a task can go through; each is also an event type ``task.<kind>``."""

    ASSIGN = "assigned"
    START = "started"
    AWAIT_REVIEW = "awaiting_review"
    COMPLETE = "completed"
    RETRY_LATER = "requeued"  # attempt failed, attempts remain: back to queued with backoff
    FAIL = "failed"  # attempt failed, none remain (or must not be retried)
    CANCEL = "cancelled"
    REQUEUE = "retried"  # operator retry / issue re-opened: a new attempt budget


class FailureReason(StrEnum):
    """Why an attempt failed; every failure carries one."""

    TIMEOUT = "timeout"
    AGENT_LOST = "agent_lost"
    AGENT_ERROR = "agent_error"
    NO_RECEIPT = "no_receipt"
    RECEIPT_INVALID = "receipt_invalid"
    LAUNCH_FAILED = "launch_failed"
    PR_CLOSED = "pr_closed"


#: Failures that are never retried automatically, whatever the attempt budget says.
NOT_RETRIED = frozenset({FailureReason.PR_CLOSED})

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
    (Q, Transition.ASSIGN): A,
    (A, Transition.START): R,
    (A, Transition.AWAIT_REVIEW): W,
    (R, Transition.AWAIT_REVIEW): W,
    (A, Transition.COMPLETE): C,
    (R, Transition.COMPLETE): C,
    (W, Transition.COMPLETE): C,
    (A, Transition.RETRY_LATER): Q,
    (R, Transition.RETRY_LATER): Q,
    (W, Transition.RETRY_LATER): Q,
    (A, Transition.FAIL): F,
    (R, Transition.FAIL): F,
    (W, Transition.FAIL): F,
    (F, Transition.REQUEUE): Q,
    (X, Transition.REQUEUE): Q,
    (Q, Transition.CANCEL): X,
    (A, Transition.CANCEL): X,
    (R, Transition.CANCEL): X,
    (W, Transition.CANCEL): X,
}


def next_state(state: TaskState | str, kind: Transition | str) -> TaskState:
    """The state after ``kind`` from ``state``, or ``InvalidTransition`` if the table forbids it."""
    state, kind = TaskState(state), Transition(kind)
    try:
        return TRANSITIONS[(state, kind)]
    except KeyError:
        allowed = sorted(k.value for (s, k) in TRANSITIONS if s == state)
        hint = f"; allowed from {state.value}: {', '.join(allowed)}" if allowed else " (terminal state)"
        raise InvalidTransition(
            f"cannot {_VERBS[kind]} a task that is {state.value}{hint}",
            details={"state": state.value, "transition": kind.value},
        ) from None


def from_states(kind: Transition | str) -> frozenset[TaskState]:
    """Every state from which ``kind`` is allowed (used to build guarded updates)."""
    kind = Transition(kind)
    return frozenset(s for (s, k) in TRANSITIONS if k == kind)


_VERBS = {
    Transition.ASSIGN: "assign",
    Transition.START: "start",
    Transition.AWAIT_REVIEW: "put up for review",
    Transition.COMPLETE: "complete",
    Transition.RETRY_LATER: "re-queue after a failed attempt",
    Transition.FAIL: "fail",
    Transition.CANCEL: "cancel",
    Transition.REQUEUE: "retry",
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
