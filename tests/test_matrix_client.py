"""The Matrix client (fleetctl/matrix/client.py) against a real Synapse, and what the outbox does with each
answer (fleetctl/matrix/outbox.py). httpx's MockTransport stands in only for what Synapse will not do on
request (5xx, a garbage or endless answer)."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import replace

import httpx
import pytest
from conftest import config_of

from fleetctl import services
from fleetctl.config import MatrixConfig
from fleetctl.errors import ConfigError
from fleetctl.matrix import outbox as matrix_outbox
from fleetctl.matrix.client import MAX_RESPONSE_BYTES, PATHS, MatrixClient, MatrixError, client_for
from fleetctl.outbox import MAX_TRIES, FlushReport, flush


def joined_bot(server):
    """A bot joined to a room of a person: (user_id, token, room_id, person's token)."""
    tag = uuid.uuid4().hex[:8]
    human_id, human = server.register(f"person{tag}")
    bot_id, token = server.register(f"bot{tag}")
    room = server.create_room(human, invite=[bot_id])
    server.join(token, room)
    return bot_id, token, room, human


@pytest.fixture(scope="module")
def bot(synapse):
    return joined_bot(synapse)


def test_whoami_send_and_read_back(synapse, bot):
    bot_id, token, room, human = bot
    with MatrixClient(synapse.url, token) as c:
        assert c.whoami()["user_id"] == bot_id
        assert room in c.joined_rooms()
        txn = f"t.{uuid.uuid4().hex}"
        first = c.send_message(room, txn, "plain & <b>", "<b>bold</b> &amp;")
        assert c.send_message(room, txn, "plain & <b>", "<b>bold</b> &amp;") == first  # same txn: same event
        assert c.send_message(room, txn + "x", "no html") != first
    events = {e["event_id"]: e["content"] for e in synapse.messages(human, room)}
    assert events[first] == {"msgtype": "m.text", "body": "plain & <b>", "format": "org.matrix.custom.html",
                             "formatted_body": "<b>bold</b> &amp;"}  # fmt: skip
    assert list(events.values()).count(events[first]) == 1
    assert {"msgtype": "m.text", "body": "no html"} in events.values()


def test_aliases_resolve_and_unknown_ones_are_404(synapse, bot):
    bot_id, token, room, human = bot
    alias = f"#fleet{uuid.uuid4().hex[:6]}:{synapse.server_name}"
    synapse.set_alias(human, alias, room)
    with MatrixClient(synapse.url, token) as c:
        assert c.resolve_room(alias) == room and c.resolve_room(room) == room
        with pytest.raises(MatrixError) as err:
            c.resolve_room(f"#nope:{synapse.server_name}")
    assert err.value.status == 404 and err.value.errcode == "M_NOT_FOUND" and not err.value.retryable
    assert err.value.message.startswith(f"unknown room alias #nope:{synapse.server_name} (404 M_NOT_FOUND)")


def test_a_bad_token_is_401_and_never_shown(synapse, bot):
    with MatrixClient(synapse.url, "syt_secret_but_wrong") as c, pytest.raises(MatrixError) as err:
        c.whoami()
    assert err.value.status == 401 and err.value.errcode == "M_UNKNOWN_TOKEN" and err.value.exit_code == 5
    assert err.value.message.startswith("the homeserver refused the access token (401 M_UNKNOWN_TOKEN)")
    assert "syt_secret_but_wrong" not in err.value.message


def test_a_room_the_bot_is_not_in_and_a_room_that_does_not_exist_are_403(synapse, bot):
    _, _, room, _ = bot
    _, stranger = synapse.register(f"stranger{uuid.uuid4().hex[:8]}")
    with MatrixClient(synapse.url, stranger) as c:
        for target in (room, f"!nosuchroom:{synapse.server_name}"):
            with pytest.raises(MatrixError) as err:
                c.send_message(target, "t1", "hello")
            assert err.value.status == 403 and err.value.errcode == "M_FORBIDDEN" and not err.value.retryable
            assert err.value.message.startswith(f"cannot post in {target}: the bot is not in the room")


def test_hostile_ids_are_one_path_segment(synapse, bot):
    _, token, room, _ = bot
    seen = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"event_id": "$x"})

    with MatrixClient("http://127.0.0.1:9", token, transport=httpx.MockTransport(record)) as c:
        c.send_message("!a/../b?c#d e", "../../x?y#z", "hi")
    assert seen == ["/_matrix/client/v3/rooms/%21a%2F..%2Fb%3Fc%23d%20e/send/m.room.message/..%2F..%2Fx%3Fy%23z"]
    with MatrixClient(synapse.url, token) as c, pytest.raises(MatrixError) as err:  # and Synapse agrees: no such room
        c.send_message(room + "/../x", "t", "hi")
    assert err.value.status == 403


def test_default_rate_limits_give_429_with_the_wait(synapse_strict):
    _, token, room, _ = joined_bot(synapse_strict)
    with MatrixClient(synapse_strict.url, token) as c:
        with pytest.raises(MatrixError) as err:
            for i in range(30):  # bounded: the default burst is 10
                c.send_message(room, f"r{i}", f"message {i}")
    exc = err.value
    assert exc.status == 429 and exc.errcode == "M_LIMIT_EXCEEDED" and exc.retryable
    assert 0 < exc.retry_after <= 10 and re.match(r"rate limited by the homeserver: wait \d+\.\ds", exc.message)


def test_a_homeserver_that_is_down_is_a_retryable_error_without_status(make_synapse):
    server = make_synapse()
    _, token = server.register("lonely")
    server.stop()
    started = time.monotonic()
    with MatrixClient(server.url, token, timeout=2) as c, pytest.raises(MatrixError) as err:
        c.whoami()
    assert time.monotonic() - started < 10
    assert err.value.status is None and err.value.retryable
    assert err.value.message.startswith(f"cannot reach the homeserver at {server.url}")


@pytest.mark.parametrize(
    ("response", "status", "retryable", "message"),
    [
        (httpx.Response(502, text="<html>bad gateway</html>"), 502, True, "the homeserver failed while sending"),
        (httpx.Response(500, json={"errcode": "M_UNKNOWN", "error": "db\nlocked"}), 500, True,
         "the homeserver failed while sending to !r:x (500 M_UNKNOWN): db locked"),
        (httpx.Response(200, text="not json"), 200, False, "the homeserver's answer while sending to !r:x is not"),
        (httpx.Response(200, json={"no": "event id"}), None, False, "the homeserver's answer to a send has no event_id"),
        (httpx.Response(200, content=b"[" + b"1," * MAX_RESPONSE_BYTES + b"1]"), 200, False, "is larger than"),
        (httpx.Response(429, headers={"Retry-After": "7"}, json={"errcode": "M_LIMIT_EXCEEDED"}), 429, True,
         "rate limited by the homeserver: wait 7.0s (429 M_LIMIT_EXCEEDED)"),
        (httpx.Response(400, json={"errcode": "M_BAD_JSON", "error": "nope"}), 400, False,
         "the homeserver refused sending to !r:x (400 M_BAD_JSON): nope"),
    ],
)  # fmt: skip
def test_what_synapse_will_not_do_on_request(response, status, retryable, message):
    with MatrixClient("http://127.0.0.1:9", "tok", transport=httpx.MockTransport(lambda r: response)) as c:
        with pytest.raises(MatrixError) as err:
            c.send_message("!r:x", "t", "hi")
    assert err.value.status == status and err.value.retryable == retryable and message in err.value.message


def test_the_client_calls_only_documented_client_server_paths():
    """Every request matches one of ``PATHS``, and each of those is a client-server API v3 endpoint."""
    documented = {("GET", "/_matrix/client/v3/account/whoami"), ("GET", "/_matrix/client/v3/joined_rooms"),
                  ("GET", "/_matrix/client/v3/directory/room/{roomAlias}"),
                  ("PUT", "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}")}  # fmt: skip
    assert set(PATHS) <= documented
    patterns = [(m, re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p)) + "$")) for m, p in PATHS]
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.raw_path.decode()))
        return httpx.Response(200, json={"user_id": "@b:x", "room_id": "!r:x", "joined_rooms": [], "event_id": "$e"})

    with MatrixClient("http://127.0.0.1:9", "tok", transport=httpx.MockTransport(answer)) as c:
        c.whoami(), c.joined_rooms(), c.resolve_room("#a:x"), c.send_message("!r:x", "t", "b", "h")
    assert len(calls) == 4
    for method, path in calls:
        assert any(m == method and p.match(path) for m, p in patterns), (method, path)


def test_client_for_needs_a_homeserver_and_a_token():
    with pytest.raises(ConfigError):
        client_for(MatrixConfig(homeserver="https://m.example.org", room_id="!r"))
    with client_for(MatrixConfig(homeserver="https://m.example.org/", access_token="t", timeout_secs=3)) as c:
        assert c.homeserver == "https://m.example.org"


# ---------------------------------------------------------------------------------------------- the outbox's choices


class FakeClient:
    """Answers ``send_message`` from a script of errors (then successes); records what it was asked."""

    def __init__(self, *errors: MatrixError):
        self.errors, self.sent, self.resolved = list(errors), [], 0

    def send_message(self, room, txn, body, html=None):
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append((room, txn, body))
        return f"$e{len(self.sent)}"

    def resolve_room(self, room):
        self.resolved += 1
        return "!resolved:x"

    def close(self):
        pass


@pytest.fixture
def mcfg(orch):
    cfg = config_of(orch)
    return replace(cfg, matrix=MatrixConfig(homeserver="https://m.example.org", access_token="t", room_id="!r:x",
                                            events=("task.created",)))  # fmt: skip


def created(store, orch, n):
    return [services.create_task(store, orch, title=f"t{i}")["task_id"] for i in range(n)]


def send(store, cfg, client, now=time.time, sleep=lambda s: None):
    report = FlushReport()
    matrix_outbox.send_due(store, cfg.matrix, report, client=client, now=now, sleep=sleep)
    return report


def test_a_long_429_puts_the_batch_back_for_as_long_as_asked_and_a_short_one_is_waited_out(store, orch, mcfg):
    from fleetctl.outbox import derive

    created(store, orch, 3)
    derive(store, mcfg)
    waited = []
    short = FakeClient(MatrixError("slow down", status=429, retry_after=2.5, retryable=True))
    report = send(store, mcfg, short, sleep=waited.append)
    assert waited == [2.5] and report.sent == 3 and len(short.sent) == 1
    created(store, orch, 2)
    derive(store, mcfg)
    t0 = time.time()
    report = send(store, mcfg, FakeClient(MatrixError("later", status=429, retry_after=120, retryable=True)))
    assert report.retried == 2 and report.sent == 0
    rows = store.outbox_rows(states=["pending"])
    assert all(t0 + 119 < r["next_try_at"] < t0 + 130 and r["last_error"] == "matrix: later" for r in rows)
    assert send(store, mcfg, FakeClient(), now=lambda: t0 + 60).sent == 0  # not due yet: nothing goes out
    later_ = FakeClient()
    assert send(store, mcfg, later_, now=lambda: t0 + 200).sent == 2
    assert later_.sent[0][1] == f"fleetctl.{store.meta('matrix_txn_prefix')}.{rows[-1]['batch']}"


def test_a_batch_is_fixed_before_its_send_and_rows_behind_it_wait(store, orch, mcfg, monkeypatch):
    from fleetctl.outbox import derive

    monkeypatch.setattr(matrix_outbox, "MAX_BATCH", 2)
    created(store, orch, 3)
    derive(store, mcfg)
    send(store, mcfg, FakeClient(MatrixError("down", retryable=True)))
    batches = [r["batch"] for r in sorted(store.outbox_rows(), key=lambda r: r["id"])]
    assert batches[0] == batches[1] is not None and batches[2] is None
    created(store, orch, 1)  # a new row arrives while the head waits: the head's batch does not grow
    derive(store, mcfg)
    client = FakeClient()
    report = send(store, mcfg, client, now=lambda: time.time() + 7200)
    assert report.sent == 4 and [len(body.split("\n")) for _, _, body in client.sent] == [2, 2]


def test_out_of_tries_the_rows_are_dead_and_an_alias_is_resolved_once(store, orch, mcfg):
    from fleetctl.outbox import derive

    cfg = replace(mcfg, matrix=replace(mcfg.matrix, room_id="#fleet:x"))
    created(store, orch, 1)
    derive(store, cfg)
    client = FakeClient(*[MatrixError("the homeserver refused the access token (401)", status=401)] * MAX_TRIES)
    for i in range(MAX_TRIES):
        report = send(store, cfg, client, now=lambda i=i: time.time() + 86400 * (i + 1))
    assert report.dead == 1 and store.count_outbox() == {"dead": 1}
    (row,) = store.outbox_rows()
    assert (
        row["tries"] == MAX_TRIES - 1 and row["last_error"] == "matrix: the homeserver refused the access token (401)"
    )
    assert client.resolved == 1 and store.meta("matrix_room:#fleet:x") == "!resolved:x"
    created(store, orch, 1)
    derive(store, cfg)
    assert send(store, cfg, client).sent == 1 and client.sent[0][0] == "!resolved:x" and client.resolved == 1


def test_a_process_without_the_token_queues_and_leaves_them(store, orch, mcfg):
    cfg = replace(mcfg, matrix=replace(mcfg.matrix, access_token=None))
    created(store, orch, 2)
    report = flush(store, cfg)
    assert report.enqueued == 2 and report.deferred == 2 and report.sent == 0
    assert store.count_outbox() == {"pending": 2}


def test_a_batch_stays_under_the_event_size_and_a_message_refused_as_such_does_not_hold_up_the_line(store, orch,
                                                                                                   mcfg):  # fmt: skip
    from fleetctl.outbox import derive

    cfg = replace(mcfg, matrix=replace(mcfg.matrix, template="{title:>1900}"))
    created(store, orch, 30)  # 30 messages of ~1,900 characters (and as much HTML)
    derive(store, cfg)
    too_large = MatrixError("too large", status=413, errcode="M_TOO_LARGE")
    client = FakeClient(too_large)
    report = send(store, cfg, client)
    assert report.dead == 6 and store.count_outbox()["dead"] == 6  # the first batch: 6 × ~3,800 ≤ 24,000 chars
    assert report.sent == 24 and [len(body.split("\n")) for _, _, body in client.sent] == [6, 6, 6, 6]
    assert all(len(body) + len(body) < matrix_outbox.MAX_BATCH_CHARS + 4000 for _, _, body in client.sent)
