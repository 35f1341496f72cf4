"""The threads that run request handlers for the event loop, and hand the results back in batches.

``concurrent.futures`` would do, but each request paid for a ``Future`` (a condition and a lock), and
each result for its own wake-up of the loop (a write to its self-pipe and an epoll round): under the
claims benchmark that was several system calls and GIL hand-offs per request. Here a job is a tuple on a
``SimpleQueue``; results go on a deque, and the loop is woken once for however many are waiting.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

from fleetctl.log import log


class NamedThread(threading.Thread):
    """A daemon thread whose name is also its name for the kernel (Linux's ``PR_SET_NAME``, 15 bytes), so
    that ``top -H``, ``ps -L`` and ``/proc/PID/task/*/comm`` tell serve's threads apart — the benchmarks
    read each one's CPU from there."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(target=target, name=name, daemon=True)

    def run(self) -> None:
        prctl(PR_SET_NAME, self.name.encode()[:15])
        super().run()


PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15


def prctl(option: int, arg: int | bytes) -> bool:
    """Linux's ``prctl(option, arg)`` for the calling thread or process; False where there is none."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return False
    return True


class Pool:
    """``threads`` daemon threads; ``submit(fn, args, done)`` runs ``fn(*args)`` on one of them and then
    ``done(result)`` on the loop (``result`` is the exception if ``fn`` raised one)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str = "fleetctl-request"):
        self.loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: collections.deque = collections.deque()
        self._posted = False  # a wake-up of the loop is on its way: it will take every result queued by then
        self._threads = [NamedThread(self._work, f"{name}-{i}") for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], args: tuple, done: Callable[[Any], None]) -> None:
        self._jobs.put((fn, args, done))

    def hand_back(self, done: Callable[[Any], None], result: Any) -> None:
        """From any thread: ``done(result)`` on the loop, with the results of the pool's own threads."""
        self._results.append((done, result))
        if not self._posted:
            self._posted = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: serve is past its grace period
                pass

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a thread of the pool, awaited from the loop."""
        future = self.loop.create_future()

        def done(result: Any) -> None:
            if future.cancelled():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.submit(fn, args, done)
        return await future

    def close(self) -> None:
        """Let the threads end after the jobs already queued (they are daemons: nobody waits for them)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to ``done``, which answers it (never a traceback)
                result = exc
            self.hand_back(done, result)

    def _deliver(self) -> None:
        self._posted = False  # before taking them: a result queued from now on posts a wake-up of its own
        results = self._results
        while results:
            done, result = results.popleft()
            try:
                done(result)
            except Exception as exc:  # a bug in a callback must not stop the others
                log("http.internal_error", error=f"{type(exc).__name__}: {exc}")
