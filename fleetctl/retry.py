"""The retry decision, as one pure function (SPEC §2 Retries).

A task may run ``max_attempts`` attempts. After a failed attempt ``n`` it is retried, if attempts remain
and the reason allows it, no earlier than ``now + backoff(n)``: exponential from ``base`` doubling per
attempt, capped at ``cap``, with "equal jitter" (half fixed, half random) so that a burst of failures does
not come back as a burst. The random source is injected, so tests need no clock or RNG patching.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fleetctl.states import NOT_RETRIED, FailureReason


@dataclass(frozen=True)
class RetryDecision:
    """``retry`` True: back to queued, not before ``not_before``. False: the task fails for good."""

    retry: bool
    not_before: float | None
    why: str


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters; validated on construction."""

    base: float = 30.0
    cap: float = 600.0
    factor: float = 2.0
    jitter: float = 0.5  # fraction of the delay that is random

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ValueError("retry backoff must not be negative")
        if self.factor < 1:
            raise ValueError("retry backoff factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry jitter must be within [0, 1]")

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            growth = self.factor ** max(0, attempt - 1)
        except OverflowError:  # attempt ~1025+ (``retries:N`` allows that many): past any cap
            growth = float("inf")
        delay = min(self.cap, self.base * growth) if self.base else 0.0
        fixed = delay * (1 - self.jitter)
        return fixed + delay * self.jitter * rand()

    def decide(
        self,
        *,
        attempt: int,
        max_attempts: int,
        reason: FailureReason | str,
        now: float,
        rand: Callable[[], float] = random.random,
    ) -> RetryDecision:
        """Retry or fail after attempt ``attempt`` of ``max_attempts`` failed for ``reason``."""
        reason = FailureReason(reason)
        if reason in NOT_RETRIED:
            return RetryDecision(False, None, f"{reason.value} is never retried automatically")
        if attempt >= max_attempts:
            return RetryDecision(False, None, f"no attempts left ({attempt} of {max_attempts} used)")
        delay = self.backoff(attempt, rand)
        return RetryDecision(True, now + delay, f"attempt {attempt + 1} of {max_attempts} in {delay:.0f}s")
