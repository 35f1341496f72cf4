"""``fleetctl serve``: the HTTP listener for pull agents and Forgejo webhooks."""

from __future__ import annotations

import errno
import re
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleetctl.config import Config
from fleetctl.errors import ListenError, UsageError
from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.server.http import FleetHTTPServer

GRACE_SECS = 5.0


def serve(cfg: Config, *, host: str | None = None, port: int | None = None,
          ready: Callable[[str, int], None] | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM/SIGINT; then stop accepting, finish in-flight requests, return 0.

    Raises ``UsageError`` (exit 2) for a bind address that is not one (or does not resolve, or is not on
    this machine) and ``ListenError`` (exit 1) for a port in use or not permitted — before the database
    is opened.
    """
    from fleetctl.config import check_config, serves_webhooks
    from fleetctl.server.api import Api
    from fleetctl.server.http import connection_cap
    from fleetctl.wake import Listener

    check_config(cfg, serving_webhooks=serves_webhooks(cfg))  # e.g. a webhook route without a secret: refused

    server = listen(cfg.server.bind if host is None else host, cfg.server.port if port is None else port,
                    "server.bind" if host is None else "--bind")  # fmt: skip
    try:
        api = Api(cfg)
    except BaseException:
        server.server_close()
        raise
    server.api = api
    listener = Listener(cfg.orchestrator.db_path, api.waker.notify)
    listener.start()
    server.max_connections = connection_cap()  # what is left once the database and the wake socket are open
    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # only sets flags; the main thread does the work
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log("serve.listening", bind=bound_host, port=bound_port, db=cfg.orchestrator.db_path,
        max_connections=server.max_connections)  # fmt: skip
    if ready is not None:
        ready(bound_host, bound_port)
    try:
        while not stop.wait(0.5):
            _drain_spool(api)
    finally:
        log("serve.stopping")
        server.shutdown()  # stop accepting
        api.close()  # long-polls answer 204 now; keep-alive connections are closed after their request
        drained = server.drain(GRACE_SECS)
        server.server_close()
        api.shutdown()
        listener.close()
        for s, h in previous.items():
            signal.signal(s, h)
        log("serve.stopped", drained=drained)
    return 0


def _drain_spool(api) -> None:
    """Apply webhook deliveries spooled while the database was locked; errors wait for the next round."""
    from fleetctl.errors import FleetError

    try:
        api.drain_spool()
    except FleetError as exc:
        log("webhook.spool_waiting", error=exc.message)


def listen(host: str, port: int, source: str = "--bind") -> FleetHTTPServer:
    """A bound, listening ``FleetHTTPServer`` (IPv4 or IPv6, as ``host`` resolves); its ``api`` is set later.

    ``source`` names where ``host`` came from (``--bind`` or ``server.bind``), for the error message.
    """
    from fleetctl.server.http import FleetHTTPServer

    hint = " (give the port with --port or server.port)" if re.fullmatch(r"[^:\[\]]+:\d+", host) else ""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"cannot listen on {host!r} ({source}): not an address, or a name that does not "
                         f"resolve ({reason}){hint}", code="invalid_bind") from None  # fmt: skip
    family, address = infos[0][0], infos[0][4]
    where = host if address[0] == host else f"{host} ({address[0]})"
    try:
        return FleetHTTPServer(address, family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {where} is already in use", code="address_in_use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"cannot listen on {where} ({source}): that address is not on this machine",
                             code="invalid_bind") from None  # fmt: skip
        if exc.errno == errno.EACCES:
            privileged = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if 0 < port < 1024 else ""
            raise ListenError(f"cannot listen on port {port} on {where}: permission denied{privileged}",
                              code="listen_denied") from None  # fmt: skip
        raise ListenError(f"cannot listen on port {port} on {where}: {exc.strerror or exc}") from None
