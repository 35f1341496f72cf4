"""Matrix notifications end to end (SPEC §9; fleetctl/matrix/): real tasks in a real store, sent through the
outbox to a real Synapse (tests/synapse_server.py), and read back from the room through the client-server API.

Every scenario ends with ``store.check()``: whatever the homeserver did, the tasks and the event log are
untouched by it.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import replace
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from conftest import config_of

from fleetctl import services
from fleetctl.config import MatrixConfig
from fleetctl.matrix.messages import message_for
from fleetctl.outbox import flush
from fleetctl.services.tasks import transition
from fleetctl.states import AgentStatus, Transition

REPO = "acme/widgets"


@pytest.fixture(autouse=True)
def _db_stays_consistent(store):
    yield
    report = store.check()
    assert report.ok, report.problems


def make_room(synapse, *, join=True):
    """A room made by a person, with a bot user invited to it (and joined unless ``join`` is False)."""
    tag = uuid.uuid4().hex[:8]
    human_id, human = synapse.register(f"human{tag}")
    bot_id, bot = synapse.register(f"bot{tag}")
    room = synapse.create_room(human, invite=[bot_id])
    if join:
        synapse.join(bot, room)
    return SimpleNamespace(id=room, bot=bot, bot_id=bot_id, human=human, synapse=synapse)


def matrix_cfg(orch, room, **matrix):
    """A whole config: no Forgejo, Matrix at ``room``'s homeserver and room, as its bot."""
    cfg = config_of(orch)
    settings = {"homeserver": room.synapse.url, "access_token": room.bot, "room_id": room.id, **matrix}
    return replace(cfg, matrix=MatrixConfig(**settings))


def said(room) -> list[dict]:
    """The contents of the room's text messages sent by the bot, oldest first (read by the person)."""
    return [e["content"] for e in room.synapse.messages(room.human, room.id) if e["sender"] == room.bot_id]


def lines(room) -> list[str]:
    return [line for content in said(room) for line in content["body"].split("\n")]


def task_of(line: str) -> str:
    """The task id a message line is about."""
    return re.search(r"Task (t-[0-9a-f]+)", line).group(1)


def later(secs):
    return lambda: time.time() + secs


def agent(store, cfg, agent_id="a1"):
    return services.register_agent(store, agent_id, agent_type="codex-cli", capabilities=[],
                                   max_concurrency=10).agent  # fmt: skip


def task_through(store, cfg, who, title, *, end):
    """A task claimed by ``who`` and then ended: ``"completed"`` (a receipt), ``"failed"`` (no retries left)."""
    t = services.create_task(store, cfg.orchestrator, title=title, labels=["retries:0"])
    assert services.claim_task(store, cfg, who, task_id=t["task_id"]) is not None
    if end == "completed":
        services.complete_task(store, cfg, t["task_id"], {"outcome": "success", "summary": f"did {title}"},
                               agent_id=who["agent_id"], attempt=1)  # fmt: skip
    else:
        services.fail_attempt(store, cfg.orchestrator, t["task_id"], "agent_error", "exit 3: the tests failed",
                              agent_id=who["agent_id"], attempt=1)  # fmt: skip
    return t["task_id"]


def expected(store, cfg, event_type, task_id=None):
    """What fleetctl should have said of the (last) ``event_type`` event: (body, html)."""
    (event,) = store.events(task_id=task_id, types=[event_type])[-1:]
    task = store.task(task_id) if task_id else None
    return message_for(event, task, forgejo_url=cfg.forgejo.url, template=cfg.matrix.template)


# ---------------------------------------------------------------------------------------------- what it says


def test_failures_reviews_completions_and_agents_going_offline_appear_with_text_and_html(store, orch, synapse):
    room = make_room(synapse)
    cfg = matrix_cfg(orch, room)
    a1 = agent(store, cfg)
    flush(store, cfg)  # task.created / agent events so far: none of the default kinds

    failed = task_through(store, cfg, a1, "Fix <the> parser", end="failed")
    flush(store, cfg)
    done = task_through(store, cfg, a1, "Write the changelog", end="completed")
    flush(store, cfg)
    review = services.create_task(store, orch, title="Refactor the lexer")["task_id"]
    assert services.claim_task(store, cfg, a1, task_id=review) is not None
    with store.write():  # a receipt that named a pull request (the Forgejo path's job): running -> awaiting_review
        transition(store, store.task(review), Transition.AWAITING_REVIEW, time.time(),
                   data={"pull_request": {"repo": REPO, "number": 34, "html_url": "https://forge.example.org/acme/widgets/pulls/34"}})  # fmt: skip
    flush(store, cfg)
    services.set_agent_status(store, orch, "a1", AgentStatus.OFFLINE, "no heartbeat for 200s")
    report = flush(store, cfg)
    assert report.retried == report.dead == 0

    contents = said(room)
    want = [expected(store, cfg, "task.failed", failed), expected(store, cfg, "task.completed", done),
            expected(store, cfg, "task.awaiting_review", review), expected(store, cfg, "agent.offline")]  # fmt: skip
    assert [(c["body"], c["formatted_body"]) for c in contents] == want
    assert all(c["msgtype"] == "m.text" and c["format"] == "org.matrix.custom.html" for c in contents)
    assert contents[0]["body"].startswith(f"❌ Task {failed} failed (attempt 1) (agent_error: exit 3: the tests")
    assert "Fix &lt;the&gt; parser" in contents[0]["formatted_body"]  # escaped in the HTML
    assert contents[1]["body"].startswith(f"✅ Task {done} completed — did Write the changelog")
    assert (
        '<a href="https://forge.example.org/acme/widgets/pulls/34">pull request #34</a>'
        in contents[2]["formatted_body"]
    )
    assert contents[3]["body"] == "⚠️ Agent a1 went offline (no heartbeat for 200s)"
    # kinds not configured (task.created, task.assigned, agent.online) were never said
    assert not [line for line in lines(room) if "was created" in line or "was given" in line or "is online" in line]
    assert store.task(failed)["state"] == "failed" and store.task(done)["state"] == "completed"


def test_only_the_configured_kinds_and_a_template(store, orch, synapse):
    room = make_room(synapse)
    cfg = matrix_cfg(orch, room, events=("task.created", "task.failed"),
                     template="[{kind}] {task_id}: {title} <{reason}>")  # fmt: skip
    a1 = agent(store, cfg)
    ok = task_through(store, cfg, a1, "one", end="completed")
    bad = task_through(store, cfg, a1, "two", end="failed")
    flush(store, cfg)
    (content,) = said(room)  # one flush: one message, a line per notification
    assert content["body"].split("\n") == [f"[task.created] {ok}: one <>", f"[task.created] {bad}: two <>",
                                           f"[task.failed] {bad}: two <agent_error>"]  # fmt: skip
    assert content["formatted_body"].split("<br>\n")[2] == f"[task.failed] {bad}: two &lt;agent_error&gt;"


# ---------------------------------------------------------------------------------------------- never twice


class Killed(BaseException):
    """What a SIGKILL leaves: nothing after this point ran (not an Exception: no handler catches it)."""


def test_a_flush_killed_after_the_send_and_before_its_record_leaves_one_message(store, orch, synapse, monkeypatch):
    room = make_room(synapse)
    cfg = matrix_cfg(orch, room)
    a1 = agent(store, cfg)
    tasks = [task_through(store, cfg, a1, f"t{i}", end="completed") for i in range(3)]
    real = type(store).finish_outbox_row

    def die_once(self, *args, **kwargs):
        monkeypatch.setattr(type(store), "finish_outbox_row", real)
        raise Killed

    monkeypatch.setattr(type(store), "finish_outbox_row", die_once)
    with pytest.raises(Killed):
        flush(store, cfg)
    assert len(said(room)) == 1  # it was sent ...
    assert store.count_outbox().get("pending") == 3  # ... and not recorded
    report = flush(store, cfg)  # the next pass sends the same batch with the same transaction id
    assert report.sent == 3 and store.count_outbox().get("pending", 0) == 0
    (content,) = said(room)
    assert [task_of(line) for line in content["body"].split("\n")] == tasks
    assert flush(store, cfg).sent == 0


# ---------------------------------------------------------------------------------------------- rate limits


def test_a_burst_of_50_under_default_rate_limits_all_arrives_in_order(store, orch, synapse_strict, capsys):
    room = make_room(synapse_strict)
    cfg = matrix_cfg(orch, room, events=("task.created", "task.completed"))
    from fleetctl.matrix.client import MatrixClient, MatrixError

    with MatrixClient(synapse_strict.url, room.bot) as bot:  # use up the bot's burst (10): the flush meets 429s
        for i in range(12):
            try:
                bot.send_message(room.id, f"warm-up-{i}", f"warm-up {i}")
            except MatrixError as exc:
                assert exc.status == 429
    a1 = agent(store, cfg)
    tasks = [task_through(store, cfg, a1, f"burst {i}", end="completed") for i in range(25)]  # 50 notifications
    report = flush(store, cfg)
    assert report.enqueued == 50
    deadline = time.monotonic() + 120
    while store.count_outbox().get("pending", 0) and time.monotonic() < deadline:
        report = flush(store, cfg, now=later(3600))  # a batch put back for its Retry-After is due again at once
        assert report.dead == 0
    assert store.count_outbox().get("pending", 0) == 0, "not all sent within 120 s"
    got = [line for line in lines(room) if not line.startswith("warm-up")]
    assert len(got) == 50
    ids = [task_of(line) for line in got]
    for t in tasks:  # each task's created before its completed, and the whole burst in event order
        first, last = ids.index(t), len(ids) - 1 - ids[::-1].index(t)
        assert "was created" in got[first] and "completed" in got[last] and first < last
    events = store.events(types=["task.created", "task.completed"], limit=1000)
    assert ids == [e["task_id"] for e in events]
    assert "action=matrix.rate_limited" in capsys.readouterr().err  # the 429s were met and honoured
    assert all(store.task(t)["state"] == "completed" for t in tasks)


# ---------------------------------------------------------------------------------------------- homeserver down


def test_with_synapse_stopped_notifications_wait_and_go_out_when_it_is_back(store, orch, make_synapse):
    server = make_synapse()
    room = make_room(server)
    cfg = matrix_cfg(orch, room, timeout_secs=2)
    a1 = agent(store, cfg)
    server.stop()
    first = task_through(store, cfg, a1, "while down", end="failed")
    report = flush(store, cfg)
    assert report.sent == 0 and report.retried == 1
    (row,) = store.outbox_rows(states=["pending"])
    assert row["last_error"].startswith(f"matrix: cannot reach the homeserver at {server.url}")
    second = task_through(store, cfg, a1, "still down", end="completed")
    assert flush(store, cfg, now=later(7200)).sent == 0  # still down: nothing lost, nothing reordered
    assert store.task(first)["state"] == "failed" and store.task(second)["state"] == "completed"

    server.start()
    report = flush(store, cfg, now=later(86400))
    assert report.sent == 2 and store.count_outbox().get("pending", 0) == 0
    assert [task_of(line) for line in lines(room)] == [first, second]


# ---------------------------------------------------------------------------------------------- bad setup


def notify_test(runner, tmp_path, room, token=None, room_id=None):
    from fleetctl.cli import app

    path = tmp_path / "matrix.toml"  # its database is the store fixture's (tmp_path/fleet.db)
    path.write_text(f'[orchestrator]\ndb_path = "fleet.db"\n[matrix]\nhomeserver = "{room.synapse.url}"\n'
                    f'access_token = "{token or room.bot}"\nroom_id = "{room_id or room.id}"\n')  # fmt: skip
    path.chmod(0o600)
    return runner.invoke(app, ["notify", "test", "--config", str(path)])


def test_notify_test_sends_one_message(runner, tmp_path, synapse):
    room = make_room(synapse)
    result = notify_test(runner, tmp_path, room)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: sent to {room.id} as {room.bot_id} (event $")
    (content,) = said(room)
    assert content["body"] == "fleetctl: test message — notifications reach this room."


def test_an_alias_is_resolved_once_and_notify_test_posts_where_the_notifications_go(runner, tmp_path, store, orch,
                                                                                       synapse):  # fmt: skip
    room = make_room(synapse)
    alias = f"#fleet-{uuid.uuid4().hex[:6]}:{synapse.server_name}"
    synapse.set_alias(room.human, alias, room.id)
    result = notify_test(runner, tmp_path, room, room_id=alias)
    assert result.exit_code == 0, result.output
    assert store.meta(f"matrix_room:{alias}") == room.id
    other = synapse.create_room(room.human, invite=[room.bot_id])  # the alias moves; fleetctl keeps its room
    synapse.join(room.bot, other)
    synapse.call("DELETE", f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}", room.human)
    synapse.set_alias(room.human, alias, other)
    cfg = matrix_cfg(orch, room, room_id=alias)
    task_through(store, cfg, agent(store, cfg), "after the move", end="failed")
    assert flush(store, cfg).sent == 1
    assert notify_test(runner, tmp_path, room, room_id=alias).exit_code == 0
    assert len(said(room)) == 3 and synapse.messages(room.human, other) == []


def test_a_bad_token_is_reported_by_notify_test_and_on_the_outbox_rows(runner, tmp_path, store, orch, synapse):
    room = make_room(synapse)
    result = notify_test(runner, tmp_path, room, token="syt_not_a_token")
    assert result.exit_code == 5
    (line,) = result.stderr.strip().splitlines()
    assert "refused the access token (401 M_UNKNOWN_TOKEN)" in line and "syt_not_a_token" not in line

    cfg = matrix_cfg(orch, room, access_token="syt_not_a_token")
    task_through(store, cfg, agent(store, cfg), "x", end="failed")
    report = flush(store, cfg)
    assert report.retried == 1 and report.sent == 0
    (row,) = store.outbox_rows(states=["pending"])
    assert "refused the access token (401 M_UNKNOWN_TOKEN)" in row["last_error"] and row["tries"] == 1
    assert said(room) == []
    assert store.task(row["task_id"])["state"] == "failed"


def test_a_room_the_bot_is_not_in_is_reported_by_notify_test_and_on_the_outbox_rows(runner, tmp_path, store, orch,
                                                                                    synapse):  # fmt: skip
    room = make_room(synapse, join=False)  # invited, never joined
    result = notify_test(runner, tmp_path, room)
    assert result.exit_code == 5
    (line,) = result.stderr.strip().splitlines()
    assert f"{room.bot_id} is not in room {room.id}" in line

    cfg = matrix_cfg(orch, room)
    task_through(store, cfg, agent(store, cfg), "x", end="failed")
    flush(store, cfg)
    (row,) = store.outbox_rows(states=["pending"])
    assert "403 M_FORBIDDEN" in row["last_error"]
    assert said(room) == []
