"""``fleetctl serve``: the HTTP listener for pull agents and Forgejo webhooks.

One process serves every connection on one asyncio event loop (``http.py``), runs handlers in a pool of
``REQUEST_THREADS`` threads, writes through one group-committing writer (``writer.py``) and parks
long-polls in a ``WaitRoom`` (``waiting.py``). ``--workers N`` forks N such processes, each with its own
listening socket on the same port (``SO_REUSEPORT``: the kernel spreads new connections over them) and its
own writer; a small supervisor process restarts a worker that dies, forwards the cross-process wake
(``fleetctl.wake``) to every worker, and on SIGTERM stops them all.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import select
import signal
import socket
import time
from typing import TYPE_CHECKING

from fleetctl.config import Config
from fleetctl.errors import ListenError, UsageError
from fleetctl.log import log

if TYPE_CHECKING:
    from fleetctl.server.api import Api
    from fleetctl.server.pool import Pool

GRACE_SECS = 5.0
#: Threads that run request handlers (long-polls that wait hold none).
REQUEST_THREADS = 64
#: How often the spooled webhook deliveries are looked at.
SPOOL_SECS = 0.5
MAX_WORKERS = 64
#: A worker that dies sooner than this after its start is restarted only after this long (no busy loop).
RESTART_BACKOFF_SECS = 1.0
#: A worker that dies that soon this many times in a row stops the whole serve (exit 1; systemd restarts it).
MAX_QUICK_FAILURES = 5


def serve(cfg: Config, *, host: str | None = None, port: int | None = None, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; then stop accepting, answer parked long-polls (204), finish in-flight
    requests within ``GRACE_SECS``, return 0.

    Raises ``UsageError`` (exit 2) for a bind address that is not one (or does not resolve, or is not on
    this machine) and ``ListenError`` (exit 1) for a port in use or not permitted — before the database
    is opened.
    """
    from fleetctl.config import check_config, serves_webhooks

    check_config(cfg, serving_webhooks=serves_webhooks(cfg))  # e.g. a webhook route without a secret: refused
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be from 1 to {MAX_WORKERS}", code="invalid_workers")
    where = cfg.server.bind if host is None else host
    source = "server.bind" if host is None else "--bind"
    port = cfg.server.port if port is None else port
    if workers == 1:
        sock = listen(where, port, source)
        return _serve_worker(cfg, sock, _wake_socket(cfg), spool=True)
    return _Supervisor(cfg, where, port, source, workers).run()


def _serve_worker(cfg: Config, sock: socket.socket, wake: socket.socket | None, *, spool: bool,
                  worker: int | None = None) -> int:  # fmt: skip
    """One serving process: the event loop over ``sock`` until SIGTERM/SIGINT; 0."""
    import asyncio

    from fleetctl.server.api import Api

    try:
        api = Api(cfg)
    except BaseException:
        sock.close()
        if wake is not None:
            wake.close()
        raise
    gc.collect()
    gc.freeze()  # what start-up made lives as long as the process: keep the collector's full passes off it
    try:
        drained = asyncio.run(_run(cfg, api, sock, wake, spool=spool, worker=worker))
    finally:
        api.shutdown()
        if wake is not None:
            wake.close()
    log("serve.stopped", drained=drained, worker=worker)
    return 0


async def _run(cfg: Config, api: Api, sock: socket.socket, wake: socket.socket | None, *, spool: bool,
               worker: int | None) -> bool:  # fmt: skip
    import asyncio

    from fleetctl.server.http import HttpServer, connection_cap
    from fleetctl.server.pool import Pool
    from fleetctl.server.waiting import WaitRoom

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_error)
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    pool = Pool(loop, REQUEST_THREADS)
    room = WaitRoom(api, loop, pool)
    api.on_change = room.post_change
    server = HttpServer(sock, api, room, pool, loop, max_connections=connection_cap())
    if wake is not None:
        wake.setblocking(False)
        loop.add_reader(wake.fileno(), _drain_wake, wake, api)
    server.start()
    bound_host, bound_port = sock.getsockname()[:2]
    log("serve.worker" if worker is not None else "serve.listening", bind=bound_host, port=bound_port,
        db=cfg.orchestrator.db_path, max_connections=server.max_connections, worker=worker,
        pid=os.getpid() if worker is not None else None)  # fmt: skip
    spooler = loop.create_task(_spool_loop(api, pool)) if spool and api.webhooks else None
    try:
        await stop.wait()
    finally:
        log("serve.stopping", worker=worker)
        server.stop_accepting()
        api.close()  # a dequeue that finds nothing now answers 204 at once
        room.close()  # parked long-polls answer 204 now; keep-alive connections close after their answer
        if spooler is not None:
            spooler.cancel()
        drained = await server.drain(GRACE_SECS)
        server.close_all()
        if wake is not None:
            loop.remove_reader(wake.fileno())
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
        pool.close()
    return drained


def _wake_socket(cfg: Config) -> socket.socket | None:
    from fleetctl.wake import bind_listener

    sock = bind_listener(cfg.orchestrator.db_path)
    if sock is None:
        log("serve.wake_unavailable", db=cfg.orchestrator.db_path,
            why="another serve listens for this database: writes of other processes do not wake long-polls here")  # fmt: skip
    return sock


def _drain_wake(wake: socket.socket, api: Api) -> None:
    """Wake datagrams (another process made a task claimable): one new generation for all that are queued."""
    if _drain_datagrams(wake):
        api.notify()


def _drain_datagrams(sock: socket.socket) -> bool:
    """Read every datagram waiting on the non-blocking ``sock`` (they carry nothing); whether there was one."""
    got = False
    while True:
        try:
            sock.recv(64)
        except OSError:  # BlockingIOError: nothing more waiting
            return got
        got = True


async def _spool_loop(api: Api, pool: Pool) -> None:
    """Apply webhook deliveries spooled while the database was locked; errors wait for the next round."""
    import asyncio

    from fleetctl.errors import FleetError

    while True:
        await asyncio.sleep(SPOOL_SECS)
        try:
            await pool.run(api.drain_spool)
        except FleetError as exc:
            log("webhook.spool_waiting", error=exc.message)


def _loop_error(loop, context: dict) -> None:
    exc = context.get("exception")
    log("http.error", error=type(exc).__name__ if exc else str(context.get("message", ""))[:200])


def listen(host: str, port: int, source: str = "--bind", *, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6, as ``host`` resolves).

    ``source`` names where ``host`` came from (``--bind`` or ``server.bind``), for the error message.
    """
    from fleetctl.server.http import bind

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
        return bind(address, family, reuse_port=reuse_port)
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


def _stop_with(parent: int) -> None:
    """In a worker: be sent SIGTERM (and so drain and stop) when the supervisor dies, even by ``kill -9`` —
    else orphaned workers would go on serving the port with nobody to restart or stop them (Linux's
    ``PR_SET_PDEATHSIG``; under systemd the unit's control group is stopped whole anyway)."""
    from fleetctl.server.pool import PR_SET_PDEATHSIG, prctl

    if not prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM)):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class _Supervisor:
    """``serve --workers N``: N forked serving processes sharing the port; this one only watches them.

    It holds no listening socket (the kernel would queue connections on it that nobody accepts) and runs no
    thread (it forks again to restart a worker). It receives the cross-process wake for the database and
    forwards each datagram to every worker over a socketpair, so a task created through one worker (or
    by any other process) wakes the long-polls parked in all of them.
    """

    def __init__(self, cfg: Config, host: str, port: int, source: str, workers: int):
        self.cfg = cfg
        self.host, self.port, self.source = host, port, source
        self.count = workers
        self.workers: dict[int, tuple[int, socket.socket, float]] = {}  # pid -> (index, wake end, started)
        self.stop = False
        self.failing = False  # a worker kept dying at its start: exit 1

    def run(self) -> int:
        from fleetctl.store import Store

        first = listen(self.host, self.port, self.source, reuse_port=True)  # errors here, before any fork
        try:  # and the database's (unreadable, newer schema…): once here, with their exit code, not per worker
            Store.open(self.cfg.orchestrator.db_path).close()
        except BaseException:
            first.close()
            raise
        self.port = first.getsockname()[1]
        bound_host = first.getsockname()[0]
        wake = _wake_socket(self.cfg)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._start(index, first if index == 0 else None)
            log("serve.listening", bind=bound_host, port=self.port, db=self.cfg.orchestrator.db_path,
                workers=self.count, pid=os.getpid())  # fmt: skip
            pending: list[tuple[float, int]] = []  # (not before, index) of workers to restart
            quick: dict[int, int] = {}  # worker index -> how many times in a row it died right after its start
            while not self.stop:
                readable = [wake] if wake is not None else []
                try:
                    ready, _, _ = select.select(readable, [], [], 0.2)
                except InterruptedError:
                    ready = []
                if ready:
                    self._forward(wake)
                for pid, status in self._reap():
                    index, end, started = self.workers.pop(pid)
                    end.close()
                    code = os.waitstatus_to_exitcode(status)
                    log("serve.worker_exited", worker=index, pid=pid, exit=code)
                    soon = time.monotonic() - started < RESTART_BACKOFF_SECS
                    quick[index] = quick.get(index, 0) + 1 if soon else 0
                    if quick[index] >= MAX_QUICK_FAILURES:  # it cannot start: restarting it forever helps nobody
                        log("serve.worker_failing", worker=index, starts=quick[index])
                        self.stop, self.failing = True, True
                        break
                    pending.append((time.monotonic() + (RESTART_BACKOFF_SECS if soon else 0), index))
                for item in [p for p in pending if p[0] <= time.monotonic()]:
                    pending.remove(item)
                    if not self.stop:
                        self._start(item[1], None)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            failed = self._stop_all()
            if wake is not None:
                wake.close()
        log("serve.stopped", workers=self.count, failed=failed or None)
        return 1 if failed or self.failing else 0

    def _on_signal(self, signum, frame) -> None:
        self.stop = True

    def _start(self, index: int, sock: socket.socket | None) -> None:
        """Fork worker ``index`` with a listening socket of its own (``sock``, or a new one on the port)."""
        if sock is None:
            sock = listen(self.host, self.port, self.source, reuse_port=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                ours.close()
                for _pid, (_i, end, _t) in self.workers.items():
                    end.close()
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_DFL)
                _stop_with(parent)
                code = _serve_worker(self.cfg, sock, theirs, spool=index == 0, worker=index)
            except BaseException as exc:  # noqa: BLE001 - a worker reports and exits, never returns to the caller
                from fleetctl.errors import FleetError

                log("serve.worker_failed", worker=index, error=exc.message if isinstance(exc, FleetError)
                    else type(exc).__name__)  # fmt: skip
            finally:
                os._exit(code)
        sock.close()
        theirs.close()
        self.workers[pid] = (index, ours, time.monotonic())

    def _forward(self, wake: socket.socket) -> None:
        _drain_datagrams(wake)
        for _index, end, _started in list(self.workers.values()):
            try:
                end.send(b"")
            except OSError:  # its buffer is full (it has wakes to read already) or it is gone
                pass

    def _reap(self) -> list[tuple[int, int]]:
        done = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.workers:
                done.append((pid, status))
        return done

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for them (SIGKILL after the grace period and a margin); how many failed."""
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_SECS + 5
        failed = 0
        while self.workers and time.monotonic() < deadline:
            for pid, status in self._reap():
                self.workers.pop(pid)[1].close()
                failed += os.waitstatus_to_exitcode(status) != 0
            time.sleep(0.02)
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.workers.pop(pid)[1].close()
            failed += 1
        return failed
