"""Cross-process "the queue changed" signal, so that long-polling agents wake without polling the database.

After a transaction that made a task claimable (created, re-queued, retried) commits, the store sends one
empty datagram to a Linux abstract-namespace UNIX socket named after the database file. ``fleetctl serve``
listens on it and wakes its waiting dequeuers. With no server listening the send fails silently and
costs a few microseconds. The datagram carries nothing: a stray one only triggers a re-check.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
from pathlib import Path


@functools.lru_cache(maxsize=16)
def address(db_path: str | Path) -> bytes:
    """The abstract socket address for a database file (independent of path length); remembered, since every
    commit that can free work sends one (a ``realpath`` and a digest each time were measurable in serve)."""
    digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:40]
    return b"\0fleetctl-wake-" + digest.encode()


_sender: socket.socket | None = None
_sender_lock = threading.Lock()


def notify(db_path: str | Path) -> None:
    """Tell a listening server that the queue of ``db_path`` changed (best effort, never raises)."""
    global _sender
    try:
        with _sender_lock:
            if _sender is None:
                _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                _sender.setblocking(False)
            _sender.sendto(b"", address(db_path))
    except OSError:
        pass


class Listener:
    """Receives wake datagrams for one database and calls ``on_wake`` for each (on its own thread)."""

    def __init__(self, db_path: str | Path, on_wake):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(address(db_path))
        except OSError:
            # another server already listens for this database: wakes go to it; we fall back to timers
            self.sock.close()
            self.sock = None
        self.on_wake = on_wake
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.sock is None:
            return
        self._thread = threading.Thread(target=self._run, name="fleetctl-wake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.sock is not None:
            try:
                self.sock.recv(64)
            except OSError:
                return
            self.on_wake()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
