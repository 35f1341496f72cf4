"""The server's single writer: one connection, one thread, group commit.

Request threads hand their write (a function of the store) to ``Writer.submit`` and wait. The writer
thread takes every write that is waiting, runs them in ONE ``BEGIN IMMEDIATE`` transaction — each in its
own savepoint, so that one request's error rolls back only that request — commits once, and then
answers them all. Under load this turns N commits (each writing a dozen WAL pages) into one, which is
what lets 32 agents claim thousands of tasks a second; with a single waiting request it is exactly one
short transaction, as before. Every write still appends its events together with its projections.
Claims (``Writer.claim``) are grouped: after the batch's other writes, all its claims run as one
``Store.claim_many`` in one savepoint (one statement per claim, then one per table for their events,
attempts and agents), and only if that fails each on its own.

The writer's connection keeps the journals of those savepoints in memory (``Store.keep_journals_in_memory``):
SQLite's default spills one to a temporary file past 64 KiB, which under the claims benchmark was half of the
writer's system calls — a page written to a file nobody reads for each page a batch touched.

WAL checkpoints are moved off the writer's COMMIT. SQLite's automatic checkpoint runs inside whichever
commit takes the WAL past 1,000 pages: it copies them into the database file there and then, stalling every
request of that batch for milliseconds and taking time from the one thread every write waits for. Here a
``Checkpointer`` thread copies the WAL back with PASSIVE checkpoints (which never block the writer) every
``CHECKPOINT_SECS``. Under a steady stream of writes a PASSIVE checkpoint never catches up with the last
frame, and the WAL only starts over when a writer finds it entirely copied, so once it is past
``WAL_RESET_PAGES`` the writer itself runs one more PASSIVE checkpoint between two batches — by then only
the last few pages are left to copy — and its next transaction starts the WAL from the beginning again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from fleetctl.errors import FleetError, StoreBusy, StoreError
from fleetctl.server.pool import NamedThread
from fleetctl.store import ClaimRequest, Store, connect_raw, translate_error, wal_checkpoint

MAX_BATCH = 64


class WriteTimeout(StoreBusy):
    """A write given a timeout (``Writer.submit``) has not committed yet; it is still queued."""

    code = "write_timeout"


#: How often the checkpointer thread copies the WAL back into the database file.
CHECKPOINT_SECS = 0.2
#: A WAL longer than this (in pages, 32 MB) is brought to a restart by the writer between two batches: a
#: checkpoint there costs a few ms whatever is left to copy (it syncs the WAL and the database file), so
#: it is done rarely; the PASSIVE ones have copied nearly everything by then.
WAL_RESET_PAGES = 8000


class _Job:
    """A write waiting for its batch: a function of the store, or a claim (``Store.claim_many``)."""

    __slots__ = ("fn", "claim", "done", "result", "error", "callback")

    def __init__(self, fn: Callable[[Store], Any] | None = None, claim: Callable[[], ClaimRequest] | None = None,
                 callback: Callable[[Any, BaseException | None], None] | None = None):  # fmt: skip
        self.fn = fn
        self.claim = claim
        self.callback = callback  # called (in the writer's thread) instead of waking a waiting thread
        self.done = threading.Lock()  # held until the batch is over: the cheapest wake-up there is
        if callback is None:
            self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self) -> None:
        if self.callback is None:
            self.done.release()
            return
        try:
            self.callback(self.result, self.error)
        except Exception as exc:  # never leave the batch's other jobs unfinished
            from fleetctl.log import log

            log("http.internal_error", error=f"{type(exc).__name__}: {exc}")


class Writer:
    """Runs writes on one connection in batches; ``submit`` blocks until its write committed (or failed)."""

    def __init__(self, store: Store, on_commit: Callable[[], None] = lambda: None):
        self.store = store
        self.on_commit = on_commit
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._closed = False
        self.checkpoint_due = False
        store.set_autocheckpoint(0)  # this connection's commits never checkpoint (above)
        store.keep_journals_in_memory()  # its savepoints' journals never spill to a file (Store)
        self.checkpointer = Checkpointer(store.path, self)
        self._thread = NamedThread(self._run, "fleetctl-writer")
        self._thread.start()

    def submit(self, fn: Callable[[Store], Any], *, timeout: float | None = None) -> Any:
        """Run ``fn(store)`` inside the next batch transaction; its result, or its exception re-raised.

        With ``timeout``: ``WriteTimeout`` when it has not committed by then (the database is locked by another
        process). The write stays queued and may still run later, so only an idempotent ``fn`` may be given one.
        """
        return self._wait(_Job(fn), timeout)

    def claim(self, request: Callable[[], ClaimRequest]) -> dict | None:
        """Claim in the next batch, together with the batch's other claims (``Store.claim_many``); the task
        or None. ``request()`` is called in the writer thread, so that its ``ts`` is the time of the claim."""
        return self._wait(_Job(claim=request))

    def claim_async(
        self, request: Callable[[], ClaimRequest], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """``claim`` without waiting: ``done(task or None, error or None)`` is called in the writer's thread
        after the batch (keep it short: it delays the batch's other answers)."""
        self._queue(_Job(claim=request, callback=done))

    def _queue(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise StoreError("the server is shutting down", code="shutting_down")
            self._pending.append(job)
            self._cond.notify()

    def _wait(self, job: _Job, timeout: float | None = None) -> Any:
        self._queue(job)
        if not job.done.acquire(timeout=-1 if timeout is None else timeout):
            raise WriteTimeout(f"the write did not commit within {timeout:g}s: the database is locked")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        self.checkpointer.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._execute(batch)
            if self.checkpoint_due:
                self.checkpoint_due = False
                self.store.checkpoint()

    def _execute(self, batch: list[_Job]) -> None:
        claims: list[_Job] = []
        try:
            with self.store.write():  # BEGIN IMMEDIATE … COMMIT (sends the cross-process wake if needed)
                for i, job in enumerate(batch):
                    if job.claim is not None:
                        claims.append(job)
                    else:
                        self._run_one(job, f"job{i}", job.fn)
                if claims:  # after the other writes: a task created in this batch can be claimed in it
                    self._run_claims(claims)
        except FleetError as exc:  # BEGIN or COMMIT failed (busy, disk full…): nothing of the batch stands
            for job in batch:
                job.error = exc
        except sqlite3.Error as exc:
            err = translate_error(exc, self.store.path)
            for job in batch:
                job.error = err
        except BaseException as exc:  # pragma: no cover - a bug; never leave a request hanging
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.finish()
        if self.store.woke:
            # Wake the waiting dequeuers after a write that may have made a task claimable or freed an
            # agent's capacity (a wake event: ``store.WAKE_EVENTS``, the same rule as the cross-process
            # wake). Never after claims or heartbeats alone: they make nothing claimable, and waking on them
            # made every waiter of a large fleet look again on every heartbeat.
            self.on_commit()

    def _run_one(self, job: _Job, savepoint: str, fn: Callable[[Store], Any]) -> None:
        """``fn`` in a savepoint of its own: its error rolls back only its own writes."""
        store = self.store
        store.savepoint(savepoint)
        try:
            job.result = fn(store)
        except Exception as exc:
            job.error = exc
            if store.in_transaction:
                store.rollback_to(savepoint)
        if store.in_transaction:
            store.release(savepoint)
        if not store.in_transaction:
            raise StoreError("the batch transaction was lost")

    def _run_claims(self, jobs: list[_Job]) -> None:
        """The batch's claims with one ``claim_many`` in one savepoint; should that fail, each on its own,
        so that one bad request cannot fail the others."""
        store = self.store
        store.savepoint("claims")
        try:
            rows = store.claim_many(_one_time([job.claim() for job in jobs]))
        except Exception:
            if not store.in_transaction:
                raise StoreError("the batch transaction was lost") from None
            store.rollback_to("claims")
            store.release("claims")
            for i, job in enumerate(jobs):
                self._run_one(job, f"claim{i}", lambda s, job=job: s.claim_many([job.claim()])[0])
            return
        store.release("claims")
        for job, row in zip(jobs, rows, strict=True):
            job.result = row


def _one_time(requests: list[ClaimRequest]) -> list[ClaimRequest]:
    """The claims of a batch are made at one time, the first's (they commit together anyway): consecutive
    claims for the best task then share one statement (``store._claim_runs``). A claim under a fleet limit
    keeps its own (its budget day is counted from it)."""
    if requests:
        ts = requests[0].ts
        for r in requests:
            if r.limits is None:
                r.ts = ts
    return requests


class Checkpointer:
    """PASSIVE checkpoints every ``CHECKPOINT_SECS`` on a connection and thread of their own."""

    def __init__(self, path, writer: Writer, interval: float = CHECKPOINT_SECS):
        self.path = path
        self.writer = writer
        self.interval = interval
        self._stop = threading.Event()
        self._thread = NamedThread(self._run, "fleetctl-checkpoint")
        self._thread.start()

    def _run(self) -> None:
        conn = connect_raw(self.path)
        try:
            while not self._stop.wait(self.interval):
                result = wal_checkpoint(conn)
                if result is not None and result[1] > WAL_RESET_PAGES:
                    self.writer.checkpoint_due = True
            wal_checkpoint(conn)
        finally:
            conn.close()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
