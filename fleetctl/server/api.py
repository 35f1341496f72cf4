"""The agent API of ``fleetctl serve`` (SPEC §6): routing, authentication, and thin handlers that call
the same service functions as the CLI.

Writes go through one writer connection under a lock; reads use a small pool of their own connections.
A dequeue that finds nothing and may wait (``wait`` ≤ 30 s) returns a ``Pending``: the server parks it
in its ``WaitRoom`` (``waiting.py``), which calls ``claim_for`` again when ``generation`` moved — a write
of this process or of any other (``fleetctl.wake``), or the end of a backoff or a cooldown — and a task it
can take may be there. Nothing polls the database in a loop.
"""

from __future__ import annotations

import hmac
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fleetctl import __version__, services
from fleetctl.config import Config, serves_webhooks
from fleetctl.errors import FleetError, Forbidden, LeaseLost, NotFound, StoreBusy, Unauthorized, UsageError
from fleetctl.ids import check_id
from fleetctl.jsondoc import parse_json_object
from fleetctl.log import log
from fleetctl.receipts import parse_retry_after
from fleetctl.server.http import Response, error_response, json_response
from fleetctl.server.metrics import Metrics
from fleetctl.server.writer import Writer
from fleetctl.states import AgentMode, AgentStatus
from fleetctl.store import ClaimOutlook, ClaimRequest, Store

MAX_WAIT_SECS = 30.0
#: How long a webhook waits for its write before it is spooled instead (Forgejo gives up after 5 s).
WEBHOOK_WRITE_SECS = 2.0
READER_POOL = 64
#: How long a resolved agent/task token is remembered. The cache is a hint, never an authorisation: every
#: operation made with an agent or task token re-checks the token where the data is — a claim in its
#: ``UPDATE … WHERE`` (the agent row still has that token, status, capabilities and limit), every other
#: write at the start of its writer transaction, a read in its read snapshot — so a token replaced or
#: revoked by any process (the CLI, too) is refused at once, and a claim uses the agent's current row.
AUTH_CACHE_SECS = 1.0
AUTH_CACHE_MAX = 10_000
#: The agent fields a claim depends on.
CLAIM_FIELDS = ("status", "capabilities", "max_concurrency")
#: The body of ``POST …/run-ended``, refused with any other field.
RUN_ENDED_FIELDS = ("attempt", "exit_code", "detail", "retry_after_secs")
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


@dataclass
class Principal:
    """Who is calling: ``admin``, ``registrar``, ``agent`` (its own token) or ``task`` (a run's task token)."""

    kind: str
    agent_id: str | None = None
    task_id: str | None = None
    attempt: int | None = None
    agent: dict | None = field(default=None, compare=False)  # the agent row, for agent tokens
    token_hash: str | None = field(default=None, compare=False)  # of an agent or task token: re-checked by every op

    def copy(self) -> Principal:
        return Principal(self.kind, self.agent_id, self.task_id, self.attempt, self.agent, self.token_hash)


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: Any
    raw: bytes
    principal: Principal | None = None
    _json: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # an empty query parameter (``?status=``, ``?limit=``) counts as absent, for every handler
        self.query = {k: kept for k, vs in self.query.items() if (kept := [v for v in vs if v])}

    def json(self, *, required: bool = False) -> dict:
        """The body as a JSON object ({} when empty and not required)."""
        if self._json is None:
            if not self.raw.strip():
                if required:
                    raise UsageError("a JSON object body is required", code="invalid_body")
                self._json = {}
            else:
                self._json = parse_json_object(self.raw)
        return self._json

    def q(self, name: str) -> str | None:
        """The last non-empty value of query parameter ``name``; None when absent or empty."""
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(eq=False)
class Pending:
    """A dequeue under way: whose, how long it may wait, the ``Api.generation`` its last claim started at, and
    the task token of the claim in flight. One that found nothing and may wait is parked as is (``WaitRoom``)."""

    principal: Principal
    agent: dict  # the agent row, as last read
    deadline: float  # time.monotonic()
    tried: int
    wait: float = 0.0
    token: str | None = None  # the task token of a claim sent to the writer by the loop (``dequeue_fast``)


def _int_field(doc: dict, name: str, *, required: bool = False, minimum: int = 1) -> int | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise UsageError(f"'{name}' is required", code="invalid_field")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"'{name}' must be an integer >= {minimum}", code="invalid_field")
    return value


def _str_field(doc: dict, name: str, *, required: bool = False, default: str | None = None) -> str | None:
    value = doc.get(name, default)
    if value is None:
        if required:
            raise UsageError(f"'{name}' is required", code="invalid_field")
        return None
    if not isinstance(value, str):
        raise UsageError(f"'{name}' must be a string", code="invalid_field")
    return value


def _known_fields(doc: dict, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """Refuse a body with a field not in ``allowed`` or without one of ``required`` (``invalid_field``)."""
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise UsageError(f"unknown field '{unknown[0]}' (allowed: {', '.join(allowed)})", code="invalid_field")
    for name in required:
        if name not in doc:
            raise UsageError(f"'{name}' is required", code="invalid_field")


def _str_list(doc: dict, name: str) -> list[str]:
    value = doc.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"'{name}' must be a list of strings", code="invalid_field")
    return value


class Api:
    """Routes and handlers. ``handle()`` never raises: every outcome is a ``Response``."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.orch = cfg.orchestrator
        self.clock = clock
        self.db_path = cfg.orchestrator.db_path
        self.readers: queue.LifoQueue[Store] = queue.LifoQueue()
        #: Moves whenever a task may have become claimable (``notify``); waiting long-polls watch it.
        self.generation = 0
        self._generation_lock = threading.Lock()
        self.on_change: Callable[[], None] = lambda: None  # set by the server: wakes its ``WaitRoom``
        self.writer = Writer(Store.open(self.db_path), on_commit=self.notify)
        self.metrics = Metrics()
        self.closing = False
        self.admin_tokens = [t for t in (cfg.server.admin_token,) if t]
        self.registration_tokens = [t for t in (cfg.orchestrator.http_pull_token,) if t]
        self.config_agents = services.config_agent_ids(cfg)  # ids a pull registration may not take
        self._principals: dict[str, tuple[float, Principal]] = {}  # token hash -> (expires, principal)
        self._agent_tokens: dict[str, set[str]] = {}  # agent id -> its token hashes in the cache (to forget them)
        self._prune_at = 0.0
        self._principals_gen = 0  # bumped by every forget: a lookup that raced with one is not cached
        self._openapi: bytes | None = None
        self.webhooks = serves_webhooks(cfg)
        self.routes: list[tuple[str, re.Pattern, Callable, str]] = []
        for method, pattern, handler, auth in (
            ("GET", "/healthz", self.healthz, "anyone"),
            ("GET", "/metrics", self.metrics_text, "metrics"),
            ("GET", "/openapi.json", self.openapi, "anyone"),
            ("POST", "/api/v1/agents/register", self.agents_register, "registrar"),
            ("POST", "/api/v1/agents/heartbeat", self.agents_heartbeat, "agent"),
            ("POST", "/api/v1/agents/deregister", self.agents_deregister, "agent"),
            ("GET", "/api/v1/agents", self.agents_list, "admin"),
            ("GET", "/api/v1/tasks", self.tasks_list, "admin"),
            ("POST", "/api/v1/tasks", self.tasks_create, "admin"),
            ("POST", "/api/v1/tasks/dequeue", self.tasks_dequeue, "agent"),
            ("GET", "/api/v1/tasks/{task_id}", self.tasks_get, "admin_or_agent"),
            ("POST", "/api/v1/tasks/{task_id}/status", self.tasks_status, "agent_or_task"),
            ("POST", "/api/v1/tasks/{task_id}/complete", self.tasks_complete, "agent_or_task"),
            ("POST", "/api/v1/tasks/{task_id}/run-ended", self.tasks_run_ended, "agent_or_task"),
            ("POST", "/api/v1/tasks/{task_id}/retry", self.tasks_retry, "admin"),
            ("POST", "/api/v1/tasks/{task_id}/cancel", self.tasks_cancel, "admin"),
            ("POST", "/api/v1/receipts", self.receipts, "agent_or_task"),
            ("POST", "/api/v1/webhooks/forgejo", self.webhooks_forgejo, "anyone"),  # the HMAC is the auth
        ):
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
            self.routes.append((method, regex, handler, auth))

    # ------------------------------------------------------------------ plumbing

    def notify(self) -> None:
        """A task may have become claimable, or an agent's capacity freed (any thread): a new generation."""
        with self._generation_lock:
            self.generation += 1
        self.on_change()

    def close(self) -> None:
        self.closing = True

    def shutdown(self) -> None:
        """After the last request: stop the writer and close every connection."""
        self.writer.close()
        self.writer.store.close()
        while not self.readers.empty():
            self.readers.get_nowait().close()

    def body_cap(self, raw_path: str) -> int:
        path = urlsplit(raw_path).path
        if path.startswith("/api/v1/webhooks/"):
            return self.cfg.server.webhook_max_body_bytes
        return self.cfg.server.max_body_bytes

    def reader(self) -> _Borrowed:
        return _Borrowed(self)

    def write(self, fn: Callable[[Store], Any]) -> Any:
        """Run ``fn(store)`` in the writer's next group-committed transaction (dequeuers are woken after)."""
        return self.writer.submit(fn)

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response | Pending:
        """The answer to one request — or, for a long-poll that found nothing, a ``Pending`` to park."""

        def route() -> Response | Pending:
            split = urlsplit(raw_path)
            path = split.path
            allowed = []
            for route_method, regex, handler, auth in self.routes:
                m = regex.match(path)
                if not m:
                    continue
                if route_method != method and not (method == "HEAD" and route_method == "GET"):
                    allowed.append(route_method)
                    continue
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                req = Request(method, path, params, parse_qs(split.query, keep_blank_values=True), headers, body)
                req.principal = self.authenticate(headers, auth)
                return handler(req)
            if allowed:
                return error_response(405, "method_not_allowed", f"{method} is not allowed on {path}",
                                      {"Allow": ", ".join(sorted(set(allowed)))})  # fmt: skip
            return error_response(404, "not_found", f"no route {path}")

        return self._answer(route, raw_path)

    def _answer(self, fn: Callable[[], Any], where: str) -> Any:
        """``fn()``, with every error turned into its JSON answer (never a traceback)."""
        try:
            return fn()
        except StoreBusy as exc:
            return error_response(503, exc.code, exc.message, {"Retry-After": "1"})
        except FleetError as exc:
            status = exc.http_status if exc.http_status < 500 or exc.http_status == 503 else 502
            doc = exc.to_json()
            return json_response(status, doc, {"Retry-After": "1"} if status == 503 else None)
        except Exception as exc:  # a bug: log it, answer without a traceback
            log("http.internal_error", path=where[:200], error=f"{type(exc).__name__}: {exc}")
            return error_response(500, "internal_error", "internal error; see the server log")

    # ------------------------------------------------------------------ auth

    def authenticate(self, headers: Any, kind: str) -> Principal | None:
        if kind == "anyone" or (kind == "metrics" and self.cfg.server.metrics_public):
            return None
        token = _bearer(headers)
        if token is None:
            raise Unauthorized("missing or malformed Authorization: Bearer token")
        principal = self._resolve(token)
        if principal is None:
            raise Unauthorized("unknown token")
        self._check_kind(principal, kind)
        return principal

    @staticmethod
    def _check_kind(principal: Principal, kind: str) -> None:
        ok = {
            "metrics": ("admin",),
            "admin": ("admin",),
            "registrar": ("admin", "registrar"),
            "agent": ("agent",),
            "admin_or_agent": ("admin", "agent", "task"),
            "agent_or_task": ("agent", "task"),
        }[kind]
        if principal.kind not in ok:
            raise Forbidden(f"this token may not call this endpoint ({principal.kind})")

    def _resolve(self, token: str) -> Principal | None:
        for t in self.admin_tokens:
            if hmac.compare_digest(t.encode(), token.encode()):
                return Principal("admin")
        for t in self.registration_tokens:
            if hmac.compare_digest(t.encode(), token.encode()):
                return Principal("registrar")
        digest = services.hash_token(token)  # the cache is keyed by the hash: lookups leak nothing of the token
        now = time.monotonic()
        hit = self._cached(digest, now)
        if hit is not None:
            return hit
        gen = self._principals_gen
        with self.reader() as store:
            principal = _principal_of(store, digest)
        if principal is not None and gen == self._principals_gen:  # unknown tokens are never cached
            if len(self._principals) >= AUTH_CACHE_MAX:
                self._principals, self._agent_tokens = {}, {}
            elif now >= self._prune_at:
                self._prune(now, gen)
            self._principals[digest] = (now + AUTH_CACHE_SECS, principal)
            self._agent_tokens.setdefault(principal.agent_id, set()).add(digest)
            principal = principal.copy()
        return principal

    def _cached(self, digest: str, now: float) -> Principal | None:
        """The cached principal of a token hash, if fresh: a copy (a handler may change its own); a hint,
        re-checked by the operation."""
        hit = self._principals.get(digest)
        return hit[1].copy() if hit is not None and hit[0] > now else None

    def _prune(self, now: float, gen: int) -> None:
        """Drop the expired entries of the token cache (at most every few seconds): a fleet's worth of expired
        principals would otherwise sit in memory, and in every pass of the garbage collector, until the cap."""
        self._prune_at = now + 5 * AUTH_CACHE_SECS
        live = {k: v for k, v in list(self._principals.items()) if v[0] > now}
        tokens: dict[str, set[str]] = {}
        for digest, (_expires, principal) in live.items():
            tokens.setdefault(principal.agent_id, set()).add(digest)
        if gen == self._principals_gen:  # no forget meanwhile (else keep the cache as it is: pruned next time)
            self._principals, self._agent_tokens = live, tokens

    def _verify(self, store: Store, p: Principal) -> None:
        """Inside the caller's transaction or read snapshot: the agent or task token of ``p`` still resolves to
        the same agent (or attempt). ``401 unknown token`` otherwise, whatever the cache said."""
        if p.token_hash is None:  # admin and registration tokens live in the configuration
            return
        now = _principal_of(store, p.token_hash)
        if now is None or (now.kind, now.agent_id, now.task_id, now.attempt) != (p.kind, p.agent_id, p.task_id,
                                                                                 p.attempt):  # fmt: skip
            self._principals.pop(p.token_hash, None)
            raise Unauthorized("unknown token")

    def _write_as(self, p: Principal, fn: Callable[[Store], Any]) -> Any:
        """``write(fn)``, with ``p``'s token re-checked first in the same transaction."""

        def op(store: Store) -> Any:
            self._verify(store, p)
            return fn(store)

        return self.write(op)

    def _fresh_agent(self, p: Principal) -> dict:
        """The agent row of ``p``'s agent token, read now (uncached); ``401 unknown token`` if it is gone."""
        with self.reader() as store:
            agent = store.agent_by_token_hash(p.token_hash)
        if agent is None or agent["agent_id"] != p.agent_id:
            self._principals.pop(p.token_hash, None)
            raise Unauthorized("unknown token")
        return agent

    def forget_agent(self, agent_id: str) -> None:
        """Drop the cached tokens of ``agent_id`` (after this process changed the agent)."""
        self._principals_gen += 1
        for digest in self._agent_tokens.pop(agent_id, ()):  # O(its tokens), not O(the cache): every heartbeat
            self._principals.pop(digest, None)

    def _acting_agent(self, req: Request, task_id: str) -> tuple[str, int | None]:
        """The agent a task write is made for; 403 for a token that never held this task."""
        p = req.principal
        check_id(task_id, "task id")
        if p.kind == "task":
            if p.task_id != task_id:
                raise Forbidden("this task token is for another task")
            return p.agent_id, p.attempt
        with self.reader() as store:
            if store.task(task_id) is None:
                raise NotFound(f"no task {task_id!r}", code="task_not_found")
            held = store.has_attempt_by(task_id, p.agent_id)
        if not held:
            raise Forbidden(f"task {task_id} is not assigned to agent {p.agent_id}")
        return p.agent_id, None

    # ------------------------------------------------------------------ handlers: meta

    def healthz(self, req: Request) -> Response:
        try:
            with self.reader() as store:
                store.ping()
        except FleetError as exc:
            return json_response(503, {"status": "unavailable", "version": __version__, "database": exc.message})
        return json_response(200, {"status": "ok", "version": __version__, "database": "ok"})

    def metrics_text(self, req: Request) -> Response:
        with self.reader() as store:
            counts = store.counts()
        return Response(200, self.metrics.render(counts).encode(), "text/plain; version=0.0.4; charset=utf-8")

    def openapi(self, req: Request) -> Response:
        if self._openapi is None:
            self._openapi = OPENAPI_PATH.read_bytes()
        return Response(200, self._openapi)

    # ------------------------------------------------------------------ handlers: agents

    def agents_register(self, req: Request) -> Response:
        doc = req.json(required=True)
        agent_id = _str_field(doc, "agent_id", required=True)
        kwargs = {
            "agent_type": _str_field(doc, "agent_type", required=True),
            "capabilities": _str_list(doc, "capabilities"),
            "max_concurrency": _int_field(doc, "max_concurrency") or 1,
            "mode": _str_field(doc, "mode", default=AgentMode.HTTP_PULL.value),
        }
        if kwargs["mode"] != AgentMode.HTTP_PULL.value:
            raise UsageError("only http_pull agents register over the API", code="invalid_field")
        try:
            reg = self.write(
                lambda s: services.register_agent(s, agent_id, now=self.clock(), reserved=self.config_agents, **kwargs)
            )
        finally:
            self.forget_agent(agent_id)  # its old token stops working now
        view = self._agent_view(reg.agent)
        return json_response(201 if reg.created else 200, {**view, "token": reg.token})

    def agents_heartbeat(self, req: Request) -> Response:
        req.json()
        agent_id = req.principal.agent_id
        try:
            result = self._write_as(req.principal, lambda s: services.heartbeat(s, self.orch, agent_id,
                                                                                now=self.clock()))  # fmt: skip
        finally:
            self.forget_agent(agent_id)
        return json_response(200, {"agent": self._agent_view(result["agent"]), "cancelled": result["cancelled"],
                                   "stop": result["stop"],
                                   "heartbeat_interval_secs": self.orch.heartbeat_interval_secs})  # fmt: skip

    def agents_deregister(self, req: Request) -> Response:
        req.json()
        agent_id = req.principal.agent_id
        try:
            agent = self._write_as(req.principal, lambda s: services.deregister_agent(s, self.cfg, agent_id, by="agent",
                                                                                      now=self.clock()))  # fmt: skip
        finally:
            self.forget_agent(agent_id)
        return json_response(200, self._agent_view(agent))

    def agents_list(self, req: Request) -> Response:
        with self.reader() as store:
            items = services.list_agents(store, status=req.q("status"), mode=req.q("mode"),
                                         capability=req.q("capability"))  # fmt: skip
        return json_response(200, {"items": items, "next": None})

    def _agent_view(self, agent: dict) -> dict:
        with self.reader() as store:
            return services.agent_views(store, [agent])[0]

    # ------------------------------------------------------------------ handlers: tasks

    def tasks_list(self, req: Request) -> Response:
        states = [s for v in req.query.get("state", []) for s in v.split(",") if s]
        limit = _query_int(req, "limit", 100, 1, 1000)
        cursor = _query_int(req, "cursor", None, 0, 2**62)
        with self.reader() as store:
            page = services.list_tasks(store, states=states, agent_id=req.q("agent_id"), repo=req.q("repo"),
                                       cursor=cursor, limit=limit)  # fmt: skip
        return json_response(200, page)

    def tasks_create(self, req: Request) -> Response:
        doc = req.json(required=True)
        kwargs = {
            "title": _str_field(doc, "title", required=True),
            "body": _str_field(doc, "body", default="") or "",
            "labels": _str_list(doc, "labels"),
            "repo": _str_field(doc, "repo"),
            "issue_number": _int_field(doc, "issue_number"),
            "task_id": _str_field(doc, "task_id"),
        }
        task = self.write(lambda s: services.create_task(s, self.orch, now=self.clock(), **kwargs))
        return json_response(201, {**services.task_view(task), "warnings": task["warnings"]})

    def tasks_get(self, req: Request) -> Response:
        task_id = req.params["task_id"]
        check_id(task_id, "task id")
        p = req.principal
        with self.reader() as store:
            with store.read():
                self._verify(store, p)  # the token, in the snapshot the task is read from
                doc = services.task_detail(store, task_id)
                if p.kind == "agent" and not store.has_attempt_by(task_id, p.agent_id):
                    raise Forbidden(f"task {task_id} is not assigned to agent {p.agent_id}")
                if p.kind == "task" and p.task_id != task_id:
                    raise Forbidden("this task token is for another task")
        return json_response(200, doc)

    def tasks_dequeue(self, req: Request) -> Response | Pending:
        call = self._dequeue_call(req.principal, req.json())
        return self._dequeue_answer(call, *self._claim(call.principal, call.agent))

    def _dequeue_call(self, p: Principal, doc: dict) -> Pending:
        """A dequeue of ``p`` with body ``doc``, before its first claim."""
        wait = doc.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise UsageError("'wait' must be a number of seconds >= 0", code="invalid_field")
        wait = min(float(wait), MAX_WAIT_SECS)
        return Pending(p, p.agent, time.monotonic() + wait, self.generation, wait)

    def _dequeue_answer(self, call: Pending, claimed: dict | None, agent: dict) -> Response | Pending:
        if claimed is not None:
            return json_response(200, claimed)
        if call.wait <= 0 or self.closing:
            return Response(204)
        call.agent = agent
        return call  # the server parks it until a task may be there for it

    # The dequeue fast path: the event loop sends the claim of a dequeue whose token is in the cache straight
    # to the writer and renders the answer itself — no request thread, two thread crossings fewer. Only its
    # first steps differ: everything after the first claim is the ordinary path's (``_claim_rest``).

    def dequeue_fast(self, method: str, raw_path: str, headers: Any, body: bytes) -> Pending | None:
        """On the loop: a dequeue that can take the fast path — its token in the cache, its agent online, a
        body that parses — or None (it takes the ordinary path, which gives every error its answer)."""
        if method != "POST" or raw_path != "/api/v1/tasks/dequeue" or self.closing:
            return None
        token = _bearer(headers)
        if token is None:
            return None
        p = self._cached(services.hash_token(token), time.monotonic())
        if p is None or p.kind != "agent" or p.agent["status"] != AgentStatus.ONLINE:
            return None
        try:
            doc = parse_json_object(body) if body.strip() else {}
            return self._dequeue_call(p, doc)
        except FleetError:
            return None

    def dequeue_fast_claim(self, call: Pending, done: Callable[[Any], None]) -> None:
        """On the loop: send the claim of ``call`` to the writer; ``done(task, None or an exception)`` runs on
        the writer's thread after its batch."""
        request, call.token = self._claim_request(call.principal, call.agent)
        self.writer.claim_async(request, done)

    def dequeue_fast_answer(self, call: Pending, task: dict) -> Response | None:
        """On the loop: the 200 for the task the fast claim took; None if its prompt does not render (then
        ``dequeue_fast_rest`` releases it on a request thread and answers the error)."""
        try:
            return json_response(200, self._claimed(task, call.token, release=False))
        except FleetError:
            return None

    def dequeue_fast_rest(self, call: Pending, task: dict | BaseException | None) -> Response | Pending:
        """On a request thread: the rest of a fast dequeue, exactly as the ordinary path goes on after its
        first claim (``task``: what it claimed, or None, or the writer's error)."""

        def rest() -> Response | Pending:
            if isinstance(task, BaseException):
                raise task
            return self._dequeue_answer(call, *self._claim_rest(call.principal, call.agent, task, call.token))

        return self._answer(rest, "/api/v1/tasks/dequeue")

    def claim_for(self, pending: Pending) -> Response | None:
        """A woken long-poll claims again: the 200 (or an error), or None when there is still nothing."""

        def attempt() -> Response | None:
            claimed, pending.agent = self._claim(pending.principal, pending.agent)
            return None if claimed is None else json_response(200, claimed)

        return self._answer(attempt, "/api/v1/tasks/dequeue")

    def outlook(self) -> ClaimOutlook:
        """Who may claim what now (for the ``WaitRoom``), in one read."""
        now = self.clock()
        with self.reader() as store:
            return store.claim_outlook(now, services.claim_limits(self.cfg, now))

    def _claim(self, p: Principal, agent: dict) -> tuple[dict | None, dict]:
        """Claim for the agent of token ``p``, with ``agent`` its row as last read (maybe from the cache):
        the dequeue reply or None, and the row to use next time.

        The claim's ``UPDATE … WHERE`` requires the agent row to still have ``p``'s token and the status,
        capabilities and limit of ``agent``; when it claims nothing the row is read again (uncached) — a
        token that no longer resolves is ``401 unknown token``, a changed row is claimed with once more.
        So the fast path (a claim) reads nothing, and no change made by any process is ever claimed past.
        """
        task, token, agent = self._try_claim(p, agent)
        return self._claim_rest(p, agent, task, token)

    def _try_claim(self, p: Principal, agent: dict) -> tuple[dict | None, str | None, dict]:
        """One claim for the agent as ``agent`` says (brought back online first if it was marked offline):
        the task or None, its task token, and the row it was claimed with."""
        if agent["status"] == AgentStatus.OFFLINE:  # it is obviously alive: bring it back
            try:
                agent = self._write_as(p, lambda s: services.heartbeat(s, self.orch, p.agent_id,
                                                                       now=self.clock()))["agent"]  # fmt: skip
            finally:
                self.forget_agent(p.agent_id)
        if agent["status"] != AgentStatus.ONLINE:
            return None, None, agent
        request, token = self._claim_request(p, agent)
        return self.writer.claim(request), token, agent

    def _claim_request(self, p: Principal, agent: dict) -> tuple[Callable[[], ClaimRequest], str]:
        """The conditional claim for ``p``'s agent with row ``agent`` (built in the writer's thread, so that
        its ``ts`` is the time of the claim), and the task token it carries."""
        token, token_hash = services.new_claim_token()

        def request() -> ClaimRequest:
            req = services.claim_request(self.cfg, agent, token_hash, ts=self.clock())
            req.agent_token_hash = p.token_hash  # the guard: this token, and the row as read
            return req

        with self.metrics.lock:  # ``+=`` on an attribute is not atomic across threads
            self.metrics.claim_attempts += 1
        return request, token

    def _claim_rest(self, p: Principal, agent: dict, task: dict | None, token: str | None) -> tuple[dict | None, dict]:
        """After the first claim: its answer if it took a task; else the agent row read again (uncached) and,
        if it changed, one more claim with it."""
        if task is None:
            fresh = self._fresh_agent(p)
            if all(fresh[k] == agent[k] for k in CLAIM_FIELDS):
                return None, fresh  # nothing to claim for the agent as it is now
            self.forget_agent(p.agent_id)  # the cached row is stale: claim with the fresh one
            task, token, agent = self._try_claim(p, fresh)
            if task is None:
                return None, self._fresh_agent(p)
        return self._claimed(task, token), agent

    def _claimed(self, task: dict, token: str, *, release: bool = True) -> dict:
        """The dequeue reply for a claimed task. Should its prompt not render (a template the config check
        missed), the attempt is released at once (``release``) and the error raised."""
        try:
            claim = services.claimed(None, self.cfg, task, token)
        except FleetError:
            if release:
                self.write(lambda s: services.release_claim(s, self.orch, task, "the prompt could not be rendered",
                                                            now=self.clock()))  # fmt: skip
            raise
        with self.metrics.lock:
            self.metrics.claims += 1
        return claim.to_json()

    def tasks_status(self, req: Request) -> Response:
        task_id = req.params["task_id"]
        agent_id, token_attempt = self._acting_agent(req, task_id)
        doc = req.json(required=True)
        attempt = _int_field(doc, "attempt") or token_attempt
        status = _str_field(doc, "status", default="progress")
        message = _str_field(doc, "message", default="") or ""
        if token_attempt is not None and attempt != token_attempt:
            raise LeaseLost("this task token is for another attempt")
        retry_after, usage = doc.get("retry_after_secs"), doc.get("usage")
        task = self._write_as(req.principal, lambda s: services.report_status(
            s, self.orch, task_id, status, message, agent_id=agent_id, attempt=attempt, now=self.clock(),
            retry_after=retry_after, usage=usage, cfg=self.cfg))  # fmt: skip
        return json_response(200, services.task_view(task))

    def tasks_complete(self, req: Request) -> Response:
        return self._complete(req, req.params["task_id"], req.json(required=True))

    def receipts(self, req: Request) -> Response:
        doc = req.json(required=True)
        task_id = _str_field(doc, "task_id", required=True)
        return self._complete(req, task_id, doc)

    def _complete(self, req: Request, task_id: str, doc: dict) -> Response:
        agent_id, token_attempt = self._acting_agent(req, task_id)
        attempt = _int_field(doc, "attempt") or token_attempt
        if attempt is None:
            raise UsageError("'attempt' is required", code="invalid_field")
        if token_attempt is not None and attempt != token_attempt:
            raise LeaseLost("this task token is for another attempt")

        with self.reader() as store:  # Forgejo is asked here, in the request thread: never in the writer
            _, verdict = services.prepare_receipt(store, self.cfg, task_id, doc, attempt=attempt)

        def op(s: Store):
            return services.hand_in_receipt(s, self.cfg, task_id, doc, agent_id=agent_id, attempt=attempt,
                                            now=self.clock(), verdict=verdict)  # fmt: skip

        result = self._write_as(
            req.principal, op
        ).raise_if_rejected()  # a refused receipt's failed attempt is committed first
        body = {**services.task_view(result.task), "repeated": result.repeated, "pending": result.pending}
        if result.pending:  # stored; validated by a later pass when Forgejo answers (SPEC §7.4)
            return json_response(202, {**body, "receipt": "pending"})
        return json_response(200, body)

    def tasks_run_ended(self, req: Request) -> Response:
        """A run's wrapper reports that the run ended (SPEC §8 step 4): settled exactly as ``fleetctl task
        run-ended`` and the sweep settle it. 200 either way: ``"settled": false`` with a ``reason`` when there was
        nothing to settle (the agent handed in its receipt first: the usual case, not a conflict)."""
        task_id = req.params["task_id"]
        agent_id, token_attempt = self._acting_agent(req, task_id)
        doc = req.json(required=True)
        _known_fields(doc, RUN_ENDED_FIELDS, required=("attempt", "exit_code"))
        attempt = doc["attempt"]
        services.check_ended_report(attempt, doc["exit_code"], doc.get("detail", ""))
        retry_after = parse_retry_after(doc.get("retry_after_secs"))
        if token_attempt is not None and attempt != token_attempt:
            raise LeaseLost("this task token is for another attempt")
        p = req.principal
        with self.reader() as store:  # the branch's pull request is looked up here, in the request thread
            with store.read():
                self._verify(store, p)
            ended = services.prepare_ended_run(store, self.cfg, task_id, attempt, doc["exit_code"],
                                               doc.get("detail", ""), agent_id=agent_id,
                                               retry_after=retry_after)  # fmt: skip
            if ended.skip:
                return json_response(200, services.run_ended_view(store, ended, None))

        def op(s: Store) -> dict:
            return services.run_ended_view(s, ended, services.settle_prepared_run(s, self.cfg, ended, now=self.clock()))

        return json_response(200, self._write_as(p, op))

    def tasks_retry(self, req: Request) -> Response:
        task_id = req.params["task_id"]
        check_id(task_id, "task id")
        task = self.write(lambda s: services.retry_task(s, self.orch, task_id, now=self.clock()))
        return json_response(200, services.task_view(task))

    def tasks_cancel(self, req: Request) -> Response:
        task_id = req.params["task_id"]
        check_id(task_id, "task id")
        reason = _str_field(req.json(), "reason", default="cancelled over the API") or "cancelled over the API"
        task = self.write(lambda s: services.cancel_task(s, task_id, reason, now=self.clock()))
        return json_response(200, services.task_view(task))

    # ------------------------------------------------------------------ webhooks

    def webhooks_forgejo(self, req: Request) -> Response:
        """A Forgejo delivery: verified over the raw bytes, then recorded and applied in one short write; if
        the database stays locked past ``WEBHOOK_WRITE_SECS`` it is spooled to disk and applied later, so
        Forgejo (which waits 5 s and never retries) always gets its answer in time."""
        from fleetctl.forgejo.webhooks import BadSignature
        from fleetctl.services import issues

        if not self.webhooks:
            raise NotFound("the Forgejo webhook route is off: set forgejo.url and forgejo.webhook_secret",
                           code="webhooks_disabled")  # fmt: skip
        if "x-www-form-urlencoded" in (req.headers.get("Content-Type") or "").lower():
            return error_response(415, "unsupported_media_type",
                                  "set the webhook's content type to application/json (POST)")  # fmt: skip
        try:
            prepared = issues.prepare(self.cfg, req.headers, req.raw)
        except BadSignature as exc:
            self._count_webhook("unauthorized")
            log("webhook.unauthorized", delivery=(req.headers.get("X-Forgejo-Delivery") or "")[:128], why=exc.message)
            raise

        def op(store: Store) -> issues.IngestResult:
            return issues.record(store, self.cfg, prepared, source="http", now=self.clock())

        try:
            result = self.writer.submit(op, timeout=WEBHOOK_WRITE_SECS)
        except StoreBusy:  # locked by another process: keep it on disk, apply it when the lock is free
            try:
                issues.spool(self.cfg, prepared, _delivery_headers(req.headers))
            except OSError as exc:
                log("webhook.spool_failed", delivery=prepared.delivery_id, error=exc.strerror or str(exc))
                return error_response(503, "store_busy", "the database is busy and the delivery cannot be kept "
                                      "on disk; send it again", {"Retry-After": "5"})  # fmt: skip
            result = issues.IngestResult(202, prepared.delivery_id, "queued",
                                         "the database is busy: the delivery is kept and applied shortly")  # fmt: skip
        self._count_webhook(result.verdict)
        log("webhook." + result.verdict, delivery=result.delivery_id, task=result.task_id, detail=result.detail[:200])
        return json_response(result.status, result.to_json())

    def _count_webhook(self, verdict: str) -> None:
        with self.metrics.lock:
            self.metrics.webhooks[verdict] = self.metrics.webhooks.get(verdict, 0) + 1

    def drain_spool(self) -> int:
        """Apply deliveries spooled while the database was locked (the serve loop calls this)."""
        from fleetctl.services import issues

        if not self.webhooks or not issues.spool_dir(self.cfg).is_dir():
            return 0
        return issues.drain_spool(self.cfg, self.write)


def _delivery_headers(headers: Any) -> dict[str, str]:
    """The headers a spooled delivery needs to be read again (its id and event names)."""
    from fleetctl.forgejo.webhooks import DELIVERY_HEADERS, EVENT_HEADERS, EVENT_TYPE_HEADERS

    return {n: v for n in (*DELIVERY_HEADERS, *EVENT_HEADERS, *EVENT_TYPE_HEADERS) if (v := headers.get(n))}


def _query_int(req: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = req.q(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"'{name}' must be an integer", code="invalid_query") from None
    if not lo <= value <= hi:
        raise UsageError(f"'{name}' must be between {lo} and {hi}", code="invalid_query")
    return value


class _Borrowed:
    """A read connection from the pool for the duration of a ``with`` block."""

    def __init__(self, api: Api):
        self.api = api
        self.store: Store | None = None

    def __enter__(self) -> Store:
        try:
            self.store = self.api.readers.get_nowait()
        except queue.Empty:
            self.store = Store.open(self.api.db_path, migrate=False)
        return self.store

    def __exit__(self, *exc: object) -> None:
        store, self.store = self.store, None
        if store is None:
            return
        store.end_read()
        if self.api.readers.qsize() < READER_POOL:
            self.api.readers.put(store)
        else:
            store.close()


def _bearer(headers: Any) -> str | None:
    """The token of an ``Authorization: Bearer …`` header; None when it is missing or malformed."""
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token


def _principal_of(store: Store, token_hash: str) -> Principal | None:
    """The agent or task a token hash names now, read from ``store``; None for an unknown token."""
    agent = store.agent_by_token_hash(token_hash)
    if agent:
        return Principal("agent", agent_id=agent["agent_id"], agent=agent, token_hash=token_hash)
    if row := store.attempt_by_token_hash(token_hash):
        return Principal("task", agent_id=row["agent_id"], task_id=row["task_id"], attempt=row["attempt"],
                         token_hash=token_hash)  # fmt: skip
    return None
