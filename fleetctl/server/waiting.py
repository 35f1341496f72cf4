"""Where a long-poll waits: dequeues that found nothing to claim are parked here, on the event loop, holding
no thread, until a write may have made a task claimable for them.

Waking every waiter on every change does not scale: with 5,000 agents waiting, one new task would make
5,000 claims. So after a change (``Api.generation`` moved: a write of this process, a wake datagram from
another one, a backoff or a cooldown that ended) the room reads a ``ClaimOutlook`` once — the requirement
sets of the tasks claimable now and how many of each, which agents hold how much work, which are draining
or cooling down — and wakes, oldest waiter first, only as many waiters as there are tasks they could take.
A woken waiter claims (the claim decides, as always); one that claims nothing is not woken again until the
next change, and the room looks for another taker at once. So the outlook only has to be right about who
*may* claim: what it does not model (budgets, a race with another process) costs a wasted wake, never a
lost one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fleetctl.log import log
from fleetctl.server.http import Response

if TYPE_CHECKING:
    from fleetctl.server.api import Api, Pending
    from fleetctl.server.http import Connection
    from fleetctl.server.pool import Pool
    from fleetctl.store import ClaimOutlook

#: How long after a failed outlook read the room tries again (the database was locked or busy).
RETRY_SECS = 0.5


class Waiter:
    """A parked long-poll: what it asked for, the connection to answer, its deadline's timer."""

    __slots__ = ("pending", "conn", "timer", "caps", "woken_for")

    def __init__(self, pending: Pending, conn: Connection):
        self.pending = pending
        self.conn = conn
        self.timer: asyncio.TimerHandle | None = None
        self.caps = frozenset(pending.agent["capabilities"])
        self.woken_for: frozenset[str] | None = None  # the requirement set it was woken to claim


class WaitRoom:
    """The parked long-polls of one ``serve``; every method runs on the event loop."""

    def __init__(self, api: Api, loop: asyncio.AbstractEventLoop, pool: Pool):
        self.api = api
        self.loop = loop
        self.pool = pool
        self.waiters: dict[Waiter, None] = {}  # oldest first
        self.trying: dict[frozenset[str], int] = {}  # requirement set -> woken waiters claiming for it now
        self.closed = False
        self._reading = False  # an outlook read is on its way
        self._again = False  # a change came while it was: read again after it
        self._outlook: ClaimOutlook | None = None
        self._outlook_gen = -1  # the generation the outlook was read at
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")  # wall-clock time the timer is set for
        self._posted = False  # a change from another thread is already on its way to the loop

    # ------------------------------------------------------------------ from other threads

    def post_change(self) -> None:
        """``Api.generation`` moved (called from any thread): look again, on the loop, soon."""
        if not self._posted and not self.loop.is_closed():
            self._posted = True
            try:
                self.loop.call_soon_threadsafe(self._posted_change)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _posted_change(self) -> None:
        self._posted = False
        self.changed()

    # ------------------------------------------------------------------ parking and answering

    def add(self, pending: Pending, conn: Connection) -> Waiter | None:
        """Park a long-poll whose claim found nothing (or answer it at once: closing, or out of time)."""
        if self.closed or time.monotonic() >= pending.deadline:
            conn.answer(Response(204))
            return None
        waiter = Waiter(pending, conn)
        waiter.timer = self.loop.call_at(pending.deadline, self._expire, waiter)
        self.waiters[waiter] = None
        cooldown = pending.agent.get("cooldown_until") or 0
        if cooldown > self.api.clock():
            self._wake_at(cooldown)  # no event marks the end of a cooldown
        if self._outlook_gen != self.api.generation:
            self.changed()  # the outlook (and its timers) is not of now: read it
        elif pending.tried < self._outlook_gen:
            self._assign()  # its claim was older than the outlook: it may take a task of it
        return waiter

    def _unpark(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out of the room (True if it was in) and drop its timer — which refers back to it:
        left in place, that cycle would leave every long-poll to the cyclic garbage collector."""
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        return self.waiters.pop(waiter, 0) is None

    def forget(self, waiter: Waiter) -> bool:
        """The client went away; True if the waiter was parked (not claiming)."""
        return self._unpark(waiter)

    def _expire(self, waiter: Waiter) -> None:
        if self._unpark(waiter):
            waiter.conn.answer(Response(204))

    def close(self) -> None:
        """Shutting down: every parked long-poll is answered 204 now (woken ones answer when their claim ends)."""
        self.closed = True
        for waiter in list(self.waiters):
            self._unpark(waiter)
            waiter.conn.answer(Response(204))
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------------ looking and waking

    def changed(self) -> None:
        """Something may have become claimable: read the outlook (one read at a time) and wake takers."""
        if self.closed:
            return
        if self._reading:
            self._again = True
            return
        if not self.waiters:
            self._outlook_gen = -1  # read afresh for the next waiter
            return
        self._reading = True
        gen = self.api.generation
        self.pool.submit(self.api.outlook, (), lambda outlook: self._read(gen, outlook))

    def _read(self, gen: int, outlook: ClaimOutlook | BaseException) -> None:
        self._reading = False
        if isinstance(outlook, BaseException):  # e.g. the database is locked for longer than its busy timeout
            log("serve.outlook_failed", error=getattr(outlook, "message", None) or type(outlook).__name__)
            self.loop.call_later(RETRY_SECS, self.changed)
            return
        self._outlook, self._outlook_gen = outlook, gen
        if outlook.next_ready is not None:
            self._wake_at(outlook.next_ready)
        self._assign()
        if self._again:
            self._again = False
            self.changed()

    def _assign(self) -> None:
        """Wake, oldest first, the waiters that may claim a task of the outlook: one per task."""
        outlook, gen = self._outlook, self._outlook_gen
        if outlook is None or not outlook.ready or self.closed:
            return
        counts = {reqs: n - self.trying.get(reqs, 0) for reqs, n in outlook.ready.items()}
        counts = {reqs: n for reqs, n in counts.items() if n > 0}  # tasks a claim on its way may take
        if not counts:
            return
        now = self.api.clock()
        for waiter in list(self.waiters):
            pending = waiter.pending
            if pending.tried >= gen:  # it claimed since this outlook was read: nothing for it
                continue
            agent_id = pending.agent["agent_id"]
            if agent_id in outlook.draining:
                continue
            cooldown = outlook.cooling.get(agent_id)
            if cooldown is not None and cooldown > now:
                self._wake_at(cooldown)
                continue
            if outlook.active.get(agent_id, 0) >= pending.agent["max_concurrency"]:
                continue
            for requirements in counts:
                if requirements <= waiter.caps:
                    counts[requirements] -= 1
                    if not counts[requirements]:
                        del counts[requirements]
                    self._wake(waiter, requirements)
                    break
            if not counts:
                return

    def _wake(self, waiter: Waiter, requirements: frozenset[str]) -> None:
        self._unpark(waiter)
        waiter.woken_for = requirements
        self.trying[requirements] = self.trying.get(requirements, 0) + 1
        gen = self.api.generation
        self.pool.submit(self.api.claim_for, (waiter.pending,), lambda response: self._tried(waiter, gen, response))

    def _tried(self, waiter: Waiter, gen: int, response: Response | None | BaseException) -> None:
        reqs = waiter.woken_for
        self.trying[reqs] -= 1
        if not self.trying[reqs]:
            del self.trying[reqs]
        self.changed()  # read again, after this claim: what is left, and for whom (it is not counted twice)
        if isinstance(response, BaseException):  # pragma: no cover - claim_for answers every error itself
            log("http.internal_error", error=type(response).__name__)
            response = Response(500)
        if response is not None or waiter.conn.closed:  # claimed (or an error), or the client went away
            waiter.conn.answer(response or Response(204))
            return
        waiter.pending.tried = gen  # not woken again before the next change
        parked = self.add(waiter.pending, waiter.conn)
        if parked is not None:
            waiter.conn.waiting = parked

    def _wake_at(self, when: float) -> None:
        """Make a change at wall-clock ``when`` (a backoff or a cooldown ends; no event marks either)."""
        if when >= self._timer_at and self._timer is not None and not self._timer.cancelled():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        delay = max(0.0, when - self.api.clock()) + 0.005
        self._timer = self.loop.call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.api.notify()  # a new generation: waiters that tried before it may claim again
