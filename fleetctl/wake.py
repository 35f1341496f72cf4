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


def bind_listener(db_path: str | Path) -> socket.socket | None:
    """The socket that receives the wake datagrams of ``db_path`` (non-blocking), for the one server of
    that database; None when another server already listens for it (wakes go there; this one's long-polls
    still wake on its own writes and on their timers)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address(db_path))
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock
