"""Schema migrations: ordered, named, recorded by sqlite-utils' ``Migrations``, never edited once released.

The migration functions are plain functions listed in ``MIGRATIONS``; ``migrations()`` wraps them in a
``sqlite_utils.migrations.Migrations`` set only when one is pending, so the common path (an up-to-date
database) never pays sqlite-utils' import cost. A fix to a released migration is a new migration.
"""

from __future__ import annotations

from collections.abc import Callable

MIGRATION_SET = "fleetctl"
MIGRATIONS_TABLE = "_sqlite_migrations"


def m001_initial(db) -> None:
    """Events, the task/agent/attempt projections and their indexes."""
    for statement in _M001:
        db.execute(statement)


_M001 = (
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        type TEXT NOT NULL,
        task_id TEXT,
        agent_id TEXT,
        attempt INTEGER,
        data TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX events_task ON events(task_id, id) WHERE task_id IS NOT NULL",
    "CREATE INDEX events_agent ON events(agent_id, id) WHERE agent_id IS NOT NULL",
    "CREATE INDEX events_type ON events(type, id)",
    "CREATE INDEX events_ts ON events(ts)",
    """CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        state TEXT NOT NULL CHECK (state IN ('queued', 'assigned', 'running', 'awaiting_review',
                                             'completed', 'failed', 'cancelled')),
        title TEXT NOT NULL,
        body TEXT NOT NULL DEFAULT '',
        labels TEXT NOT NULL DEFAULT '[]',
        requirements TEXT NOT NULL DEFAULT '[]',
        priority INTEGER NOT NULL DEFAULT 0,
        repo TEXT,
        issue_number INTEGER,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        timeout_secs REAL,
        agent_id TEXT,
        lease_expires_at REAL,
        not_before REAL,
        failure_reason TEXT,
        failure_detail TEXT,
        pull_request TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        attempt_started_at REAL
    )""",
    "CREATE INDEX tasks_claim ON tasks(priority DESC, seq) WHERE state = 'queued'",
    "CREATE INDEX tasks_state ON tasks(state, seq)",
    "CREATE INDEX tasks_active_agent ON tasks(agent_id) WHERE state IN ('assigned', 'running')",
    """CREATE UNIQUE INDEX tasks_one_active_per_issue ON tasks(repo, issue_number)
        WHERE repo IS NOT NULL AND issue_number IS NOT NULL
          AND state NOT IN ('completed', 'failed', 'cancelled')""",
    """CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        agent_type TEXT NOT NULL,
        capabilities TEXT NOT NULL DEFAULT '[]',
        max_concurrency INTEGER NOT NULL DEFAULT 1,
        mode TEXT NOT NULL CHECK (mode IN ('ssh_cli', 'http_pull')),
        host_id TEXT,
        status TEXT NOT NULL CHECK (status IN ('online', 'offline', 'draining')),
        token_hash TEXT,
        registered_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_heartbeat_at REAL,
        last_assigned_at REAL
    )""",
    """CREATE TABLE attempts (
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        attempt INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        host_id TEXT,
        workspace TEXT,
        token_hash TEXT,
        assigned_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        outcome TEXT,
        failure_reason TEXT,
        failure_detail TEXT,
        receipt TEXT,
        PRIMARY KEY (task_id, attempt)
    )""",
    "CREATE INDEX attempts_open ON attempts(host_id) WHERE ended_at IS NULL",
)


def m002_token_indexes(db) -> None:
    """Look agents and attempts up by the hash of the bearer token they present (HTTP pull mode)."""
    db.execute("CREATE INDEX agents_token ON agents(token_hash) WHERE token_hash IS NOT NULL")
    db.execute("CREATE INDEX attempts_token ON attempts(token_hash) WHERE token_hash IS NOT NULL")


def m003_forgejo(db) -> None:
    """Forgejo: received webhook deliveries, the outbox of side effects, a pending-receipt mark on attempts,
    and a small key/value table (the outbox cursor, the cached Forgejo account)."""
    for statement in _M003:
        db.execute(statement)


_M003 = (
    # One row per received delivery (a log, not a projection): what came in and what was decided; an accepted
    # one keeps its raw body, zlib-compressed (a third of the size: fewer pages for every commit to write).
    """CREATE TABLE deliveries (
        delivery_id TEXT PRIMARY KEY,
        received_at REAL NOT NULL,
        source TEXT NOT NULL,
        event TEXT NOT NULL DEFAULT '',
        event_type TEXT NOT NULL DEFAULT '',
        action TEXT NOT NULL DEFAULT '',
        repo TEXT,
        number INTEGER,
        sender TEXT,
        verdict TEXT NOT NULL CHECK (verdict IN ('accepted', 'ignored', 'rejected')),
        detail TEXT NOT NULL DEFAULT '',
        task_id TEXT,
        semantic_key TEXT,
        item_updated REAL,
        body_zlib BLOB
    )""",
    "CREATE INDEX deliveries_semantic ON deliveries(semantic_key) WHERE semantic_key IS NOT NULL",
    # the newest change applied to an issue or pull request (an older one arriving late is stale)
    """CREATE INDEX deliveries_item ON deliveries(repo COLLATE NOCASE, number, item_updated)
        WHERE verdict = 'accepted' AND item_updated IS NOT NULL""",
    # Side effects derived from the event log by a cursor (meta 'outbox_cursor'), performed by the passes.
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id INTEGER NOT NULL,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        repo TEXT,
        issue_number INTEGER,
        payload TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'superseded', 'dead')),
        tries INTEGER NOT NULL DEFAULT 0,
        next_try_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        done_at REAL,
        UNIQUE (event_id, target, kind)
    )""",
    "CREATE INDEX outbox_due ON outbox(next_try_at) WHERE state = 'pending'",
    "CREATE INDEX outbox_issue ON outbox(repo, issue_number, kind, id)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # 1 while the attempt's receipt waits for Forgejo to be reachable (its lease does not expire meanwhile)
    "ALTER TABLE attempts ADD COLUMN receipt_pending INTEGER",
    "CREATE INDEX attempts_receipt_pending ON attempts(task_id) WHERE receipt_pending IS NOT NULL",
    # an issue's tasks (the mapping asks for the active one and the last one on every delivery and sync)
    # Forgejo's owner/name are case-insensitive: an issue's tasks are found, and kept to one active, whatever the case
    "CREATE INDEX tasks_issue ON tasks(repo COLLATE NOCASE, issue_number, seq) WHERE repo IS NOT NULL",
    """CREATE UNIQUE INDEX tasks_one_active_per_issue_nocase ON tasks(repo COLLATE NOCASE, issue_number)
        WHERE repo IS NOT NULL AND issue_number IS NOT NULL
          AND state NOT IN ('completed', 'failed', 'cancelled')""",
    # ... which holds whatever the case, so m001's case-sensitive one is only a cost on every task write
    "DROP INDEX tasks_one_active_per_issue",
    # an upgraded database starts its outbox at its newest event: past events are not announced now
    "INSERT INTO meta (key, value) SELECT 'outbox_cursor', coalesce(max(id), 0) FROM events",
)


def m004_hosts(db) -> None:
    """SSH hosts: whether each is up or down (a projection of ``host.up`` / ``host.down`` events), and when
    an attempt's workspace was removed (``attempt.workspace_cleaned``)."""
    for statement in _M004:
        db.execute(statement)


_M004 = (
    """CREATE TABLE hosts (
        host_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('up', 'down')),
        since REAL NOT NULL,
        error TEXT,
        updated_at REAL NOT NULL
    )""",
    "ALTER TABLE attempts ADD COLUMN workspace_cleaned_at REAL",
    # the sweep's cleanup, oldest settled attempt first
    """CREATE INDEX attempts_to_clean ON attempts(ended_at)
        WHERE ended_at IS NOT NULL AND workspace IS NOT NULL AND workspace_cleaned_at IS NULL""",
)


def m005_outbox_batches(db) -> None:
    """Matrix notifications: which message (``batch``) an outbox row went out in. A burst is sent as a few
    messages of several rows; a batch is fixed before its first send, so a retry repeats the same message
    with the same transaction id (and the homeserver keeps one)."""
    for statement in _M005:
        db.execute(statement)


_M005 = (
    "ALTER TABLE outbox ADD COLUMN batch INTEGER",
    # each target's pending rows in order (Matrix sends its head of line; Forgejo its due rows)
    "CREATE INDEX outbox_pending ON outbox(target, id) WHERE state = 'pending'",
    "CREATE INDEX outbox_batch ON outbox(batch) WHERE batch IS NOT NULL",
)


def m006_reviews_limits_budgets(db) -> None:
    """Review rework, rate-limit cooldowns, budgets and per-repository limits: the projection columns their
    events set, and the indexes their claims and sums use."""
    for statement in _M006:
        db.execute(statement)


_M006 = (
    # the kind of the task's next attempt ('run' or 'rework': set by task.rework, copied to the attempt it claims)
    "ALTER TABLE tasks ADD COLUMN attempt_kind TEXT NOT NULL DEFAULT 'run'",
    "ALTER TABLE tasks ADD COLUMN review_rounds INTEGER NOT NULL DEFAULT 0",  # rework attempts so far
    "ALTER TABLE tasks ADD COLUMN max_review_rounds INTEGER",  # the label review-rounds:N (NULL: the config's)
    "ALTER TABLE tasks ADD COLUMN review TEXT",  # the review the rework attempts carry (JSON)
    "ALTER TABLE tasks ADD COLUMN review_pending TEXT",  # a rejection waiting for its inline comments (JSON)
    "ALTER TABLE tasks ADD COLUMN needs_human INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN blocked_by TEXT",  # why a queued task is not started ('budget')
    "ALTER TABLE tasks ADD COLUMN spent_usd REAL NOT NULL DEFAULT 0",  # cost since created or last retried
    "ALTER TABLE attempts ADD COLUMN kind TEXT",  # 'run' or 'rework'
    "UPDATE attempts SET kind = 'run'",  # every attempt before this was a plain run (as db check replays it)
    "ALTER TABLE attempts ADD COLUMN usage TEXT",  # the attempt's last reported totals (JSON)
    "ALTER TABLE attempts ADD COLUMN cost_usd REAL",
    "ALTER TABLE agents ADD COLUMN cooldown_until REAL",
    "ALTER TABLE agents ADD COLUMN cooldown_reason TEXT",
    # a repository's tasks holding a slot (assigned, running, awaiting review): the per-repository cap
    """CREATE INDEX tasks_repo_active ON tasks(repo COLLATE NOCASE)
        WHERE state IN ('assigned', 'running', 'awaiting_review')""",
    "CREATE INDEX tasks_review_pending ON tasks(seq) WHERE review_pending IS NOT NULL",
    # the day's spend (budgets) and the usage report
    "CREATE INDEX attempts_cost ON attempts(assigned_at) WHERE cost_usd IS NOT NULL",
    # Comment commands (/fleet retry|cancel|rework) received by webhook: a log like deliveries (they change
    # tasks only through the task services' events), acted on by the next pass once the commenter's permission
    # on the repository is known. One row per comment (comment_key "owner/name#comment-id", lower-cased): a
    # re-delivered or replayed webhook records nothing new.
    """CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        comment_key TEXT NOT NULL UNIQUE,
        received_at REAL NOT NULL,
        repo TEXT NOT NULL,
        number INTEGER NOT NULL,
        is_pull INTEGER NOT NULL DEFAULT 0,
        comment_id INTEGER,
        sender TEXT NOT NULL,
        command TEXT NOT NULL,
        body TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'refused', 'failed')),
        detail TEXT NOT NULL DEFAULT '',
        task_id TEXT,
        tries INTEGER NOT NULL DEFAULT 0,
        done_at REAL
    )""",
    "CREATE INDEX commands_pending ON commands(id) WHERE state = 'pending'",
)


#: Every migration, in order. Append only.
MIGRATIONS: tuple[Callable, ...] = (m001_initial, m002_token_indexes, m003_forgejo, m004_hosts, m005_outbox_batches,
                                    m006_reviews_limits_budgets)  # fmt: skip
MIGRATION_NAMES: tuple[str, ...] = tuple(f.__name__ for f in MIGRATIONS)


def migrations():
    """The sqlite-utils ``Migrations`` set for ``MIGRATIONS`` (imports sqlite-utils)."""
    from sqlite_utils.migrations import Migrations

    mset = Migrations(MIGRATION_SET)
    for fn in MIGRATIONS:
        mset()(fn)
    return mset
