"""The server's single writer: one connection, one thread, group commit.

Request threads hand their write (a function of the store) to ``Writer.submit`` and wait. The writer
thread takes every write that is waiting, runs them in ONE ``BEGIN IMMEDIATE`` transaction — each in its
own savepoint, so that one request's error rolls back only that request — commits once, and then
answers them all. Under load this turns N commits (each writing a dozen WAL pages) into one, which is
what lets 32 agents claim thousands of tasks a second; with a single waiting request it is exactly one
short transaction, as before. Every write still appends its events together with its projections.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from fleetctl.errors import FleetError, StoreError
from fleetctl.store import Store, _translate

MAX_BATCH = 64


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[Store], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Writer:
    """Runs writes on one connection in batches; ``submit`` blocks until its write committed (or failed)."""

    def __init__(self, store: Store, on_commit: Callable[[], None] = lambda: None):
        self.store = store
        self.on_commit = on_commit
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fleetctl-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Store], Any]) -> Any:
        """Run ``fn(store)`` inside the next batch transaction; its result, or its exception re-raised."""
        job = _Job(fn)
        with self._cond:
            if self._closed:
                raise StoreError("the server is shutting down", code="shutting_down")
            self._pending.append(job)
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._execute(batch)

    def _execute(self, batch: list[_Job]) -> None:
        conn = self.store.conn
        try:
            with self.store.write():  # BEGIN IMMEDIATE … COMMIT (sends the cross-process wake if needed)
                for i, job in enumerate(batch):
                    savepoint = f"job{i}"
                    conn.execute(f"SAVEPOINT {savepoint}")
                    try:
                        job.result = job.fn(self.store)
                    except Exception as exc:
                        job.error = exc
                        if conn.in_transaction:
                            conn.execute(f"ROLLBACK TO {savepoint}")
                    if conn.in_transaction:
                        conn.execute(f"RELEASE {savepoint}")
                    if not conn.in_transaction:
                        raise StoreError("the batch transaction was lost")
        except FleetError as exc:  # BEGIN or COMMIT failed (busy, disk full…): nothing of the batch stands
            for job in batch:
                job.error = exc
        except sqlite3.Error as exc:
            err = _translate(exc, self.store.path)
            for job in batch:
                job.error = err
        except BaseException as exc:  # pragma: no cover - a bug; never leave a request hanging
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.done.set()
        self.on_commit()
