"""The SQLite store (SPEC §3, §12) against real database files: schema and migrations, refusing files it
must not touch, permissions, backup, a locked database, claims, and ``db check`` proving it can fail."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from fleetctl import services
from fleetctl import store as store_mod
from fleetctl.errors import StoreBusy, StoreError
from fleetctl.projections import AGENT_COLUMNS, ATTEMPT_COLUMNS, TASK_COLUMNS
from fleetctl.schema import MIGRATION_NAMES, MIGRATION_SET, MIGRATIONS_TABLE, migrations
from fleetctl.states import AgentStatus
from fleetctl.store import Store

# Written out from the schema rather than read from it: a migration that changes a table shows up here.
EXPECTED_COLUMNS = {
    "events": ["id", "ts", "type", "task_id", "agent_id", "attempt", "data"],
    "tasks": [
        "task_id", "seq", "state", "title", "body", "labels", "requirements", "priority", "repo", "issue_number",
        "attempt", "max_attempts", "timeout_secs", "agent_id", "lease_expires_at", "not_before", "failure_reason",
        "failure_detail", "pull_request", "created_at", "updated_at", "attempt_started_at", "attempt_kind",
        "review_rounds", "max_review_rounds", "review", "review_pending", "needs_human", "blocked_by", "spent_usd",
    ],
    "agents": [
        "agent_id", "agent_type", "capabilities", "max_concurrency", "mode", "host_id", "status", "token_hash",
        "registered_at", "updated_at", "last_heartbeat_at", "last_assigned_at", "cooldown_until", "cooldown_reason",
    ],
    "attempts": [
        "task_id", "attempt", "agent_id", "host_id", "workspace", "token_hash", "assigned_at", "started_at",
        "ended_at", "outcome", "failure_reason", "failure_detail", "receipt", "receipt_pending",
        "workspace_cleaned_at", "kind", "usage", "cost_usd",
    ],
    "hosts": ["host_id", "status", "since", "error", "updated_at"],
}  # fmt: skip


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def schema(path: Path) -> list[tuple[str, str, str, str]]:
    """Every schema object with its SQL, whitespace-normalised, in a stable order."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        conn.close()
    return [(t, n, tb, " ".join((sql or "").split())) for t, n, tb, sql in rows]


def fill(store: Store, orch, n: int = 3) -> list[str]:
    """Tasks in several states and an agent, through the services: a little of everything for the check."""
    services.register_agent(store, "a1", agent_type="codex-cli", capabilities=["py"], max_concurrency=5, now=10.0)
    ids = [services.create_task(store, orch, title=f"task {i}", labels=["agent:py"], task_id=f"t{i}",
                                now=20.0 + i)["task_id"] for i in range(n)]  # fmt: skip
    for i in range(min(n, 2)):
        store.claim(agent_id="a1", capabilities=["py"], max_concurrency=5, lease_secs=60, ts=30.0 + i)
    services.start_task(store, "t0", agent_id="a1", attempt=1, now=40.0)
    return ids


# ---------------------------------------------------------------------------------------------- schema


def test_fresh_database_has_exactly_the_expected_schema(store):
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables - {"sqlite_sequence"} == {
        "events",
        "tasks",
        "agents",
        "attempts",
        "deliveries",
        "outbox",
        "meta",
        "hosts",
        "commands",
        MIGRATIONS_TABLE,
    }
    for table, expected in EXPECTED_COLUMNS.items():
        assert columns(store.conn, table) == expected, table
    # the reducer knows every stored column, so db check compares all of them
    assert (TASK_COLUMNS, AGENT_COLUMNS, ATTEMPT_COLUMNS) == tuple(
        tuple(EXPECTED_COLUMNS[t]) for t in ("tasks", "agents", "attempts")
    )
    claim_index = store.conn.execute("SELECT sql FROM sqlite_master WHERE name='tasks_claim'").fetchone()[0]
    assert "WHERE state = 'queued'" in claim_index  # SPEC §3: claims run on a partial index of queued tasks
    assert store.applied_migrations() == list(MIGRATION_NAMES)
    assert store.pending_migrations() == []
    assert store.check().ok


def test_connection_pragmas(store):
    pragma = lambda name: store.conn.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    assert pragma("journal_mode") == "wal"
    assert pragma("synchronous") == 1  # NORMAL
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") == store_mod.BUSY_TIMEOUT_MS == 5000


def seed_m001(conn: sqlite3.Connection) -> None:
    """A task and an agent written in the shape of m001 (which is never edited), events and projections."""
    created = {"title": "from m001", "body": "", "labels": ["agent:py"], "requirements": ["py"], "priority": 2,
               "repo": None, "issue_number": None, "max_attempts": 3, "timeout_secs": None}  # fmt: skip
    ev = conn.execute("INSERT INTO events (ts, type, task_id, data) VALUES (5.0, 'task.created', 'old-1', ?)",
                      (json.dumps(created),)).lastrowid  # fmt: skip
    conn.execute(
        "INSERT INTO tasks (task_id, seq, state, title, body, labels, requirements, priority, attempt, max_attempts, "
        "created_at, updated_at) VALUES ('old-1', ?, 'queued', 'from m001', '', '[\"agent:py\"]', '[\"py\"]', 2, 0, 3, "
        "5.0, 5.0)",
        (ev,),
    )
    agent = {"agent_type": "codex-cli", "capabilities": ["py"], "max_concurrency": 2, "mode": "http_pull",
             "host_id": None, "status": "online"}  # fmt: skip
    conn.execute("INSERT INTO events (ts, type, agent_id, data) VALUES (6.0, 'agent.registered', 'old-a', ?)",
                 (json.dumps(agent),))  # fmt: skip
    conn.execute(
        "INSERT INTO agents (agent_id, agent_type, capabilities, max_concurrency, mode, status, registered_at, "
        "updated_at, last_assigned_at) VALUES ('old-a', 'codex-cli', '[\"py\"]', 2, 'http_pull', 'online', 6.0, 6.0, 7.0)"
    )
    # a second task, claimed by the agent: an attempt as m001 wrote it
    ev = conn.execute("INSERT INTO events (ts, type, task_id, data) VALUES (6.5, 'task.created', 'old-2', ?)",
                      (json.dumps({**created, "title": "claimed"}),)).lastrowid  # fmt: skip
    conn.execute("INSERT INTO events (ts, type, task_id, agent_id, attempt, data) VALUES (7.0, 'task.assigned', "
                 "'old-2', 'old-a', 1, '{\"lease_expires_at\": 67.0}')")  # fmt: skip
    conn.execute(
        "INSERT INTO tasks (task_id, seq, state, title, body, labels, requirements, priority, attempt, max_attempts, "
        "agent_id, lease_expires_at, created_at, updated_at, attempt_started_at) VALUES ('old-2', ?, 'assigned', "
        "'claimed', '', '[\"agent:py\"]', '[\"py\"]', 2, 1, 3, 'old-a', 67.0, 6.5, 7.0, 7.0)",
        (ev,),
    )
    conn.execute("INSERT INTO attempts (task_id, attempt, agent_id, assigned_at) VALUES ('old-2', 1, 'old-a', 7.0)")
    conn.commit()


@pytest.mark.parametrize("k", range(1, len(MIGRATION_NAMES) + 1), ids=lambda k: f"from-{MIGRATION_NAMES[k - 1]}")
def test_upgraded_schema_equals_fresh(tmp_path, k):
    """A database made by an older fleetctl (migrations 1..k, with data) upgrades to exactly the fresh schema.

    With one migration this runs once and still proves data written at m001 survives and replays; every
    migration added later adds a case that starts just before it.
    """
    import sqlite_utils

    Store.open(tmp_path / "fresh.db").close()
    old = tmp_path / "old.db"
    db = sqlite_utils.Database(old)
    mset = migrations()
    mset.apply(db, stop_before=list(MIGRATION_NAMES[1:]))  # m001 only
    seed_m001(db.conn)
    mset.apply(db, stop_before=list(MIGRATION_NAMES[k:]) or None)  # … up to the k-th
    db.close()

    with Store.open(old, migrate=False) as s:
        assert s.applied_migrations() == list(MIGRATION_NAMES[:k])
        assert s.pending_migrations() == list(MIGRATION_NAMES[k:])
    with Store.open(old) as s:
        assert s.applied_migrations() == list(MIGRATION_NAMES)
        report = s.check()
        assert report.ok, report.problems
        assert (report.tasks, report.agents, report.attempts) == (2, 1, 1)
        assert s.attempt("old-2", 1)["kind"] == "run"
        assert s.task("old-1")["requirements"] == ["py"]
        if k < MIGRATION_NAMES.index("m003_forgejo") + 1:  # upgraded across m003: past events are not announced
            assert s.outbox_cursor() == s.max_event_id() == 4
    assert schema(old) == schema(tmp_path / "fresh.db")


def test_reopening_applies_nothing_twice(store, orch):
    fill(store, orch)
    before = schema(store.path)
    with Store.open(store.path) as again:
        assert again.migrate() == []
        assert again.applied_migrations() == list(MIGRATION_NAMES)
    assert schema(store.path) == before


def test_newer_schema_is_refused(store):
    store.execute(
        f"INSERT INTO {MIGRATIONS_TABLE} (migration_set, name, applied_at) VALUES (?, 'm999_from_the_future', 'x')",
        (MIGRATION_SET,),
    )
    store.close()
    before = schema(store.path)
    with pytest.raises(StoreError) as err:
        Store.open(store.path)
    assert err.value.code == "schema_too_new"
    assert "newer schema" in err.value.message and "m999_from_the_future" in err.value.message
    assert "upgrade fleetctl" in err.value.message
    assert schema(store.path) == before


def test_another_migration_set_in_the_same_file_is_not_ours(tmp_path):
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    other = Migrations("some-other-app")
    other()(lambda db: db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
    path = tmp_path / "other.db"
    db = sqlite_utils.Database(path)
    other.apply(db)
    db.close()
    with pytest.raises(StoreError) as err:
        Store.open(path)
    assert err.value.code == "store_foreign"


# ---------------------------------------------------------------------------------------------- files it must refuse


def _real_db_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "model.db"
    Store.open(path).close()
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["text", "truncated", "garbled"])
def test_corrupt_file_is_refused_and_left_alone(tmp_path, kind):
    good = _real_db_bytes(tmp_path)
    content = {
        "text": b"this is a config file, not a database\n" * 200,
        "truncated": good[:60],  # the SQLite header, cut short
        "garbled": good[:100] + bytes((b * 7 + 3) % 256 for b in good[100:]),  # header kept, pages garbage
    }[kind]
    path = tmp_path / "fleet.db"
    path.write_bytes(content)
    with pytest.raises(StoreError) as err:
        Store.open(path)
    exc = err.value
    assert exc.code == "store_corrupt"
    assert str(path) in exc.message and "corrupt or not a SQLite database" in exc.message
    assert exc.__cause__ is None and exc.__suppress_context__  # raised "from None": no chained traceback
    assert path.read_bytes() == content  # never repaired, replaced or recreated


def test_foreign_sqlite_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "photos.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    conn.commit()
    conn.close()
    before = schema(path)
    with pytest.raises(StoreError) as err:
        Store.open(path)
    assert err.value.code == "store_foreign"
    assert "not a fleetctl one" in err.value.message
    assert schema(path) == before


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "too_new"])
def test_cli_reports_unusable_database_in_one_line(tmp_path, store, kind, monkeypatch):
    from typer.testing import CliRunner

    from fleetctl.cli import app

    store.close()
    if kind == "corrupt":
        store.path.write_bytes(b"garbage" * 1000)
    elif kind == "foreign":
        store.path.unlink()
        sqlite3.connect(store.path).execute("CREATE TABLE x (a)").connection.close()
    else:
        conn = sqlite3.connect(store.path)
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (migration_set, name) VALUES (?, 'm999_later')", (MIGRATION_SET,))
        conn.commit()
        conn.close()
    monkeypatch.setenv("FLEET_DB_PATH", str(store.path))
    result = CliRunner().invoke(app, ["db", "check"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and str(store.path) in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_missing_database_with_create_false_and_directory_path(tmp_path):
    with pytest.raises(StoreError, match="no database at"):
        Store.open(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()
    (tmp_path / "adir").mkdir()
    with pytest.raises(StoreError) as err:
        Store.open(tmp_path / "adir")
    assert err.value.code == "store_open"


# ---------------------------------------------------------------------------------------------- read-only


def _make_read_only(path: Path) -> str | None:
    """Make ``path`` really read-only for this process; how it was done, or None if impossible here.

    chmod 0400 stops ordinary users. root (as in CI) ignores permissions, so there the file is made
    immutable with ``chattr +i`` instead, which needs CAP_LINUX_IMMUTABLE and a filesystem that has it.
    """
    if os.geteuid() != 0:
        path.chmod(0o400)
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return "chattr"
    return None


def test_read_only_database_file(tmp_path, orch):
    path = tmp_path / "ro" / "fleet.db"
    with Store.open(path) as s:
        fill(s, orch)
        events = s.check().events
    how = _make_read_only(path)
    if how is None:
        pytest.skip("running as root without CAP_LINUX_IMMUTABLE (or on a filesystem without it): root ignores "
                    "file permissions, so a read-only database file cannot be made; see the mode=ro test")  # fmt: skip
    try:
        with Store.open(path) as s:
            assert s.check().ok  # reading works
            with pytest.raises(StoreError) as err:
                services.create_task(s, orch, title="cannot be written")
            assert err.value.code == "store_readonly" and "read-only" in err.value.message
            assert s.check().events == events
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o600)


def test_read_only_connection_writes_nothing(store, orch):
    """Runs everywhere (root included): the store over a ``mode=ro`` connection, as SQLite sees a read-only file."""
    fill(store, orch)
    before = store.check()
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    ro = Store(conn, store.path)
    try:
        for write in (
            lambda: services.create_task(ro, orch, title="x"),
            lambda: ro.claim(agent_id="a1", capabilities=["py"], max_concurrency=5, lease_secs=60, ts=50.0),
            lambda: services.cancel_task(ro, "t2", now=50.0),
            lambda: services.register_agent(ro, "a2", agent_type="x", now=50.0),
        ):
            with pytest.raises(StoreError) as err:
                write()
            assert err.value.code == "store_readonly"
            assert not conn.in_transaction
    finally:
        ro.close()
    after = store.check()
    assert after.ok and (after.events, after.tasks) == (before.events, before.tasks)


# ---------------------------------------------------------------------------------------------- permissions


def test_file_and_directory_are_owner_only(tmp_path, orch):
    path = tmp_path / "new" / "dir" / "fleet.db"
    old_umask = os.umask(0)  # the most permissive umask: modes must come from the code, not the umask
    try:
        with Store.open(path) as s:
            fill(s, orch)
            assert Path(f"{path}-wal").exists()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert modes == {"fleet.db": 0o600, "fleet.db-wal": 0o600, "fleet.db-shm": 0o600}


# ---------------------------------------------------------------------------------------------- backup


def test_backup_is_a_checked_copy_and_never_overwrites(tmp_path, store, orch):
    ids = fill(store, orch)
    # a write in flight in another connection is not in the backup: only committed state is copied
    other = Store.open(store.path)
    other.conn.execute("BEGIN IMMEDIATE")
    services.create_task(other, orch, title="uncommitted", task_id="ghost")
    dest = store.backup(tmp_path / "backups" / "b1.db")
    other.conn.execute("ROLLBACK")
    other.close()

    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with Store.open(dest, create=False) as b:
        report = b.check()
        assert report.ok, report.problems
        assert [t["task_id"] for t in b.tasks()] == ids
        assert b.events() == store.events()

    content = dest.read_bytes()
    with pytest.raises(StoreError) as err:
        store.backup(dest)
    assert err.value.code == "backup_exists" and str(dest) in err.value.message
    assert dest.read_bytes() == content


# ---------------------------------------------------------------------------------------------- locked database


@pytest.fixture
def short_busy(monkeypatch):
    """A 300 ms busy_timeout instead of 5 s, so that waiting it out keeps the test quick."""
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_MS", 300)


def _locker(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")  # holds the write lock until ROLLBACK
    return conn


def test_write_while_locked_raises_store_busy_and_writes_nothing(short_busy, tmp_path, orch):
    s = Store.open(tmp_path / "busy.db")
    fill(s, orch)
    before = s.check()
    lock = _locker(s.path)
    try:
        for write in (
            lambda: services.create_task(s, orch, title="x", task_id="new"),
            lambda: s.claim(agent_id="a1", capabilities=["py"], max_concurrency=5, lease_secs=60, ts=50.0),
            lambda: services.cancel_task(s, "t2", now=50.0),
            lambda: services.heartbeat(s, orch, "a1", now=50.0),
        ):
            with pytest.raises(StoreBusy) as err:
                write()
            assert err.value.code == "store_busy" and "nothing was written" in err.value.message
            assert not s.conn.in_transaction
        assert s.task("t2")["state"] == "queued"  # reads still work while a writer holds the lock (WAL)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    after = s.check()
    assert after.ok and (after.events, after.tasks) == (before.events, before.tasks)
    assert s.task("new") is None
    services.create_task(s, orch, title="x", task_id="new")  # and once the lock is gone, it works
    s.close()


def test_write_waits_for_a_lock_released_within_busy_timeout(store, orch):
    lock = _locker(store.path)
    release = threading.Timer(0.2, lambda: (lock.execute("ROLLBACK"), lock.close()))
    release.start()
    try:
        task = services.create_task(store, orch, title="patient")  # waits (busy_timeout 5 s), then succeeds
    finally:
        release.join()
    assert store.task(task["task_id"])["state"] == "queued"


# ---------------------------------------------------------------------------------------------- claims


def test_claim_order_eligibility_and_capacity(store, orch):
    services.register_agent(store, "a1", agent_type="x", capabilities=["py"], max_concurrency=2, now=1.0)
    services.create_task(store, orch, title="low", task_id="low", labels=["agent:py"], now=2.0)
    services.create_task(store, orch, title="rust", task_id="rust", labels=["agent:rust", "priority:9"], now=3.0)
    services.create_task(store, orch, title="high", task_id="high", labels=["priority:5"], now=4.0)
    services.create_task(store, orch, title="high2", task_id="high2", labels=["priority:5"], now=5.0)
    claim = lambda ts, **kw: store.claim(agent_id="a1", capabilities=["py"], max_concurrency=2,  # noqa: E731
                                         lease_secs=60, ts=ts, **kw)  # fmt: skip
    first = claim(10.0)
    assert (first["task_id"], first["state"], first["attempt"], first["lease_expires_at"]) == ("high", "assigned", 1,
                                                                                                70.0)  # fmt: skip
    assert claim(11.0)["task_id"] == "high2"  # same priority: older first; "rust" is never eligible
    assert claim(12.0) is None  # at max_concurrency
    services.cancel_task(store, "high", now=13.0)
    assert claim(14.0)["task_id"] == "low"
    assert store.attempt("low", 1)["agent_id"] == "a1"
    assert store.agent("a1")["last_assigned_at"] == 14.0
    assert [e["type"] for e in store.events(task_id="low")] == ["task.created", "task.assigned"]
    assert store.check().ok


def test_claim_respects_backoff_status_and_named_task(store, orch):
    services.register_agent(store, "a1", agent_type="x", max_concurrency=5, now=1.0)
    services.create_task(store, orch, title="t", task_id="t1", now=2.0)
    claim = lambda ts, **kw: store.claim(agent_id="a1", capabilities=[], max_concurrency=5,  # noqa: E731
                                         lease_secs=60, ts=ts, **kw)  # fmt: skip
    assert claim(3.0)["task_id"] == "t1"
    requeued = services.fail_attempt(store, orch, "t1", "agent_error", now=4.0)
    assert requeued["state"] == "queued" and requeued["not_before"] > 4.0
    assert claim(requeued["not_before"] - 0.001) is None  # still backing off
    assert claim(requeued["not_before"], task_id="nope") is None
    services.set_agent_status(store, orch, "a1", AgentStatus.DRAINING, "operator", now=5.0)
    assert claim(requeued["not_before"]) is None  # draining agents take nothing new
    services.register_agent(store, "a1", agent_type="x", max_concurrency=5, now=6.0)
    got = claim(requeued["not_before"], task_id="t1")
    assert (got["task_id"], got["attempt"]) == ("t1", 2)
    assert claim(999.0) is None  # nothing left
    assert store.check().ok


def test_claim_by_an_unknown_agent_claims_nothing(store, orch):
    services.create_task(store, orch, title="t", task_id="t1")
    assert store.claim(agent_id="ghost", capabilities=[], max_concurrency=1, lease_secs=60, ts=1e10) is None
    assert store.task("t1")["state"] == "queued"


# ---------------------------------------------------------------------------------------------- db check


def test_check_counts_a_clean_database(store, orch):
    fill(store, orch)
    report = store.check()
    assert report.ok and report.integrity == ["ok"] and report.problems == []
    assert (report.tasks, report.agents, report.attempts) == (3, 1, 2)
    assert report.events == len(store.events())


TAMPERING = {
    "projection edited": ("UPDATE tasks SET priority = 99 WHERE task_id = 't2'", "tasks t2: priority: replayed 0"),
    "state forged": ("UPDATE tasks SET state = 'completed' WHERE task_id = 't1'", "tasks t1: state"),
    "event deleted": ("DELETE FROM events WHERE type = 'task.started'", "tasks t0: state: replayed 'assigned'"),
    "creation deleted": ("DELETE FROM events WHERE task_id = 't2' AND type = 'task.created'",
                         "tasks t2: stored but no event creates it"),
    "event rewritten": ("UPDATE events SET data = json_set(data, '$.title', 'evil') WHERE task_id = 't1'",
                        "tasks t1: title: replayed 'evil' != stored 'task 1'"),
    "row without event": ("INSERT INTO agents (agent_id, agent_type, mode, status, registered_at, updated_at) "
                          "VALUES ('sneaky', 'x', 'http_pull', 'online', 1, 1)", "agents sneaky: stored but no event"),
    "attempt dropped": ("DELETE FROM attempts WHERE task_id = 't1'", "attempts ('t1', 1): events create it but"),
    "capability granted": ("UPDATE agents SET capabilities = '[\"py\",\"root\"]'", "agents a1: capabilities"),
}  # fmt: skip


@pytest.mark.parametrize("sql, expected", TAMPERING.values(), ids=TAMPERING.keys())
def test_check_detects_tampering(store, orch, sql, expected):
    fill(store, orch)
    store.execute(sql)
    report = store.check()
    assert not report.ok
    assert report.integrity == ["ok"]
    assert any(p.startswith(expected) for p in report.problems), report.problems


def test_check_ignores_only_the_volatile_columns(store, orch):
    fill(store, orch)
    store.execute("UPDATE tasks SET lease_expires_at = 1e12")  # heartbeats extend leases: not events
    store.execute("UPDATE agents SET last_heartbeat_at = 1e12")
    assert store.check().ok
    store.execute("UPDATE tasks SET updated_at = 1e12 WHERE task_id = 't0'")
    assert not store.check().ok


def test_check_runs_integrity_check(store, orch):
    """An index whose definition no longer matches its entries: replay agrees, integrity_check does not."""
    fill(store, orch)
    store.close()
    conn = sqlite3.connect(store.path)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'tasks(state, seq)', 'tasks(seq, state)') "
                 "WHERE name = 'tasks_state'")  # fmt: skip
    conn.commit()
    conn.close()
    with Store.open(store.path) as s:
        report = s.check()
    assert not report.ok and report.problems == []
    assert report.integrity != ["ok"] and any("tasks_state" in line for line in report.integrity)


CLAIM_PLAN_SCRIPT = """
import sys
from fleetctl import store as S
st = S.Store.open(sys.argv[1])
plan = st.conn.execute("EXPLAIN QUERY PLAN " + S._claim_sql(False, True, True), {"agent": "a", "caps": "[]",
    "now": 1.0, "lease": 2.0, "max": 5, "tid": None, "ath": None, "acaps": None, "repo_cap": 2, "repo_caps": "{}",
    "task_budget": None, "task_budgets": "{}", "blocked_repos": "[]"}).fetchall()
print(" | ".join(r[3] for r in plan))
"""


@pytest.mark.parametrize("seed", ["0", "1", "2", "3"])
def test_the_claim_uses_its_partial_indexes_whatever_the_hash_seed(tmp_path, seed):
    """SQLite uses a partial index only when the query's IN list matches the index's term for term: state
    names once came from a set, so under some PYTHONHASHSEEDs the per-agent count scanned (claims 4x slower)."""
    import subprocess
    import sys

    db = tmp_path / "f.db"
    Store.open(db).close()
    out = subprocess.run([sys.executable, "-c", CLAIM_PLAN_SCRIPT, str(db)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tasks_active_agent" in out.stdout and "tasks_claim" in out.stdout, out.stdout
    assert "tasks_repo_active" in out.stdout, out.stdout  # the per-repository cap counts on its own index


def test_the_claim_of_a_run_looks_its_tasks_up_by_id_not_by_state(store):
    """The one statement of a run of claims (``_CLAIM_RUN_SQL``) must go from the few tasks it picked to their
    rows: with ``tasks.state = 'queued'`` indexable there, SQLite walked every queued task instead (claims
    4x slower at 60,000 queued)."""
    from fleetctl import store as S

    plan = store.conn.execute("EXPLAIN QUERY PLAN " + S._CLAIM_RUN_SQL,
                              {"requests": "[]", "caps": "[]", "now": 1.0, "lease": 2.0}).fetchall()  # fmt: skip
    top = [r[3] for r in plan if r[1] == 0]
    details = " | ".join(r[3] for r in plan)
    assert "SCAN pick" in top and any(d.startswith("SEARCH tasks USING INDEX sqlite_autoindex_tasks_1") for d in top), (
        details
    )
    assert "SCAN tasks USING INDEX tasks_claim" in details and "tasks_active_agent" in details, details
    assert not any(d.startswith("SCAN tasks") or "tasks_state" in d for d in top), details
