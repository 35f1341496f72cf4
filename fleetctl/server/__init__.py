"""``fleetctl serve``: the HTTP listener for pull agents (and, later, Forgejo webhooks)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from fleetctl.config import Config
from fleetctl.log import log

GRACE_SECS = 5.0


def serve(cfg: Config, *, host: str | None = None, port: int | None = None,
          ready: Callable[[str, int], None] | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM/SIGINT; then stop accepting, finish in-flight requests, return 0."""
    from fleetctl.server.api import Api
    from fleetctl.server.http import FleetHTTPServer
    from fleetctl.wake import Listener

    api = Api(cfg)
    server = FleetHTTPServer((host or cfg.server.bind, cfg.server.port if port is None else port), api)
    listener = Listener(cfg.orchestrator.db_path, api.waker.notify)
    listener.start()
    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # only sets flags; the main thread does the work
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log("serve.listening", bind=bound_host, port=bound_port, db=cfg.orchestrator.db_path)
    if ready is not None:
        ready(bound_host, bound_port)
    try:
        while not stop.wait(0.5):
            pass
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
