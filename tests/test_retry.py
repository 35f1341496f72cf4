"""The retry policy (SPEC §2 Retries), table-driven: no clock, no patched RNG — ``rand`` is injected."""

from __future__ import annotations

import pytest

from fleetctl.retry import RetryPolicy
from fleetctl.states import NOT_RETRIED, FailureReason

DEFAULT = RetryPolicy()  # SPEC defaults: 30 s doubling per attempt, capped at 600 s, half of it jitter


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, 15.0),  # 30 s: 15 fixed + 15 * rand
        (1, 0.5, 22.5),
        (1, 1.0, 30.0),
        (2, 0.0, 30.0),  # 60 s
        (2, 0.5, 45.0),
        (2, 1.0, 60.0),
        (3, 1.0, 120.0),
        (5, 0.0, 240.0),  # 480 s
        (5, 1.0, 480.0),
        (6, 0.0, 300.0),  # 960 s capped at 600
        (6, 0.5, 450.0),
        (6, 1.0, 600.0),
        (40, 1.0, 600.0),
        (5000, 1.0, 600.0),  # far past float range: still the cap, not an OverflowError
        (0, 1.0, 30.0),  # attempt numbers below 1 count as the first
        (-3, 0.0, 15.0),
    ],
)
def test_backoff_table(attempt, rand, expected):
    assert DEFAULT.backoff(attempt, lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("policy", "attempt", "rand", "expected"),
    [
        (RetryPolicy(jitter=0.0), 2, 0.9, 60.0),  # no jitter: the exact delay whatever rand says
        (RetryPolicy(jitter=1.0), 2, 0.0, 0.0),  # all jitter: anywhere from 0 …
        (RetryPolicy(jitter=1.0), 2, 1.0, 60.0),  # … to the delay
        (RetryPolicy(base=1, factor=3, cap=1000, jitter=0), 4, 0.5, 27.0),
        (RetryPolicy(base=10, factor=1, cap=5, jitter=0), 3, 0.5, 5.0),  # cap below base wins
        (RetryPolicy(base=0, cap=0), 9, 1.0, 0.0),
        (RetryPolicy(base=0, cap=600, jitter=0), 5000, 1.0, 0.0),  # zero base stays zero, however late
    ],
)
def test_backoff_parameters(policy, attempt, rand, expected):
    assert policy.backoff(attempt, lambda: rand) == pytest.approx(expected)


def test_backoff_never_exceeds_the_cap_and_never_decreases():
    for rand in (0.0, 0.5, 1.0):
        delays = [DEFAULT.backoff(n, lambda r=rand: r) for n in range(1, 30)]
        assert all(0 <= d <= DEFAULT.cap for d in delays)
        assert delays == sorted(delays)


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "reason", "retry", "not_before", "why"),
    [
        (1, 3, "agent_error", True, 1000 + 22.5, "attempt 2 of 3 in 22s"),
        (2, 3, "timeout", True, 1000 + 45.0, "attempt 3 of 3 in 45s"),
        (3, 3, "agent_error", False, None, "no attempts left (3 of 3 used)"),
        (4, 3, "agent_lost", False, None, "no attempts left (4 of 3 used)"),
        (1, 1, "no_receipt", False, None, "no attempts left (1 of 1 used)"),
        (1, 5, "pr_closed", False, None, "pr_closed is never retried automatically"),
        (1, 5, FailureReason.PR_CLOSED, False, None, "pr_closed is never retried automatically"),
    ],
)
def test_decide_table(attempt, max_attempts, reason, retry, not_before, why):
    d = DEFAULT.decide(attempt=attempt, max_attempts=max_attempts, reason=reason, now=1000.0, rand=lambda: 0.5)
    assert (d.retry, d.not_before, d.why) == (retry, not_before, why)


@pytest.mark.parametrize("reason", [r for r in FailureReason if r not in NOT_RETRIED], ids=str)
def test_every_other_reason_is_retried_while_attempts_remain(reason):
    d = DEFAULT.decide(attempt=1, max_attempts=2, reason=reason, now=0.0, rand=lambda: 0.0)
    assert d.retry and d.not_before == 15.0
    assert not DEFAULT.decide(attempt=2, max_attempts=2, reason=reason, now=0.0).retry


def test_pr_closed_is_never_retried_whatever_the_budget():
    for attempt in (1, 2, 50):
        assert not DEFAULT.decide(attempt=attempt, max_attempts=1000, reason="pr_closed", now=0.0).retry


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError):
        DEFAULT.decide(attempt=1, max_attempts=3, reason="bored", now=0.0)


def test_default_rand_stays_within_the_jitter_window():
    for _ in range(200):
        assert 15.0 <= DEFAULT.backoff(1) <= 30.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": -1}, "must not be negative"),
        ({"cap": -0.5}, "must not be negative"),
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"jitter": -0.1}, "jitter must be within"),
        ({"jitter": 1.5}, "jitter must be within"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("kwargs", [{"base": 0, "cap": 0}, {"factor": 1}, {"jitter": 0}, {"jitter": 1}])
def test_constructor_accepts_the_edges(kwargs):
    RetryPolicy(**kwargs)
