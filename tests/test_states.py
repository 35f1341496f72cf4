"""The task state machine against SPEC §2, pair by pair.

The expected table below is written from the SPEC's lifecycle table, row by row, not read back from
``fleetctl.states.TRANSITIONS``: if either drifts, the exhaustive product test names the pair.
"""

from __future__ import annotations

import itertools

import pytest

from fleetctl.errors import ExitCode, InvalidTransition
from fleetctl.projections import Projections, apply
from fleetctl.states import TERMINAL, TRANSITIONS, TaskState, Transition, from_states, next_state

# SPEC §2, one entry per table row: (from states, transition kind, to state).
SPEC_ROWS = [
    (["queued"], "assigned", "assigned"),  # dispatch picks an agent / a pull agent dequeues it
    (["assigned"], "started", "running"),  # the run started
    (["assigned", "running"], "awaiting_review", "awaiting_review"),  # receipt names an open PR
    (["assigned", "running"], "completed", "completed"),  # receipt accepted, no PR required
    (["awaiting_review"], "completed", "completed"),  # the PR is merged
    (["assigned", "running", "awaiting_review"], "requeued", "queued"),  # failed, attempts remain
    (["assigned", "running", "awaiting_review"], "failed", "failed"),  # failed, none remain / not retried
    (["failed", "cancelled"], "retried", "queued"),  # operator retry, issue re-opened / re-labelled
    (["queued", "assigned", "running", "awaiting_review"], "cancelled", "cancelled"),  # any non-terminal
    (["awaiting_review"], "rework", "queued"),  # changes requested: a new attempt carries the review
    (["assigned", "running"], "rate_limited", "queued"),  # a usage limit: re-queued, the agent cools down
]
EXPECTED = {(src, kind): to for sources, kind, to in SPEC_ROWS for src in sources}
ALL_PAIRS = list(itertools.product(TaskState, Transition))


def test_the_spec_table_names_every_state_and_transition():
    assert {s for s, _ in EXPECTED} | set(EXPECTED.values()) == {s.value for s in TaskState}
    assert {k for _, k in EXPECTED} == {k.value for k in Transition}


def test_table_equals_spec():
    assert {(s.value, k.value): t.value for (s, k), t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("state", "kind"), ALL_PAIRS, ids=[f"{s.value}-{k.value}" for s, k in ALL_PAIRS])
def test_every_pair(state, kind):
    expected = EXPECTED.get((state.value, kind.value))
    if expected is not None:
        assert next_state(state, kind) == TaskState(expected)
        assert next_state(state.value, kind.value) == TaskState(expected)  # plain strings from the db
        return
    with pytest.raises(InvalidTransition) as err:
        next_state(state, kind)
    exc = err.value
    assert exc.code == "invalid_transition" and exc.exit_code == ExitCode.CONFLICT
    assert exc.details == {"state": state.value, "transition": kind.value}
    said = state.value.replace("_", " ")
    assert exc.message.startswith("cannot ") and f"a task that is {said}" in exc.message
    # said the way an operator thinks: no internal transition names ("allowed from failed: retried")
    assert "allowed from" not in exc.message and "_" not in exc.message


def test_only_completed_is_a_dead_end():
    # SPEC: completed is terminal; failed and cancelled can still be retried by an operator.
    dead_ends = {s for s in TaskState if not any(src == s.value for src, _ in EXPECTED)}
    assert dead_ends == {TaskState.COMPLETED}
    assert TERMINAL == {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}


@pytest.mark.parametrize("kind", list(Transition), ids=lambda k: k.value)
def test_from_states(kind):
    assert from_states(kind) == {TaskState(s) for (s, k) in EXPECTED if k == kind.value}


@pytest.mark.parametrize(("state", "kind"), sorted(EXPECTED), ids=[f"{s}-{k}" for s, k in sorted(EXPECTED)])
def test_the_event_reducer_lands_where_the_table_says(state, kind):
    """Each transition is also the event ``task.<kind>``; replaying it must reach the same state."""
    p = Projections(tasks={"t1": {"task_id": "t1", "state": state, "attempt": 1, "agent_id": "a1"}})
    ev = {"id": 2, "ts": 10.0, "type": f"task.{kind}", "task_id": "t1", "agent_id": "a1", "attempt": 1,
          "data": {"max_attempts": 3}}  # fmt: skip
    apply(p, ev)
    assert p.tasks["t1"]["state"] == EXPECTED[(state, kind)]


def test_each_rule_names_exactly_the_states_the_table_allows():
    """The operator-worded rule of each transition agrees with the table ("only failed or cancelled …")."""
    from fleetctl.states import _RULE

    for kind in Transition:
        rule = _RULE[kind]
        subject = rule.split(" tasks")[0]  # "only failed or cancelled" | "completed, failed and cancelled"
        named = {s for s in TaskState if s.value.replace("_", " ") in subject}
        if kind == Transition.CANCELLED:  # said as the states that cannot be cancelled
            assert named == set(TERMINAL) == set(TaskState) - from_states(kind), rule
        else:
            assert named == from_states(kind), (kind, rule)


def test_transition_members_are_named_after_their_events():
    for kind in Transition:
        assert kind.name.lower() == kind.value, kind
