"""The event-sourced SQLite store (SPEC §3).

One file, shared by every process (CLI, timers, ``serve``). Every write is one short ``BEGIN IMMEDIATE``
transaction that appends events and updates the projections they touch through the reducer in
``fleetctl.projections``; a claim is one conditional ``UPDATE … RETURNING`` on the partial index of queued
tasks. Reads run in autocommit mode (each statement its own snapshot) or in ``read()`` for a consistent
multi-statement snapshot.

sqlite-utils is used for what it is good at here — its ``Migrations`` and the ``db`` maintenance
commands — and imported only when needed: the hot paths (``dispatch`` with nothing to do, ``task
complete``) use the stdlib connection directly, which keeps their start-up inside the SPEC §11 target.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.errors import FleetError, InvalidTransition, StoreBusy, StoreError
from fleetctl.projections import (
    AGENT_COLUMNS,
    ATTEMPT_COLUMNS,
    HOST_COLUMNS,
    JSON_COLUMNS,
    STATEFUL_EVENT_TYPES,
    TASK_COLUMNS,
    VOLATILE,
    Projections,
    ReplayError,
    apply,
)
from fleetctl.schema import MIGRATION_NAMES, MIGRATION_SET, MIGRATIONS_TABLE
from fleetctl.states import ACTIVE, LEASED, TERMINAL, AgentStatus, TaskState

MIN_SQLITE = (3, 35, 0)
#: Events after which work may be claimable — a task queued or released, or an agent's slot or status
#: freed: waiting dequeuers (in this process and, through ``fleetctl.wake``, in others) are woken when
#: one commits. Only claims and starts, which take capacity, and informational events do not wake.
WAKE_EVENTS = frozenset({
    "task.created", "task.updated", "task.requeued", "task.retried", "task.cancelled", "task.failed",
    "task.completed", "task.awaiting_review", "agent.registered", "agent.updated", "agent.online",
    "task.rework", "task.rate_limited", "task.unblocked",
})  # fmt: skip
BUSY_TIMEOUT_MS = 5000
OUTBOX_CURSOR = "outbox_cursor"
_DELIVERY_COLUMNS = (
    "delivery_id", "received_at", "source", "event", "event_type", "action", "repo", "number", "sender",
    "verdict", "detail", "task_id", "semantic_key", "item_updated", "body_zlib",
)  # fmt: skip


def _in(states: Iterable[str]) -> str:
    """``('a', 'b')`` for an SQL ``IN`` over state names (names from the enums, never from input), always in
    the enum's order: SQLite uses a partial index (``tasks_active_agent … WHERE state IN ('assigned',
    'running')``) only when the query's terms match its own term for term, so a set's hash order (it varies
    with ``PYTHONHASHSEED``) would silently turn an index lookup into a scan."""
    wanted = {TaskState(s) for s in states}
    return "(" + ", ".join(f"'{s.value}'" for s in TaskState if s in wanted) + ")"


_ACTIVE = _in(ACTIVE)  # holding an agent's capacity
_OPEN = _in(set(TaskState) - TERMINAL)  # not completed, failed or cancelled
#: The one "queued and ready" condition (past its backoff), for claims, planning and counts.
_READY = f"state = '{TaskState.QUEUED.value}' AND (not_before IS NULL OR not_before <= :now)"
_CLAIM_ELIGIBLE = (
    f"{_READY} AND NOT EXISTS ("
    "SELECT 1 FROM json_each(tasks.requirements) AS r "
    "WHERE r.value NOT IN (SELECT value FROM json_each(:caps)))"
)
_LEASED = _in(LEASED)  # holding a repository's slot (assigned, running, awaiting review)
#: Per-repository concurrency (``forgejo.max_active_per_repo`` and per repository): the task's repository has
#: fewer tasks holding a slot than its cap. Only in the claim when some cap is configured.
_CLAIM_REPO_CAP = (
    " AND (tasks.repo IS NULL OR (SELECT count(*) FROM tasks AS t3 INDEXED BY tasks_repo_active "
    f"WHERE t3.repo = tasks.repo COLLATE NOCASE AND t3.state IN {_LEASED}) < "
    "coalesce((SELECT value FROM json_each(:repo_caps) WHERE key = lower(tasks.repo)), :repo_cap, 9e18))"
)
#: Budgets: the task's spend is under its per-task budget, and its repository is not past its day's budget.
_CLAIM_BUDGET = (
    " AND tasks.spent_usd < coalesce((SELECT value FROM json_each(:task_budgets) "
    "WHERE key = lower(coalesce(tasks.repo, ''))), :task_budget, 9e99)"
    " AND (tasks.repo IS NULL OR lower(tasks.repo) NOT IN (SELECT value FROM json_each(:blocked_repos)))"
)
#: The agent may take one more task now: online, not cooling down after a usage limit, under its
#: ``max_concurrency`` (and, with a token hash, its row still as the caller read it: see ``ClaimRequest``).
#: A template over the request's values, shared by both claim statements.
_AGENT_MAY_CLAIM = (
    f"EXISTS (SELECT 1 FROM agents WHERE agent_id={{agent}} AND status='{AgentStatus.ONLINE.value}' "
    "AND (cooldown_until IS NULL OR cooldown_until <= {now}) "
    "AND ({ath} IS NULL OR (token_hash={ath} AND json(capabilities)=json({acaps}) AND max_concurrency={max}))) "
    f"AND (SELECT count(*) FROM tasks AS t2 WHERE t2.agent_id={{agent}} AND t2.state IN {_ACTIVE}) < {{max}}"
)
_CLAIM_SQL = (
    f"UPDATE tasks SET state='{TaskState.ASSIGNED.value}', agent_id=:agent, attempt=attempt+1, "
    "lease_expires_at=:lease, not_before=NULL, attempt_started_at=:now, updated_at=:now, blocked_by=NULL "
    "WHERE {target} AND {eligible} AND "
    + _AGENT_MAY_CLAIM.format(agent=":agent", now=":now", ath=":ath", acaps=":acaps", max=":max")
    + " RETURNING *"
)
#: The best eligible tasks for a run of requests (``_claim_runs``) in ONE statement: the requests whose
#: agent may claim are numbered in request order, the best ``k`` eligible tasks in claim order (priority,
#: then age), and the n-th request gets the n-th task — what the same claims made one after another would
#: give, as every request of a run has the same capabilities, no fleet limit and an agent of its own.
#: (``+tasks.state``: not a term an index can serve, so that SQLite goes from the picked tasks to their rows
#: by id instead of walking every queued task.)
_CLAIM_RUN_SQL = (
    "WITH req AS MATERIALIZED (SELECT key AS i, json_extract(value, '$[0]') AS agent, "
    "json_extract(value, '$[1]') AS ath, json_extract(value, '$[2]') AS acaps, "
    "json_extract(value, '$[3]') AS max_active FROM json_each(:requests)), "
    "ok AS MATERIALIZED (SELECT row_number() OVER (ORDER BY i) AS k, agent FROM req WHERE "
    + _AGENT_MAY_CLAIM.format(agent="req.agent", now=":now", ath="req.ath", acaps="req.acaps", max="req.max_active")
    + "), pick AS MATERIALIZED (SELECT row_number() OVER (ORDER BY priority DESC, seq) AS k, task_id FROM "
    f"(SELECT task_id, priority, seq FROM tasks INDEXED BY tasks_claim WHERE {_CLAIM_ELIGIBLE} "
    "ORDER BY priority DESC, seq LIMIT (SELECT count(*) FROM ok))) "
    f"UPDATE tasks SET state='{TaskState.ASSIGNED.value}', agent_id=ok.agent, attempt=attempt+1, "
    "lease_expires_at=:lease, not_before=NULL, attempt_started_at=:now, updated_at=:now, blocked_by=NULL "
    f"FROM pick JOIN ok USING (k) WHERE tasks.task_id = pick.task_id AND +tasks.state = '{TaskState.QUEUED.value}' "
    "RETURNING *"
)


@functools.cache
def _claim_sql(one: bool, repo_cap: bool, budget: bool) -> str:
    """The claim statement (of a given task, or the best eligible one), with the limits that are configured:
    a fleet without caps or budgets pays nothing for them."""
    eligible = _CLAIM_ELIGIBLE + (_CLAIM_REPO_CAP if repo_cap else "") + (_CLAIM_BUDGET if budget else "")
    if one:
        target = "task_id = :tid"
    else:  # the best eligible task: priority, then age, on the partial index of queued tasks
        target = (f"task_id = (SELECT task_id FROM tasks INDEXED BY tasks_claim WHERE {eligible} "
                  "ORDER BY priority DESC, seq LIMIT 1)")  # fmt: skip
    return _CLAIM_SQL.format(target=target, eligible=eligible)


@dataclass(frozen=True)
class ClaimLimits:
    """The fleet's limits a claim honours beside the agent's own: per-repository concurrency and budgets.

    Repository names are lower-cased (Forgejo's owner/name are case-insensitive). ``day_budget`` and
    ``repo_day_budgets`` are checked against the day's spend inside the claim's transaction: past the fleet's,
    nothing is claimed; past a repository's, none of its tasks.
    """

    repo_cap: int | None = None
    repo_caps: tuple[tuple[str, int], ...] = ()
    task_budget: float | None = None
    repo_task_budgets: tuple[tuple[str, float], ...] = ()
    day_budget: float | None = None
    repo_day_budgets: tuple[tuple[str, float], ...] = ()
    day_start: float = 0.0  # when the budget day began (UTC midnight)

    @property
    def caps_repos(self) -> bool:
        return self.repo_cap is not None or bool(self.repo_caps)

    @property
    def budgets(self) -> bool:
        return (self.task_budget is not None or bool(self.repo_task_budgets) or self.day_budget is not None
                or bool(self.repo_day_budgets))  # fmt: skip


@dataclass
class ClaimOutlook:
    """Who may claim what now, for waking waiting long-polls (``Store.claim_outlook``)."""

    ready: dict[frozenset[str], int]  # requirement set -> how many tasks with it are claimable now
    active: dict[str, int] = field(default_factory=dict)  # agent -> tasks holding its capacity
    draining: set[str] = field(default_factory=set)  # agents that take nothing new
    cooling: dict[str, float] = field(default_factory=dict)  # agent -> end of its cooldown
    next_ready: float | None = None  # when the earliest backoff of a queued task ends


_EVENT_INSERT_COLUMNS = ("ts", "type", "task_id", "agent_id", "attempt", "data")


@dataclass
class ClaimRequest:
    """What one claim asks for (the keyword arguments of ``Store.claim``)."""

    agent_id: str
    capabilities: Iterable[str]
    max_concurrency: int
    lease_secs: float
    ts: float
    task_id: str | None = None
    extra: dict[str, Any] | None = None
    #: The hash of the agent token that authorised the claim (the server's): then the claim also requires
    #: that the agent row still has this token and exactly ``capabilities`` (as listed in the row) and
    #: ``max_concurrency`` — so a claim made with a row read before a change claims nothing.
    agent_token_hash: str | None = None
    limits: ClaimLimits | None = None


def _runnable(r: ClaimRequest) -> bool:
    """Whether a claim may share one statement with others (``_CLAIM_RUN_SQL``): for the best eligible task,
    with no fleet limit — a per-repository cap or a budget is changed by the claims before it."""
    lim = r.limits
    return r.task_id is None and (lim is None or not (lim.caps_repos or lim.budgets))


def _claim_runs(requests: Sequence[ClaimRequest]) -> Iterator[list[ClaimRequest]]:
    """``requests`` cut, in order, into runs one statement claims for: consecutive runnable requests with the
    same capabilities, lease and time, each for another agent; any other request is a run of its own. (The
    server's writer gives the claims of a batch one time: ``Writer._run_claims``.)"""
    run: list[ClaimRequest] = []
    key: tuple | None = None
    agents: set[str] = set()
    for r in requests:
        this = (frozenset(r.capabilities), r.lease_secs, r.ts) if _runnable(r) else None
        if run and (this is None or this != key or r.agent_id in agents):
            yield run
            run, agents = [], set()
        run.append(r)
        key = this
        agents.add(r.agent_id)
        if this is None:
            yield run
            run, agents = [], set()
    if run:
        yield run


def _chunks(rows: list) -> Iterator[list]:
    """``rows`` in power-of-two slices (32, 16, …, 1): multi-row statements of a few fixed sizes, so that
    the connection's statement cache keeps them prepared."""
    i, n = 0, len(rows)
    while i < n:
        size = 1 << min(5, (n - i).bit_length() - 1)
        yield rows[i : i + size]
        i += size


def _multi_insert(table: str, columns: Sequence[str], n: int, returning: str = "") -> str:
    row = "(" + ", ".join("?" for _ in columns) + ")"
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join(row for _ in range(n))
    return sql + (f" RETURNING {returning}" if returning else "")


@functools.lru_cache(maxsize=8)
def _upsert_sql(table: str, columns: tuple[str, ...], pk: tuple[str, ...]) -> str:
    """``INSERT … ON CONFLICT DO UPDATE`` of a projection row (built once per table: every write uses it)."""
    updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in pk)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT({', '.join(pk)}) DO UPDATE SET {updates}")  # fmt: skip


def _encode(col: str, value: Any) -> Any:
    if col in JSON_COLUMNS and value is not None:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def _decode_row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for col in JSON_COLUMNS.intersection(out):
        if out[col] is not None:
            out[col] = _loads(out[col])
    return out


def translate_error(exc: sqlite3.Error, path: Path) -> FleetError:
    """A sqlite3 error as the domain error an operator can act on."""
    msg = str(exc).lower()
    if "locked" in msg or "busy" in msg:
        return StoreBusy(f"the database {path} stayed locked for {BUSY_TIMEOUT_MS // 1000}s; nothing was written")
    if "readonly" in msg or "read-only" in msg:
        return StoreError(f"the database {path} is read-only: {exc}", code="store_readonly")
    if "disk is full" in msg or "disk i/o" in msg:
        return StoreError(f"cannot write the database {path}: {exc}", code="store_io")
    if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
        return StoreError(f"the database {path} is corrupt or not a SQLite database: {exc}", code="store_corrupt")
    if "unable to open" in msg:
        return StoreError(f"cannot open the database {path}: {exc}", code="store_open")
    return StoreError(f"database error on {path}: {exc}")


_NO_LIMITS = ClaimLimits()


@dataclass
class CheckReport:
    """The result of ``db check``."""

    integrity: list[str]
    problems: list[str] = field(default_factory=list)
    events: int = 0
    tasks: int = 0
    agents: int = 0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.integrity == ["ok"] and not self.problems


class Store:
    """One connection to the fleet database. Not thread-safe: give each thread its own."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._db = None
        self._wake = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, *, migrate: bool = True, create: bool = True) -> Store:
        """Open the database at ``path``, creating it owner-only if needed and applying migrations."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: fleetctl needs 3.35 or newer (RETURNING)",
                code="sqlite_too_old",
            )
        path = Path(path).expanduser().absolute()
        if not path.exists():
            if not create:
                raise StoreError(f"no database at {path} (run 'fleetctl init' or 'fleetctl db migrate')")
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot create the database {path}: {exc.strerror}", code="store_open") from None
        elif path.is_dir():
            raise StoreError(f"the database path {path} is a directory", code="store_open")
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise translate_error(exc, path) from None
        conn.row_factory = sqlite3.Row
        store = cls(conn, path)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            store._check_schema(migrate=migrate)
        except sqlite3.Error as exc:
            conn.close()
            raise translate_error(exc, path) from None
        except FleetError:
            conn.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self):
        """The connection wrapped as a ``sqlite_utils.Database`` (imports sqlite-utils)."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self.conn, execute_plugins=False)
        return self._db

    def applied_migrations(self) -> list[str]:
        """Names of the migrations recorded in the database, in order."""
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (MIGRATIONS_TABLE,)
        ).fetchone()
        if not exists:
            return []
        rows = self.conn.execute(
            f"SELECT name FROM {MIGRATIONS_TABLE} WHERE migration_set=? ORDER BY rowid", (MIGRATION_SET,)
        )
        return [r[0] for r in rows]

    def pending_migrations(self) -> list[str]:
        applied = set(self.applied_migrations())
        return [n for n in MIGRATION_NAMES if n not in applied]

    def _check_schema(self, *, migrate: bool) -> None:
        applied = self.applied_migrations()
        unknown = [n for n in applied if n not in MIGRATION_NAMES]
        if unknown:
            raise StoreError(
                f"the database {self.path} has a newer schema than this fleetctl understands "
                f"(unknown migrations: {', '.join(unknown)}); upgrade fleetctl",
                code="schema_too_new",
            )
        if not applied:
            tables = self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
            if tables:
                raise StoreError(f"{self.path} is a SQLite database but not a fleetctl one", code="store_foreign")
        if len(applied) < len(MIGRATION_NAMES) and migrate:
            self.migrate()

    def migrate(self) -> list[str]:
        """Apply pending migrations under the write lock; returns the names applied."""
        from fleetctl.schema import migrations

        with self.write():
            pending = self.pending_migrations()
            if pending:
                migrations().apply(self.db)
        return pending

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def write(self) -> Iterator[Store]:
        """One short ``BEGIN IMMEDIATE`` transaction; commits on success, rolls back on any error."""
        if self.conn.in_transaction:
            yield self  # nested: part of the caller's transaction
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise translate_error(exc, self.path) from None
        self._wake = False
        try:
            yield self
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise translate_error(exc, self.path) from None
        if self._wake:
            from fleetctl.wake import notify

            notify(self.path)

    @contextmanager
    def read(self) -> Iterator[Store]:
        """A read transaction: every query inside sees the same snapshot."""
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def savepoint(self, name: str) -> None:
        """``SAVEPOINT name`` inside the current write (the server's writer gives each request its own)."""
        self.execute(f"SAVEPOINT {_ident(name)}")

    def rollback_to(self, name: str) -> None:
        """Undo what was written since ``savepoint(name)`` (the savepoint stays open)."""
        self.execute(f"ROLLBACK TO {_ident(name)}")

    def release(self, name: str) -> None:
        """Keep what was written since ``savepoint(name)`` as part of the enclosing transaction."""
        self.execute(f"RELEASE {_ident(name)}")

    def end_read(self) -> None:
        """End a read transaction left open (before a pooled connection is reused)."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def set_autocheckpoint(self, pages: int) -> None:
        """``PRAGMA wal_autocheckpoint`` of this connection (0: its commits never checkpoint)."""
        self.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")

    def keep_journals_in_memory(self) -> None:
        """``PRAGMA temp_store=MEMORY`` for this connection: the journals of its savepoints and statements stay
        in memory. By default SQLite spills one to a temporary file once it passes 64 KiB — for the server's
        writer, whose batches run every request in a savepoint, that was one ``pwrite`` of a page to a file
        nobody reads for every page a batch touched, half the writer's system calls. Only for a connection
        whose transactions are small: a sort or temporary table of a large read would stay in memory too."""
        self.execute("PRAGMA temp_store=MEMORY")

    def checkpoint(self) -> tuple[int, int, int] | None:
        """A PASSIVE WAL checkpoint on this connection (see ``wal_checkpoint``)."""
        return wal_checkpoint(self.conn)

    def execute(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Cursor:
        """Run one statement, with sqlite3 errors turned into domain errors."""
        try:
            return self.conn.execute(sql, params)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise translate_error(exc, self.path) from None

    # ------------------------------------------------------------------ events

    def emit(
        self,
        type: str,
        *,
        ts: float,
        task_id: str | None = None,
        agent_id: str | None = None,
        attempt: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one event and apply it to the projections it touches. Call inside ``write()``."""
        assert self.conn.in_transaction, "emit() must run inside Store.write()"
        p = Projections()
        task = self._row("tasks", "task_id", task_id) if task_id else None
        if task is not None:
            p.tasks[task_id] = task
            if attempt is None:
                attempt = task["attempt"] or None
            if agent_id is None:
                agent_id = task["agent_id"]
        agent = self._row("agents", "agent_id", agent_id) if agent_id else None
        if agent is not None:
            p.agents[agent_id] = agent
        if task_id and attempt:
            row = self._one("SELECT * FROM attempts WHERE task_id=? AND attempt=?", (task_id, attempt))
            if row is not None:
                p.attempts[(task_id, attempt)] = row
        host_id = (data or {}).get("host_id") if type.startswith("host.") else None
        if isinstance(host_id, str) and (host := self._row("hosts", "host_id", host_id)) is not None:
            p.hosts[host_id] = host
        before = (
            {k: dict(v) for k, v in p.tasks.items()},
            {k: dict(v) for k, v in p.agents.items()},
            {k: dict(v) for k, v in p.attempts.items()},
            {k: dict(v) for k, v in p.hosts.items()},
        )
        if type in WAKE_EVENTS:
            self._wake = True
        payload = json.dumps(data or {}, sort_keys=True, separators=(",", ":"))
        ev_id = self.execute(
            "INSERT INTO events (ts, type, task_id, agent_id, attempt, data) VALUES (?,?,?,?,?,?) RETURNING id",
            (ts, type, task_id, agent_id, attempt, payload),
        ).fetchone()[0]
        ev = {"id": ev_id, "ts": ts, "type": type, "task_id": task_id, "agent_id": agent_id,
              "attempt": attempt, "data": data or {}}  # fmt: skip
        try:
            apply(p, ev)
        except ReplayError as exc:
            raise InvalidTransition(str(exc)) from None
        self._write_changed("tasks", TASK_COLUMNS, ("task_id",), before[0], p.tasks)
        self._write_changed("agents", AGENT_COLUMNS, ("agent_id",), before[1], p.agents)
        self._write_changed("attempts", ATTEMPT_COLUMNS, ("task_id", "attempt"), before[2], p.attempts)
        self._write_changed("hosts", HOST_COLUMNS, ("host_id",), before[3], p.hosts)
        return ev

    def _write_changed(self, table, columns, pk, before: dict, after: dict) -> None:
        for key, row in after.items():
            if before.get(key) == row:
                continue
            self.execute(_upsert_sql(table, columns, pk), [_encode(c, row.get(c)) for c in columns])

    def _row(self, table: str, pk: str, value: str) -> dict | None:
        return self._one(f"SELECT * FROM {table} WHERE {pk}=?", (value,))

    def _one(self, sql: str, params: Sequence | dict = ()) -> dict | None:
        return _decode_row(self.execute(sql, params).fetchone())

    def _all(self, sql: str, params: Sequence | dict = ()) -> list[dict]:
        return [_decode_row(r) for r in self.execute(sql, params).fetchall()]

    # ------------------------------------------------------------------ claims

    def claim(
        self,
        *,
        agent_id: str,
        capabilities: Iterable[str],
        max_concurrency: int,
        lease_secs: float,
        ts: float,
        task_id: str | None = None,
        extra: dict[str, Any] | None = None,
        agent_token_hash: str | None = None,
        limits: ClaimLimits | None = None,
    ) -> dict | None:
        """Atomically move the best eligible queued task (or ``task_id``) to ``assigned`` for ``agent_id``.

        One conditional ``UPDATE … RETURNING``: the task must still be queued and past its backoff, its
        requirements covered by ``capabilities``, the agent online, not cooling down after a usage limit and
        under ``max_concurrency``, the fleet's ``limits`` kept (per-repository caps, budgets) (and, with
        ``agent_token_hash``, the agent row still as the caller read it: see ``ClaimRequest``). Returns
        the claimed task, or None. Runs in its own write transaction unless already inside one.
        """
        request = ClaimRequest(agent_id, capabilities, max_concurrency, lease_secs, ts, task_id, extra,
                               agent_token_hash, limits)  # fmt: skip
        return self.claim_many([request])[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[dict | None]:
        """``claim`` for each request, in order, in one transaction: the claimed task or None for each.

        The result is what the same claims made one after another give: each sees the claims before it.
        Consecutive requests for the best eligible task with the same capabilities, no fleet limit (caps,
        budgets) and each for another agent are claimed with ONE statement (``_CLAIM_RUN_SQL``); the others
        (a given task, a limit that a claim can change for the next, an agent asking twice) each with its
        own conditional ``UPDATE … RETURNING``. Their events, attempts and agents' ``last_assigned_at`` are
        then written with one statement per table for the lot — what lets the server's writer claim for 32
        agents in one batch without paying statements (and round trips through the GIL) per claim.
        """
        with self.write():
            rows: list[dict | None] = []
            spent: dict[tuple[float, str | None], float] = {}
            for run in _claim_runs(requests):
                if _runnable(run[0]):
                    rows.extend(self._claim_run(run))
                else:
                    rows.append(self._claim_one(run[0], spent))
            won = [(r, row) for r, row in zip(requests, rows, strict=True) if row is not None]
            if won:
                self._record_claims(won)
        return rows

    def _claim_one(self, r: ClaimRequest, spent: dict) -> dict | None:
        """One request, with its own statement (``_claim_sql``): a given task, or the fleet's limits."""
        params = {"agent": r.agent_id, "caps": json.dumps(sorted(set(r.capabilities))), "now": r.ts,
                  "lease": r.ts + r.lease_secs, "max": r.max_concurrency, "tid": r.task_id,
                  "ath": r.agent_token_hash,
                  "acaps": json.dumps(list(r.capabilities)) if r.agent_token_hash else None}  # fmt: skip
        lim = r.limits or _NO_LIMITS
        if lim.budgets:
            blocked = self._over_day_budget(lim, spent)
            if blocked is None:  # the fleet's day budget is spent: nothing starts
                return None
            params.update(task_budget=lim.task_budget, task_budgets=json.dumps(dict(lim.repo_task_budgets)),
                          blocked_repos=json.dumps(blocked))  # fmt: skip
        if lim.caps_repos:
            params.update(repo_cap=lim.repo_cap, repo_caps=json.dumps(dict(lim.repo_caps)))
        sql = _claim_sql(bool(r.task_id), lim.caps_repos, lim.budgets)
        return _decode_row(self.execute(sql, params).fetchone())

    def _claim_run(self, run: list[ClaimRequest]) -> list[dict | None]:
        """A run of ``_claim_runs`` with one statement: the task each request got, or None."""
        first = run[0]
        requests = [[r.agent_id, r.agent_token_hash, list(r.capabilities) if r.agent_token_hash else None,
                     r.max_concurrency] for r in run]  # fmt: skip
        params = {"requests": json.dumps(requests), "caps": json.dumps(sorted(set(first.capabilities))),
                  "now": first.ts, "lease": first.ts + first.lease_secs}  # fmt: skip
        got = {row["agent_id"]: row for row in map(_decode_row, self.execute(_CLAIM_RUN_SQL, params).fetchall())}
        return [got.get(r.agent_id) for r in run]

    def _over_day_budget(self, lim: ClaimLimits, memo: dict) -> list[str] | None:
        """The repositories past their day's budget (lower-cased), or None when the fleet's is spent."""
        if lim.day_budget is not None and self.spend_since(lim.day_start, memo=memo) >= lim.day_budget:
            return None
        return [repo for repo, budget in lim.repo_day_budgets
                if self.spend_since(lim.day_start, repo, memo=memo) >= budget]  # fmt: skip

    def spend_since(self, since: float, repo: str | None = None, *, memo: dict | None = None) -> float:
        """Dollars reported by the attempts assigned since ``since`` (the fleet's, or ``repo``'s)."""
        key = (since, repo.lower() if repo else None)
        if memo is not None and key in memo:
            return memo[key]
        if repo is None:
            sql, params = (
                "SELECT total(cost_usd) FROM attempts WHERE cost_usd IS NOT NULL AND assigned_at >= ?",
                [since],
            )
        else:
            sql = ("SELECT total(a.cost_usd) FROM attempts AS a JOIN tasks AS t USING (task_id) "
                   "WHERE a.cost_usd IS NOT NULL AND a.assigned_at >= ? AND t.repo = ? COLLATE NOCASE")  # fmt: skip
            params = [since, repo]
        value = float(self.execute(sql, params).fetchone()[0])
        if memo is not None:
            memo[key] = value
        return value

    def _record_claims(self, won: list[tuple[ClaimRequest, dict]]) -> None:
        """The events and the attempt/agent rows for claims the UPDATEs already wrote to ``tasks``.

        This is the hot path of every claim, so it writes the rows the reducer changes directly instead of
        the generic read-apply-upsert of ``emit`` — after checking that the reducer, applied to each claimed
        row, gives exactly what its UPDATE wrote (``db check`` re-verifies all of it). Events get their ids
        in the order of the claims, which is the order the UPDATEs ran.
        """
        events, datas = [], []
        for r, row in won:
            data = {"lease_expires_at": row["lease_expires_at"], **(r.extra or {})}
            datas.append(data)
            events.append((r.ts, "task.assigned", row["task_id"], row["agent_id"], row["attempt"],
                           json.dumps(data, sort_keys=True, separators=(",", ":"))))  # fmt: skip
        ids: dict[str, int] = {}
        for chunk in _chunks(events):
            ids.update(self.execute(_multi_insert("events", _EVENT_INSERT_COLUMNS, len(chunk), "task_id, id"),
                                    [v for ev in chunk for v in ev]).fetchall())  # fmt: skip
        attempts, last_assigned = [], {}
        for (r, row), data in zip(won, datas, strict=True):
            task_id, agent_id, attempt = row["task_id"], row["agent_id"], row["attempt"]
            ev = {"id": ids[task_id], "ts": r.ts, "type": "task.assigned", "task_id": task_id,
                  "agent_id": agent_id, "attempt": attempt, "data": data}  # fmt: skip
            # the reducer starts from the row as it was before its UPDATE (queued), like any other write
            p = Projections(tasks={task_id: {**row, "state": TaskState.QUEUED.value}},
                            agents={agent_id: {"last_assigned_at": None}})  # fmt: skip
            apply(p, ev)
            if p.tasks[task_id] != row:  # the SQL claim and the reducer must agree, always
                raise StoreError(f"internal error: claim of {task_id} disagrees with the event reducer")
            att = p.attempts[(task_id, attempt)]
            attempts.append([_encode(c, att.get(c)) for c in ATTEMPT_COLUMNS])
            last_assigned[agent_id] = p.agents[agent_id]["last_assigned_at"]  # the last claim's, as replay
        for chunk in _chunks(attempts):
            self.execute(_multi_insert("attempts", ATTEMPT_COLUMNS, len(chunk)), [v for a in chunk for v in a])
        for chunk in _chunks(list(last_assigned.items())):
            values = ", ".join("(?, ?)" for _ in chunk)
            self.execute(f"UPDATE agents SET last_assigned_at = v.column2 FROM (VALUES {values}) AS v "
                         "WHERE agents.agent_id = v.column1", [v for pair in chunk for v in pair])  # fmt: skip

    # ------------------------------------------------------------------ reads

    def task(self, task_id: str) -> dict | None:
        return self._row("tasks", "task_id", task_id)

    def tasks(
        self,
        *,
        states: Sequence[str] = (),
        agent_id: str | None = None,
        repo: str | None = None,
        issue_number: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Tasks in creation order, filtered; ``after_seq`` pages."""
        where, params = _where(
            (f"state IN ({', '.join('?' for _ in states)})", list(states)) if states else None,
            ("agent_id = ?", [agent_id]) if agent_id is not None else None,
            ("repo = ? COLLATE NOCASE", [repo]) if repo is not None else None,
            ("issue_number = ?", [issue_number]) if issue_number is not None else None,
            ("seq > ?", [after_seq]) if after_seq is not None else None,
        )
        sql = f"SELECT * FROM tasks{where} ORDER BY seq" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._all(sql, params)

    def agent(self, agent_id: str) -> dict | None:
        return self._row("agents", "agent_id", agent_id)

    def agents(self, *, status: str | None = None, mode: str | None = None) -> list[dict]:
        where, params = _where(("status = ?", [status]) if status else None, ("mode = ?", [mode]) if mode else None)
        return self._all(f"SELECT * FROM agents{where} ORDER BY agent_id", params)

    def running_counts(self) -> dict[str, int]:
        """Tasks holding each agent's capacity (assigned or running)."""
        rows = self.execute(f"SELECT agent_id, count(*) FROM tasks WHERE state IN {_ACTIVE} GROUP BY agent_id")
        return {r[0]: r[1] for r in rows}

    def attempts(self, task_id: str) -> list[dict]:
        return self._all("SELECT * FROM attempts WHERE task_id=? ORDER BY attempt", (task_id,))

    def attempt(self, task_id: str, attempt: int) -> dict | None:
        return self._one("SELECT * FROM attempts WHERE task_id=? AND attempt=?", (task_id, attempt))

    def open_attempts(self) -> list[dict]:
        """Attempts that have not ended, with their task's state and timeout (for the sweep)."""
        return self._all(
            "SELECT a.*, t.state AS task_state, t.timeout_secs, t.attempt_started_at, t.lease_expires_at, "
            "ag.mode AS agent_mode, ag.agent_type FROM attempts a JOIN tasks t ON t.task_id=a.task_id AND t.attempt=a.attempt "
            "LEFT JOIN agents ag ON ag.agent_id=a.agent_id "
            f"WHERE a.ended_at IS NULL AND t.state IN {_ACTIVE}"
        )

    def hosts(self) -> dict[str, dict]:
        """Every host that was ever marked down or up again, by host id (status, since, error)."""
        return {r["host_id"]: r for r in self._all("SELECT * FROM hosts")}

    def down_hosts(self) -> dict[str, dict]:
        return {r["host_id"]: r for r in self._all("SELECT * FROM hosts WHERE status = 'down'")}

    def workspaces_to_clean(self, ended_before: float, limit: int = 200, *, hosts: Iterable[str] | None = None,
                            after: tuple[float, str, int] | None = None) -> list[dict]:  # fmt: skip
        """Settled attempts whose workspace is still there and which ended before ``ended_before``, oldest first
        (by ``ended_at, task_id, attempt``); only on ``hosts`` when given, and only after the key ``after``."""
        # the partial index attempts_to_clean (ended_at, under the first three terms) serves the scan
        where, params = _where(
            ("ended_at IS NOT NULL AND workspace IS NOT NULL AND workspace_cleaned_at IS NULL AND ended_at < ?",
             [ended_before]),
            ("host_id IN (SELECT value FROM json_each(?))", [json.dumps(list(hosts))]) if hosts is not None else None,
            ("(ended_at, task_id, attempt) > (?, ?, ?)", list(after)) if after is not None else None,
        )  # fmt: skip
        return self._all("SELECT task_id, attempt, agent_id, host_id, workspace, ended_at FROM attempts"
                         f"{where} ORDER BY ended_at, task_id, attempt LIMIT ?", (*params, limit))  # fmt: skip

    def events(
        self,
        *,
        task_id: str | None = None,
        agent_id: str | None = None,
        types: Sequence[str] = (),
        since: float | None = None,
        after_id: int | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> list[dict]:
        """Events in order (``newest`` takes the last ``limit`` ones, still returned oldest first)."""
        kinds = [("type LIKE ?", t.rstrip("*") + "%") if t.endswith((".*", ".")) else ("type = ?", t) for t in types]
        where, params = _where(
            ("task_id = ?", [task_id]) if task_id is not None else None,
            ("agent_id = ?", [agent_id]) if agent_id is not None else None,
            ("(" + " OR ".join(c for c, _ in kinds) + ")", [v for _, v in kinds]) if kinds else None,
            ("ts >= ?", [since]) if since is not None else None,
            ("id > ?", [after_id]) if after_id is not None else None,
        )
        sql = f"SELECT * FROM events{where} ORDER BY id" + (" DESC" if newest else "")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self.execute(sql, params).fetchall()
        out = [{**dict(r), "data": json.loads(r["data"])} for r in rows]
        return out[::-1] if newest else out

    def active_task_for_issue(self, repo: str, issue_number: int, *, exclude: str | None = None) -> str | None:
        """The id of the task for ``repo#issue_number`` that is not terminal (other than ``exclude``), if any."""
        row = self.execute(
            f"SELECT task_id FROM tasks WHERE repo=? COLLATE NOCASE AND issue_number=? AND state IN {_OPEN} "
            "AND task_id IS NOT ?",
            (repo, issue_number, exclude),
        ).fetchone()
        return row[0] if row else None

    def last_task_for_issue(self, repo: str, issue_number: int) -> dict | None:
        """The most recent task of ``repo#issue_number``, in any state."""
        return self._one("SELECT * FROM tasks WHERE repo=? COLLATE NOCASE AND issue_number=? ORDER BY seq DESC "
                         "LIMIT 1", (repo, issue_number))  # fmt: skip

    def cancel_reason(self, task_id: str) -> str | None:
        """The reason of the task's last cancellation."""
        row = self.execute("SELECT data FROM events WHERE task_id=? AND type='task.cancelled' ORDER BY id DESC LIMIT 1",
                           (task_id,)).fetchone()  # fmt: skip
        return _loads(row[0]).get("reason") if row else None

    def ready_tasks(self, ts: float) -> list[tuple[str, list[str], str | None, float]]:
        """``(task_id, requirements, repo, spent_usd)`` of the queued tasks past their backoff, best first (for
        planning: the repository for its cap, the spend for its budget)."""
        sql = (
            "SELECT task_id, requirements, repo, spent_usd FROM tasks INDEXED BY tasks_claim "
            f"WHERE {_READY} ORDER BY priority DESC, seq"
        )
        return [(r[0], _loads(r[1]), r[2], r[3]) for r in self.execute(sql, {"now": ts})]

    def review_handled(self, task_id: str, head_sha: str) -> bool:
        """Whether changes requested on ``head_sha`` of the task's pull request were already acted on (a
        rejection recorded, a rework made, or the task flagged for a person): one rework per head commit."""
        row = self.execute(
            "SELECT 1 FROM events WHERE task_id = ? AND type IN ('task.review_rejected', 'task.rework', "
            "'task.needs_human') AND coalesce(json_extract(data, '$.head_sha'), json_extract(data, '$.review.head_sha')) = ? "
            "LIMIT 1",
            (task_id, head_sha),
        ).fetchone()
        return row is not None

    _USAGE_KEYS = {"task": "a.task_id", "repo": "coalesce(lower(t.repo), '')", "agent": "a.agent_id",
                   "day": "date(a.assigned_at, 'unixepoch')"}  # fmt: skip

    def usage_totals(self, by: str, since: float | None = None) -> list[dict]:
        """Recorded usage summed per ``by`` (task, repo, agent or the UTC day an attempt started): attempts with
        a report, input and output tokens, dollars; biggest spender first."""
        key = self._USAGE_KEYS[by]
        sql = (
            f"SELECT {key} AS key, count(*) AS attempts, total(json_extract(a.usage, '$.input_tokens')) AS input_tokens, "
            "total(json_extract(a.usage, '$.output_tokens')) AS output_tokens, total(a.cost_usd) AS cost_usd "
            "FROM attempts AS a JOIN tasks AS t USING (task_id) WHERE a.usage IS NOT NULL AND a.assigned_at >= ? "
            "GROUP BY 1 ORDER BY cost_usd DESC, key"
        )
        return self._all(sql, (since or 0.0,))

    def add_command(self, row: dict[str, Any]) -> bool:
        """Record a comment command (``commands``); False, writing nothing, when its comment was recorded already."""
        cols = ("comment_key", "received_at", "repo", "number", "is_pull", "comment_id", "sender", "command", "body")
        cur = self.execute(f"INSERT OR IGNORE INTO commands ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [row[c] for c in cols])  # fmt: skip
        return cur.rowcount == 1

    def pending_commands(self, limit: int = 20) -> list[dict]:
        return self._all("SELECT * FROM commands WHERE state = 'pending' ORDER BY id LIMIT ?", (limit,))

    def finish_command(self, command_id: int, state: str, detail: str, task_id: str | None, ts: float | None) -> None:
        """A command's outcome (``done``, ``refused``, ``failed``), or another try later (``pending``, tries + 1)."""
        self.execute("UPDATE commands SET state = ?, detail = ?, task_id = coalesce(?, task_id), tries = tries + 1, "
                     "done_at = ? WHERE id = ?", (state, detail[:1000], task_id, ts, command_id))  # fmt: skip

    def command(self, comment_key: str) -> dict | None:
        """The command recorded for a comment (``commands.comment_key``), or None."""
        return self._one("SELECT * FROM commands WHERE comment_key = ?", (comment_key,))

    def commands(self, limit: int = 50) -> list[dict]:
        return self._all("SELECT * FROM commands ORDER BY id DESC LIMIT ?", (limit,))

    def blocked_tasks(self, by: str, limit: int = 200) -> list[dict]:
        """Queued tasks marked ``blocked_by = by``, oldest first."""
        return self._all(
            "SELECT task_id, repo, spent_usd FROM tasks INDEXED BY tasks_claim WHERE state = 'queued' AND blocked_by = ? "
            "ORDER BY priority DESC, seq LIMIT ?",
            (by, limit),
        )

    def reviews_pending(self, limit: int = 20) -> list[dict]:
        """Tasks awaiting review whose pull request got "changes requested" and whose rework waits for the review's
        comments. A task that left review meanwhile (its pull request closed unmerged: failed) is not one, though
        its ``review_pending`` stays until a retry: it must not take a place of the pass's bound, nor a request."""
        return self._all(
            "SELECT * FROM tasks INDEXED BY tasks_review_pending WHERE review_pending IS NOT NULL "
            "AND state = 'awaiting_review' ORDER BY seq LIMIT ?",
            (limit,),
        )

    def active_by_repo(self) -> dict[str, int]:
        """Tasks holding a repository's slot (assigned, running, awaiting review), by lower-cased repository."""
        rows = self.execute(
            f"SELECT lower(repo), count(*) FROM tasks INDEXED BY tasks_repo_active WHERE state IN {_LEASED} "
            "AND repo IS NOT NULL GROUP BY lower(repo)"
        )
        return {r[0]: r[1] for r in rows}

    def count_ready(self, ts: float) -> int:
        """Queued tasks past their backoff."""
        return self.execute(f"SELECT count(*) FROM tasks WHERE {_READY}", {"now": ts}).fetchone()[0]

    def count_backoff_released(self, ts: float) -> int:
        """Queued tasks that waited out a backoff and are ready now."""
        return self.execute(
            f"SELECT count(*) FROM tasks WHERE {_READY} AND not_before IS NOT NULL", {"now": ts}
        ).fetchone()[0]

    def claim_outlook(self, ts: float, limits: ClaimLimits | None = None) -> ClaimOutlook:
        """In one read snapshot: the requirement sets of the tasks claimable at ``ts`` (the repository caps of
        ``limits`` applied; budgets are left to the claim) with their counts, and — when there are any — every
        agent's active count, the draining agents and the cooling ones; and when the next backoff ends."""
        lim = limits or _NO_LIMITS
        params: dict[str, Any] = {"now": ts}
        cap = ""
        if lim.caps_repos:
            cap = _CLAIM_REPO_CAP
            params.update(repo_cap=lim.repo_cap, repo_caps=json.dumps(dict(lim.repo_caps)))
        with self.read():
            ready: dict[frozenset[str], int] = {}
            for reqs, n in self.execute(f"SELECT requirements, count(*) FROM tasks INDEXED BY tasks_claim "
                                        f"WHERE {_READY}{cap} GROUP BY requirements LIMIT 1000", params):  # fmt: skip
                key = frozenset(json.loads(reqs or "[]"))
                ready[key] = ready.get(key, 0) + n
            outlook = ClaimOutlook(ready, next_ready=self.next_backoff_end(ts))
            if ready:
                outlook.active = dict(self.execute(
                    f"SELECT agent_id, count(*) FROM tasks WHERE state IN {_ACTIVE} AND agent_id IS NOT NULL "
                    "GROUP BY agent_id"))  # fmt: skip
                for agent_id, status, cooldown in self.execute(
                        "SELECT agent_id, status, cooldown_until FROM agents "
                        f"WHERE status = '{AgentStatus.DRAINING.value}' OR cooldown_until > ?", (ts,)):  # fmt: skip
                    if status == AgentStatus.DRAINING.value:
                        outlook.draining.add(agent_id)
                    elif cooldown is not None:
                        outlook.cooling[agent_id] = cooldown
        return outlook

    @property
    def woke(self) -> bool:
        """Whether the last transaction written here may have made a task claimable (a wake event)."""
        return self._wake

    def next_backoff_end(self, ts: float) -> float | None:
        """When the earliest backoff of a queued task ends, if one is still waiting at ``ts``."""
        return self.execute(
            f"SELECT min(not_before) FROM tasks WHERE state='{TaskState.QUEUED.value}' AND not_before > ?", (ts,)
        ).fetchone()[0]

    def agent_by_token_hash(self, token_hash: str) -> dict | None:
        """The agent whose current token has this hash."""
        return self._one("SELECT * FROM agents WHERE token_hash=?", (token_hash,))

    def attempt_by_token_hash(self, token_hash: str) -> dict | None:
        """``{task_id, attempt, agent_id}`` of the attempt whose task token has this hash."""
        return self._one("SELECT task_id, attempt, agent_id FROM attempts WHERE token_hash=?", (token_hash,))

    def has_attempt_by(self, task_id: str, agent_id: str) -> bool:
        """Whether ``agent_id`` ever held an attempt of ``task_id``."""
        sql = "SELECT 1 FROM attempts WHERE task_id=? AND agent_id=? LIMIT 1"
        return self.execute(sql, (task_id, agent_id)).fetchone() is not None

    def touch_agent(self, agent_id: str, ts: float) -> None:
        """Record a sign of life (volatile: not an event, SPEC §3)."""
        self.execute("UPDATE agents SET last_heartbeat_at=? WHERE agent_id=?", (ts, agent_id))

    def extend_leases(self, agent_id: str, until: float) -> None:
        """Extend the leases of every task ``agent_id`` holds (volatile: not an event, SPEC §3)."""
        self.execute(f"UPDATE tasks SET lease_expires_at=? WHERE agent_id=? AND state IN {_ACTIVE}", (until, agent_id))

    def ended_attempts_of(self, agent_id: str, since: float) -> list[dict]:
        """Attempts of ``agent_id`` that ended (failed or cancelled) since ``since`` and were not handed in by it:
        ``task_id, attempt, outcome, failure_reason`` (a heartbeat tells the agent to stop their runs)."""
        return self._all(
            "SELECT task_id, attempt, outcome, failure_reason FROM attempts WHERE agent_id=? AND ended_at >= ? "
            "AND outcome IN ('failed', 'cancelled') ORDER BY ended_at",
            (agent_id, since),
        )

    def runs_to_stop_since(self, since: float) -> list[dict]:
        """Attempts on a host that were cancelled, lost with their agent or host, or stopped over their budget, since
        ``since`` (their process may live on: the sweep kills it)."""
        return self._all(
            "SELECT task_id, attempt, agent_id, host_id, workspace, outcome, failure_reason FROM attempts "
            "WHERE (outcome='cancelled' OR failure_reason IN ('agent_lost', 'budget_exceeded')) "
            "AND host_id IS NOT NULL AND workspace IS NOT NULL AND ended_at >= ?",
            (since,),
        )

    def assignment(self, task_id: str, attempt: int) -> dict:
        """The data of the ``task.assigned`` event of an attempt ({} if there is none)."""
        row = self.execute(
            "SELECT data FROM events WHERE task_id=? AND attempt=? AND type='task.assigned' ORDER BY id DESC LIMIT 1",
            (task_id, attempt),
        ).fetchone()
        return _loads(row[0]) if row else {}

    def max_event_id(self) -> int:
        """The id of the newest event (0 when there is none)."""
        return self.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def ping(self) -> None:
        """A cheap read that fails (``StoreError``) when the database cannot be read."""
        self.execute("SELECT 1 FROM tasks LIMIT 1").fetchall()

    def counts(self) -> dict[str, dict[str, int]]:
        """Tasks by state and agents by status."""
        tasks = dict(self.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        agents = dict(self.execute("SELECT status, count(*) FROM agents GROUP BY status").fetchall())
        return {"tasks": tasks, "agents": agents}

    # ------------------------------------------------------------------ meta (small key/value facts)

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table (the outbox cursor, the cached Forgejo account), or None."""
        row = self.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (inside or outside a write: a single statement is its own transaction)."""
        self.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                     (key, value))  # fmt: skip

    # ------------------------------------------------------------------ webhook deliveries

    def delivery(self, delivery_id: str) -> dict | None:
        """One recorded delivery (with its compressed raw body ``body_zlib`` when it was kept), or None."""
        return self._one("SELECT * FROM deliveries WHERE delivery_id=?", (delivery_id,))

    def record_delivery(self, row: dict[str, Any]) -> bool:
        """Insert a delivery row; False (and nothing written) when its ``delivery_id`` is already recorded."""
        cols = [c for c in _DELIVERY_COLUMNS if c in row]
        cur = self.execute(
            f"INSERT INTO deliveries ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
            "ON CONFLICT(delivery_id) DO NOTHING",
            [row[c] for c in cols],
        )
        return cur.rowcount == 1

    def delivery_with_key(self, semantic_key: str) -> str | None:
        """The id of an accepted delivery with this semantic key (a re-sent copy of the same change)."""
        row = self.execute(
            "SELECT delivery_id FROM deliveries WHERE semantic_key=? AND verdict='accepted' LIMIT 1", (semantic_key,)
        ).fetchone()
        return row[0] if row else None

    def last_item_update(self, repo: str, number: int) -> float | None:
        """When the newest change applied to ``repo#number`` (an issue or a pull request) was made in Forgejo."""
        return self.execute(
            "SELECT max(item_updated) FROM deliveries WHERE repo=? COLLATE NOCASE AND number=? "
            "AND verdict='accepted' AND item_updated IS NOT NULL", (repo, number)).fetchone()[0]  # fmt: skip

    def deliveries(self, *, verdict: str | None = None, limit: int = 50) -> list[dict]:
        """Recorded deliveries, newest first (in the order they were recorded: no index on the time to keep up
        on every delivery), without their bodies."""
        where, params = _where(("verdict = ?", [verdict]) if verdict else None)
        cols = ", ".join(c for c in _DELIVERY_COLUMNS if c != "body_zlib")
        return self._all(f"SELECT {cols} FROM deliveries{where} ORDER BY rowid DESC LIMIT {int(limit)}", params)

    def prune_deliveries(self, before: float, limit: int = 1000) -> int:
        """Remove up to ``limit`` of the oldest deliveries received before ``before`` (oldest by rowid: they are
        recorded in time order, and no index on the time is kept up for this); how many were removed."""
        with self.write():
            return self.execute(
                "DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM (SELECT rowid, received_at FROM deliveries "
                "ORDER BY rowid LIMIT ?) WHERE received_at < ?)", (int(limit), before)).rowcount  # fmt: skip

    # ------------------------------------------------------------------ outbox

    def outbox_cursor(self) -> int:
        """The id of the last event the outbox has derived its side effects from."""
        return int(self.meta(OUTBOX_CURSOR) or 0)

    def enqueue_effects(self, rows: Sequence[dict[str, Any]], cursor: int) -> int:
        """Insert outbox rows (an effect of an event already queued is left as it is) and move the cursor to
        ``cursor``, in one write. Returns how many rows were new."""
        new = 0
        with self.write():
            if self.outbox_cursor() > cursor:
                return 0  # another pass got further meanwhile
            for r in rows:
                cur = self.execute(
                    "INSERT INTO outbox (event_id, target, kind, task_id, repo, issue_number, payload, next_try_at, "
                    "created_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(event_id, target, kind) DO NOTHING",
                    (r["event_id"], r["target"], r["kind"], r.get("task_id"), r.get("repo"), r.get("issue_number"),
                     json.dumps(r.get("payload") or {}, sort_keys=True), r["ts"], r["ts"]),
                )  # fmt: skip
                new += cur.rowcount
            self.set_meta(OUTBOX_CURSOR, str(cursor))
        return new

    def outbox_due(self, ts: float, limit: int = 100, *, target: str | None = None) -> list[dict]:
        """Pending outbox rows whose next try is due, oldest first (of one ``target``, or of all)."""
        where = " AND target=?" if target else ""
        rows = self._all(f"SELECT * FROM outbox WHERE state='pending' AND next_try_at <= ?{where} ORDER BY id LIMIT ?",
                         (ts, *((target,) if target else ()), int(limit)))  # fmt: skip
        for r in rows:
            r["payload"] = _loads(r["payload"])
        return rows

    def outbox_pending(self, target: str, limit: int = 100) -> list[dict]:
        """A target's pending rows in order, due or not (its head of line first)."""
        rows = self._all("SELECT * FROM outbox WHERE state='pending' AND target=? ORDER BY id LIMIT ?",
                         (target, int(limit)))  # fmt: skip
        for r in rows:
            r["payload"] = _loads(r["payload"])
        return rows

    def count_outbox_pending(self, target: str) -> int:
        """How many of a target's rows are pending."""
        return self.execute("SELECT count(*) FROM outbox WHERE state='pending' AND target=?", (target,)).fetchone()[0]

    def batch_outbox_rows(self, row_ids: Sequence[int], batch: int) -> list[dict]:
        """Put the rows not yet in a batch into ``batch`` (a batch, once made, is never changed); the pending
        rows of ``batch``, in order."""
        if row_ids:
            marks = ", ".join("?" for _ in row_ids)
            self.execute(f"UPDATE outbox SET batch=? WHERE id IN ({marks}) AND batch IS NULL AND state='pending'",
                         (int(batch), *map(int, row_ids)))  # fmt: skip
        rows = self._all("SELECT * FROM outbox WHERE batch=? AND state='pending' ORDER BY id", (int(batch),))
        for r in rows:
            r["payload"] = _loads(r["payload"])
        return rows

    def outbox_rows(self, *, states: Sequence[str] = (), limit: int = 100) -> list[dict]:
        """Outbox rows, newest first, filtered by state."""
        where, params = _where((f"state IN ({', '.join('?' for _ in states)})", list(states)) if states else None)
        rows = self._all(f"SELECT * FROM outbox{where} ORDER BY id DESC LIMIT {int(limit)}", params)
        for r in rows:
            r["payload"] = _loads(r["payload"])
        return rows

    def newer_outbox_row(self, row: dict) -> bool:
        """Whether a later row of the same kind exists for the same issue (a newer status label supersedes)."""
        sql = "SELECT 1 FROM outbox WHERE repo=? AND issue_number=? AND kind=? AND target=? AND id>? LIMIT 1"
        found = self.execute(sql, (row["repo"], row["issue_number"], row["kind"], row["target"], row["id"]))
        return found.fetchone() is not None

    def finish_outbox_row(
        self, row_id: int | Sequence[int], state: str, ts: float, *, error: str | None = None
    ) -> None:
        """Mark a row (or several, in one statement) done / superseded / dead (with the last error, if any)."""
        ids = _ids(row_id)
        self.execute(f"UPDATE outbox SET state=?, done_at=?, last_error=coalesce(?, last_error) "
                     f"WHERE id IN ({', '.join('?' for _ in ids)})", (state, ts, error, *ids))  # fmt: skip

    def retry_outbox_row(self, row_id: int | Sequence[int], next_try_at: float, error: str) -> None:
        """Count a failed try of a row (or several) and put it back for ``next_try_at``."""
        ids = _ids(row_id)
        self.execute(f"UPDATE outbox SET tries=tries+1, next_try_at=?, last_error=? "
                     f"WHERE id IN ({', '.join('?' for _ in ids)})", (next_try_at, error, *ids))  # fmt: skip

    def count_outbox(self) -> dict[str, int]:
        """Outbox rows by state."""
        return dict(self.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())

    # ------------------------------------------------------------------ pending receipts

    def pending_receipts(self) -> list[dict]:
        """Open attempts whose receipt waits for Forgejo (``task_id, attempt, agent_id, receipt``)."""
        return self._all(
            "SELECT a.task_id, a.attempt, a.agent_id, a.receipt FROM attempts a JOIN tasks t ON t.task_id=a.task_id "
            "AND t.attempt=a.attempt WHERE a.receipt_pending IS NOT NULL AND a.ended_at IS NULL ORDER BY a.assigned_at"
        )

    def tasks_with_pull_request(self, repo: str, number: int) -> list[dict]:
        """Open tasks of ``repo`` whose linked pull request is ``number``."""
        return self._all(
            f"SELECT * FROM tasks WHERE repo=? COLLATE NOCASE AND state IN {_OPEN} "
            "AND json_extract(pull_request, '$.number')=?",
            (repo, number),
        )

    # ------------------------------------------------------------------ maintenance

    def check(self) -> CheckReport:
        """Replay every event into fresh projections and compare with the stored ones; integrity_check.

        Sized for a million events (SPEC §11: ``db check`` ≤ 30 s at 100,000 tasks): the cyclic garbage
        collector is off meanwhile (it would rescan hundreds of thousands of long-lived row dicts, and
        there are no cycles to find), rows come as plain tuples, event data is decoded by the C scanner,
        informational events (which the reducer ignores) are decoded but not applied, and ``_diff``
        compares rows column by column only where they differ.
        """
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            return self._check()
        finally:
            if gc_was_on:
                gc.enable()

    def _check(self) -> CheckReport:
        integrity = [r[0] for r in self.execute("PRAGMA integrity_check").fetchall()]
        report = CheckReport(integrity=integrity)
        p = Projections()
        with self.read():
            cur = self.execute("SELECT id, ts, type, task_id, agent_id, attempt, data FROM events ORDER BY id")
            cur.row_factory = None
            for ev_id, ts, kind, task_id, agent_id, attempt, text in cur:
                report.events += 1
                try:
                    data = _loads(text)
                except ValueError:
                    report.problems.append(f"event {ev_id} ({kind}): its data is not valid JSON")
                    continue
                if kind not in STATEFUL_EVENT_TYPES:
                    continue  # apply() would return at once
                ev = {"id": ev_id, "ts": ts, "type": kind, "task_id": task_id, "agent_id": agent_id,
                      "attempt": attempt, "data": data}  # fmt: skip
                try:
                    apply(p, ev)
                except ReplayError as exc:
                    report.problems.append(str(exc))
            stored = {
                "tasks": {r["task_id"]: r for r in self._all("SELECT * FROM tasks")},
                "agents": {r["agent_id"]: r for r in self._all("SELECT * FROM agents")},
                "attempts": {(r["task_id"], r["attempt"]): r for r in self._all("SELECT * FROM attempts")},
                "hosts": {r["host_id"]: r for r in self._all("SELECT * FROM hosts")},
            }
        report.tasks, report.agents, report.attempts = (len(stored[k]) for k in ("tasks", "agents", "attempts"))
        for table, replayed in (("tasks", p.tasks), ("agents", p.agents), ("attempts", p.attempts),
                                ("hosts", p.hosts)):  # fmt: skip
            report.problems += _diff(table, replayed, stored[table], VOLATILE.get(table, frozenset()))
        return report

    def backup(self, dest: str | Path) -> Path:
        """Copy the live database to ``dest`` with SQLite's online backup API (never overwrites)."""
        dest = Path(dest).expanduser().absolute()
        if dest.exists():
            raise StoreError(f"{dest} already exists; choose a new file for the backup", code="backup_exists")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            target = sqlite3.connect(dest)
            try:
                self.conn.backup(target)
            finally:
                target.close()
        except sqlite3.Error as exc:
            raise translate_error(exc, dest) from None
        except OSError as exc:
            raise StoreError(f"cannot write the backup {dest}: {exc.strerror}", code="store_io") from None
        return dest


def _ident(name: str) -> str:
    if not name.isidentifier():
        raise ValueError(f"not an SQL identifier: {name!r}")
    return name


def wal_checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int] | None:
    """``PRAGMA wal_checkpoint(PASSIVE)``: (busy, WAL pages, pages copied), or None if it failed."""
    try:
        return tuple(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
    except sqlite3.Error:
        return None  # busy or failing: the next round (or another process's autocheckpoint) catches up


def connect_raw(path: Path) -> sqlite3.Connection:
    """A bare autocommit connection that never waits for locks (the server's checkpointer thread)."""
    return sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)


def _where(*conditions: tuple[str, list] | None) -> tuple[str, list]:
    """`` WHERE a AND b`` (or nothing) and its parameters, from the ``(sql, params)`` conditions that apply."""
    used = [c for c in conditions if c is not None]
    sql = (" WHERE " + " AND ".join(c for c, _ in used)) if used else ""
    return sql, [p for _, ps in used for p in ps]


def _diff(table: str, replayed: dict, stored: dict, volatile: frozenset[str], most: int = 50) -> list[str]:
    out = []
    differ = [k for k in replayed.keys() | stored.keys() if replayed.get(k) != stored.get(k)]  # whole rows, in C
    for key in sorted(differ, key=str):
        a, b = replayed.get(key), stored.get(key)
        if a is None:
            out.append(f"{table} {key}: stored but no event creates it")
        elif b is None:
            out.append(f"{table} {key}: events create it but it is not stored")
        else:
            cols = sorted(c for c in a.keys() | b.keys() if c not in volatile and a.get(c) != b.get(c))
            if cols:
                parts = ", ".join(f"{c}: replayed {a.get(c)!r} != stored {b.get(c)!r}" for c in cols)
                out.append(f"{table} {key}: {parts}")
        if len(out) >= most:
            out.append(f"{table}: more differences not shown")
            break
    return out


_SCAN = json.JSONDecoder().scan_once


def _ids(row_id: int | Sequence[int]) -> list[int]:
    return [int(row_id)] if isinstance(row_id, int) else [int(i) for i in row_id]


def _loads(text: str) -> Any:
    """``json.loads`` for the compact JSON the store writes, without its Python wrapper (``db check``
    decodes a million of these). Anything the bare scanner does not take whole goes to ``json.loads``."""
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, TypeError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def now() -> float:
    """The store's clock: seconds since the epoch."""
    return time.time()
