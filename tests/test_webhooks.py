"""Forgejo webhooks (issue 7): signatures, every shared payload replayed, the mapping of SPEC §7.2, the route.

Payloads come from ``shared/forgejo/webhooks/`` with the headers of its ``index.json``; they label issue #42
``agent-task``, so these tests use ``requirement_prefix = "agent-"`` (the label then requires ``task``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fleetctl.config import load_config_text
from fleetctl.errors import UsageError
from fleetctl.forgejo import mapping, webhooks
from fleetctl.forgejo.webhooks import BadSignature, sign, verify
from fleetctl.services import issues
from fleetctl.store import Store

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "forgejo" / "webhooks"
SECRET = "test-webhook-secret"

if not SHARED.is_dir():  # a missing fixture must fail CI, never skip there
    if os.environ.get("CI"):
        raise RuntimeError(f"{SHARED} is missing: the Forgejo webhook fixtures are needed")
    pytest.skip(f"{SHARED} not found: put shared/ beside the checkout", allow_module_level=True)

INDEX = {f["file"]: f for f in json.loads((SHARED / "index.json").read_text())["files"]}
VECTORS = json.loads((SHARED / "signature_vectors.json").read_text())


def headers_for(name: str, body: bytes, *, delivery: str | None = None, secret: str = SECRET) -> dict[str, str]:
    meta = INDEX[name]
    return {"X-Forgejo-Delivery": delivery or str(uuid.uuid4()), "X-Forgejo-Event": meta["X-Forgejo-Event"],
            "X-Forgejo-Event-Type": meta["X-Forgejo-Event-Type"], "X-Forgejo-Signature": sign(secret, body),
            "Content-Type": "application/json"}  # fmt: skip


def forgejo_bytes(doc: dict) -> bytes:
    """A payload as Forgejo stores it: 2-space indent, no trailing newline, <>& escaped."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


CONFIG = f"""
[forgejo]
url = "http://127.0.0.1:9"  # loopback, nothing listens: these tests never call Forgejo
token = "forgejo-token"
webhook_secret = "{SECRET}"
[orchestrator]
db_path = "fleet.db"
requirement_prefix = "agent-"
"""


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    path.chmod(0o600)
    return load_config_text(CONFIG, path)


@pytest.fixture
def db(cfg):
    store = Store.open(cfg.orchestrator.db_path)
    yield store
    store.close()


def send(db, cfg, name: str, body: bytes | None = None, **kw) -> issues.IngestResult:
    body = (SHARED / name).read_bytes() if body is None else body
    return issues.ingest(db, cfg, headers_for(name, body, **kw), body, source="test")


def snapshot(db) -> tuple:
    q = lambda sql: db.conn.execute(sql).fetchall()  # noqa: E731
    return (q("SELECT * FROM tasks ORDER BY task_id"), q("SELECT count(*) FROM events"),
            q("SELECT delivery_id, verdict FROM deliveries ORDER BY delivery_id"))  # fmt: skip


# ---------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["file"])
def test_every_signature_vector_verifies(vector):
    body = (SHARED / vector["file"]).read_bytes()
    assert hashlib.sha256(body).hexdigest() == vector["body_sha256"]
    for name in ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256"):
        verify(vector["secret"], body, {name: vector["headers"][name]})  # raises when it does not verify
    assert sign(vector["secret"], body) == vector["headers"]["X-Forgejo-Signature"]


def test_rfc4231_case_2():
    case = VECTORS["rfc4231_case2"]
    assert sign(case["key"], case["data"].encode()) == case["hmac_sha256_hex"]


def _bad_signatures(body: bytes) -> dict[str, dict[str, str]]:
    good = sign(SECRET, body)
    reserialised = json.dumps(json.loads(body)).encode()  # same JSON, other bytes
    return {
        "missing": {},
        "empty": {"X-Forgejo-Signature": ""},
        "wrong": {"X-Forgejo-Signature": sign("another-secret", body)},
        "truncated": {"X-Forgejo-Signature": good[:-2]},
        "uppercase": {"X-Forgejo-Signature": good.upper()},
        "prefixed-forgejo": {"X-Forgejo-Signature": "sha256=" + good},
        "hub-unprefixed": {"X-Hub-Signature-256": good},
        "reserialised-body": {"X-Forgejo-Signature": sign(SECRET, reserialised)},
        "empty-secret-style": {"X-Forgejo-Signature": "", "X-Hub-Signature-256": "sha256=" + good},
        "sha1-only": {"X-Hub-Signature": "sha1=" + hmac.new(SECRET.encode(), body, "sha1").hexdigest()},
    }


@pytest.mark.parametrize("case", list(_bad_signatures(b"{}")))
def test_bad_signatures_are_refused_and_change_nothing(db, cfg, case):
    body = (SHARED / "issues-opened-with-labels.json").read_bytes()
    sig = _bad_signatures(body)[case]
    headers = {k: v for k, v in headers_for("issues-opened-with-labels.json", body).items()
               if k != "X-Forgejo-Signature"} | sig  # fmt: skip
    before = snapshot(db)
    with pytest.raises(BadSignature):
        issues.ingest(db, cfg, headers, body)
    assert snapshot(db) == before


def test_fallback_headers_are_accepted_in_order():
    body = b'{"action":"opened"}'
    good = sign(SECRET, body)
    verify(SECRET, body, {"X-Gitea-Signature": good})
    verify(SECRET, body, {"x-hub-signature-256": "sha256=" + good})  # any case
    # the first header present decides: a wrong Forgejo signature is not rescued by a right Hub one
    with pytest.raises(BadSignature):
        verify(SECRET, body, {"X-Forgejo-Signature": "0" * 64, "X-Hub-Signature-256": "sha256=" + good})
    with pytest.raises(BadSignature, match="no webhook secret"):
        verify("", body, {"X-Forgejo-Signature": sign("", body)})


# ---------------------------------------------------------------------------------------------- payloads


def test_every_shared_payload_is_read_and_decided(db, cfg):
    """Every payload in shared/forgejo/webhooks (captured ones too) is read without error and gets a verdict."""
    for name, meta in INDEX.items():
        result = send(db, cfg, name)
        assert result.verdict in ("accepted", "ignored"), (name, result)
        assert result.status in (200, 202)
        delivery = webhooks.read_delivery(headers_for(name, (SHARED / name).read_bytes()), (SHARED / name).read_bytes())
        assert delivery.action == meta["action"]
    assert db.check().ok


def test_issue_lifecycle_through_the_shared_payloads(db, cfg):
    opened = send(db, cfg, "issues-opened-with-labels.json")
    assert opened.verdict == "accepted" and opened.task_id
    tid = opened.task_id
    task = db.task(tid)
    assert (task["repo"], task["issue_number"], task["requirements"], task["state"]) == (
        "acme/widgets",
        42,
        ["task"],
        "queued",
    )
    # Forgejo follows an issue created with labels by a label_updated with the same labels: nothing changes
    events = db.max_event_id()
    assert send(db, cfg, "issue_label-label_updated.json").task_id == tid
    assert db.max_event_id() == events
    assert send(db, cfg, "issues-edited.json").detail.startswith("the issue changed: title")
    assert db.task(tid)["title"] == json.loads((SHARED / "issues-edited.json").read_bytes())["issue"]["title"]
    # a pull request that says "Closes #42" is linked
    assert send(db, cfg, "pull_request-opened.json").verdict == "accepted"
    assert db.task(tid)["pull_request"]["number"] == 43
    assert send(db, cfg, "issues-closed.json").verdict == "accepted"
    assert db.task(tid)["state"] == "cancelled"
    assert send(db, cfg, "issues-reopened.json").verdict == "accepted"
    assert db.task(tid)["state"] == "queued"  # re-queued with a new attempt budget, one task per issue
    assert send(db, cfg, "issue_label-label_cleared.json").verdict == "accepted"
    assert db.task(tid)["state"] == "cancelled"
    assert len(db.tasks()) == 1
    assert db.check().ok


def test_the_bot_payload_changes_nothing(db, cfg, tmp_path):
    send(db, cfg, "issues-opened-with-labels.json")
    before = snapshot(db)[:2]
    result = send(db, cfg, "issue_label-label_updated-bot.json")  # the bot added a status label
    assert result.status in (200, 202)
    assert snapshot(db)[:2] == before
    # with the bot known, a label change it sends that only touches fleet/ labels is said to be its own
    issues.remember_login(db, "fleet-bot")
    doc = json.loads((SHARED / "issue_label-label_updated-bot.json").read_bytes())
    doc["issue"]["labels"].append({"id": 99, "name": "fleet/running"})
    doc["issue"]["updated_at"] = "2025-06-02T10:20:00Z"
    result = send(db, cfg, "issue_label-label_updated-bot.json", forgejo_bytes(doc))
    assert result.verdict == "ignored" and "own write-back" in result.detail
    assert snapshot(db)[:2] == before


def test_the_same_delivery_twice_creates_one_task(db, cfg):
    first = send(db, cfg, "issues-opened-with-labels.json", delivery="dup-1")
    again = send(db, cfg, "issues-opened-with-labels.json", delivery="dup-1")
    assert again.verdict == "duplicate" and again.task_id == first.task_id
    view, raw = issues.get_delivery(db, "dup-1")  # an accepted delivery keeps its raw body, byte for byte
    assert view["verdict"] == "accepted" and raw == (SHARED / "issues-opened-with-labels.json").read_bytes()
    replay = send(db, cfg, "issues-opened-with-labels.json")  # Forgejo's "Replay": new id, same body
    assert replay.verdict == "ignored" and "same change" in replay.detail
    assert len(db.tasks()) == 1
    assert db.conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2


def test_malformed_json_with_a_valid_signature_is_rejected_and_recorded(db, cfg):
    body = b'{"action": "opened", "issue": '
    result = send(db, cfg, "issues-opened.json", body, delivery="bad-json")
    assert (result.status, result.verdict, result.error_code) == (400, "rejected", "invalid_json")
    row = db.delivery("bad-json")
    assert row["verdict"] == "rejected" and "not valid JSON" in row["detail"] and row["body_zlib"] is None
    assert db.tasks() == []


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda d: d.pop("repository"), "invalid_payload"),
        (lambda d: d["issue"].update(number="42"), "invalid_payload"),
        (lambda d: d["issue"].update(labels="agent-task"), "invalid_payload"),
        (lambda d: d["issue"].update(state="weird"), "invalid_payload"),
        (lambda d: d["issue"].update(title=["x"]), "invalid_payload"),
    ],
)
def test_signed_payloads_of_the_wrong_shape_are_rejected(db, cfg, mutate, code):
    doc = json.loads((SHARED / "issues-opened-with-labels.json").read_bytes())
    mutate(doc)
    result = send(db, cfg, "issues-opened-with-labels.json", forgejo_bytes(doc))
    assert (result.status, result.error_code) == (400, code)
    assert db.tasks() == []


def test_bad_delivery_ids_are_refused_before_anything_is_recorded(db, cfg):
    body = (SHARED / "issues-opened.json").read_bytes()
    for bad in ("", "../../etc/passwd", "a\nb", "x" * 200, "id with space"):
        headers = headers_for("issues-opened.json", body) | {"X-Forgejo-Delivery": bad}
        with pytest.raises(UsageError):
            issues.ingest(db, cfg, headers, body)
    assert db.deliveries() == []


def test_pull_requests_never_become_tasks(db, cfg):
    doc = json.loads((SHARED / "issues-opened-with-labels.json").read_bytes())
    doc["issue"]["pull_request"] = {"merged": False, "merged_at": None, "draft": False, "html_url": "x"}
    result = send(db, cfg, "issues-opened-with-labels.json", forgejo_bytes(doc))
    assert result.verdict == "ignored" and db.tasks() == []


# ---------------------------------------------------------------------------------------------- the mapping


def _issue_change(action="opened", labels=("agent-task",), state="open", event_type="issues", sender="alice",
                  commit_id="", title="T", body="B"):  # fmt: skip
    issue = webhooks.Issue(42, title, body, tuple(labels), state, updated_at="2025-01-01T00:00:00Z")
    return webhooks.Change(event_type, action, "acme/widgets", sender, issue=issue, commit_id=commit_id)


def _task(state="queued", **kw):
    base = {"task_id": "t1", "state": state, "title": "T", "body": "B", "labels": ["agent-task"],
            "requirements": ["task"], "priority": 0, "timeout_secs": None, "pull_request": None,
            "issue_number": 42, "repo": "acme/widgets"}  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize(
    ("change", "active", "last", "kind"),
    [
        (_issue_change(), None, None, "create"),
        (_issue_change(labels=("bug",)), None, None, "none"),
        (_issue_change(), _task(), None, "none"),
        (_issue_change(title="New"), _task(), None, "update"),
        (_issue_change(labels=("agent-task", "priority:5")), _task(), None, "update"),
        (_issue_change(labels=("agent-task", "fleet/running")), _task(), None, "none"),  # own status label
        (_issue_change(labels=("agent-task", "bug")), _task(), None, "none"),  # metadata only
        (_issue_change("label_updated", ("bug",), event_type="issue_label"), _task(), None, "cancel"),
        (_issue_change("label_cleared", (), event_type="issue_label"), _task("running"), None, "cancel"),
        (_issue_change("closed", state="closed"), _task("running"), None, "cancel"),
        (_issue_change("closed", state="closed", commit_id="abc"), _task("awaiting_review",
                                                                        pull_request={"number": 43}), None, "none"),
        (_issue_change("closed", state="closed", commit_id="abc"), _task("running"), None, "cancel"),
        (_issue_change("closed", state="closed"), None, _task("completed"), "none"),
        (_issue_change("reopened"), None, _task("cancelled"), "requeue"),
        (_issue_change("reopened"), None, _task("failed"), "requeue"),
        (_issue_change("reopened"), None, _task("completed"), "create"),
        (_issue_change("edited", title="X"), None, _task("failed"), "none"),  # an edit never re-runs a task
        (_issue_change("label_updated", ("agent-task", "agent-py"), event_type="issue_label"), None,
         _task("failed"), "requeue"),  # re-labelled
        (_issue_change("label_updated", ("agent-task", "bug"), event_type="issue_label"), None,
         _task("cancelled"), "none"),  # a metadata label is no re-label
        (_issue_change("label_updated", ("agent-task", "fleet/running"), event_type="issue_label",
                       sender="fleet-bot"), _task(), None, "none"),  # its own write-back
        (_issue_change("label_updated", (), event_type="issue_label", sender="fleet-bot"), _task(), None,
         "cancel"),  # the bot's account removing the last agent- label (a script): not write-back
    ],
)  # fmt: skip
def test_issue_mapping(change, active, last, kind):
    op = mapping.issue_op(change, active, last or active, prefix="agent-", bot="fleet-bot")
    assert op.kind == kind, op


def _pull_change(action="opened", head="fleet/t1", body="", state="open", merged=False, number=43):
    pull = webhooks.Pull(number, "PR", body, head, "abc123", state, merged, "https://f/acme/widgets/pulls/43")
    return webhooks.Change("pull_request", action, "acme/widgets", "alice", pull=pull)


@pytest.mark.parametrize(
    ("change", "task", "kind"),
    [
        (_pull_change(), _task("running"), "link_pr"),
        (_pull_change(head="feature", body="Fixes #42"), _task("running"), "link_pr"),
        (_pull_change("closed", state="closed", merged=True), _task("awaiting_review"), "complete"),
        (_pull_change("closed", state="closed", merged=True), _task("queued"), "cancel"),
        (_pull_change("closed", state="closed"), _task("awaiting_review"), "fail_pr_closed"),
        (_pull_change("closed", head="other", body="Fixes #42", state="closed"), _task("running"), "none"),
        (_pull_change("closed", state="closed"), _task("completed"), "none"),
        (_pull_change(), _task("running", pull_request={"repo": "acme/widgets", "number": 43, "url":
         "https://f/acme/widgets/pulls/43", "head": "fleet/t1", "head_sha": "abc123", "state": "open",
         "merged": False}), "none"),  # already linked
    ],
)  # fmt: skip
def test_pull_mapping(change, task, kind):
    assert mapping.pull_op(change, task).kind == kind


def test_closing_references():
    pull = webhooks.Pull(1, "Fixes #3", "Closes #42, resolves: #7 and closes#9; see #8", "b", None, "open", False)
    assert mapping.closing_refs(pull) == [3, 42, 7]
    assert mapping.branch_task_id("fleet/t-123") == "t-123" and mapping.branch_task_id("agent/x") is None
    assert mapping.branch_task_id("bot:fleet/t-1") == "t-1"


def test_pull_request_events_drive_the_task_to_its_end(db, cfg):
    from fleetctl import services

    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    services.register_agent(db, "a1", agent_type="t", capabilities=["task"], now=1.0)
    services.claim_task(db, cfg, db.agent("a1"))
    doc = json.loads((SHARED / "pull_request-opened.json").read_bytes())
    doc["pull_request"]["head"]["label"] = doc["pull_request"]["head"]["ref"] = f"fleet/{tid}"
    doc["pull_request"]["body"] = "no reference in the body"
    assert send(db, cfg, "pull_request-opened.json", forgejo_bytes(doc)).verdict == "accepted"
    assert db.task(tid)["pull_request"]["head"] == f"fleet/{tid}"
    doc = json.loads((SHARED / "pull_request-closed-merged.json").read_bytes())
    doc["pull_request"]["head"]["label"] = f"fleet/{tid}"
    assert send(db, cfg, "pull_request-closed-merged.json", forgejo_bytes(doc)).verdict == "accepted"
    assert db.task(tid)["state"] == "completed"
    # the issue closing because of that merge does not cancel the completed task
    doc = json.loads((SHARED / "issues-closed.json").read_bytes())
    doc["commit_id"] = "f00d" * 10
    send(db, cfg, "issues-closed.json", forgejo_bytes(doc))
    assert db.task(tid)["state"] == "completed"
    assert db.check().ok


def test_a_pr_closed_unmerged_fails_the_task_pr_closed(db, cfg):
    from fleetctl import services

    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    services.register_agent(db, "a1", agent_type="t", capabilities=["task"], now=1.0)
    services.claim_task(db, cfg, db.agent("a1"))
    doc = json.loads((SHARED / "pull_request-closed.json").read_bytes())
    doc["pull_request"]["head"]["label"] = f"fleet/{tid}"
    assert send(db, cfg, "pull_request-closed.json", forgejo_bytes(doc)).verdict == "accepted"
    task = db.task(tid)
    assert (task["state"], task["failure_reason"]) == ("failed", "pr_closed")  # never retried automatically


# ---------------------------------------------------------------------------------------------- the route


def _post(port: int, path: str, body: bytes, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, dict]:
    """POST to the live server; the answer must be one docs/openapi.json documents, in its schema."""
    import httpx
    import jsonschema

    r = httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers, timeout=timeout)
    doc = r.json() if r.content else {}
    op = OPENAPI["paths"][path]["post"]
    response = op["responses"][str(r.status_code)]  # KeyError: an undocumented status
    response = OPENAPI["components"]["responses"].get(response.get("$ref", "").rsplit("/", 1)[-1], response)
    schema = {**response["content"]["application/json"]["schema"], "components": OPENAPI["components"]}
    jsonschema.validate(doc, schema)
    return r.status_code, doc


def _json_schema(node):
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema's ``type: [T, "null"]`` (for jsonschema)."""
    if isinstance(node, dict):
        out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and isinstance(node.get("type"), str):
            out["type"] = [node["type"], "null"]
        return out
    return [_json_schema(v) for v in node] if isinstance(node, list) else node


OPENAPI = _json_schema(json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text()))


@pytest.fixture
def hook_server(make_server):
    server = make_server(requirement_prefix="agent-", forgejo={"webhook_secret": SECRET,
                                                               "url": "https://forgejo.example.com"})  # fmt: skip
    return server.start()


def _tasks_in(db_path: Path) -> list[tuple]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT task_id, state FROM tasks").fetchall()
    finally:
        conn.close()


def test_route_accepts_signed_deliveries_and_refuses_the_rest(hook_server):
    name = "issues-opened-with-labels.json"
    body = (SHARED / name).read_bytes()
    status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", body, headers_for(name, body, delivery="r-1"))
    assert status == 200 and doc["verdict"] == "accepted" and doc["task_id"]
    status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", body, headers_for(name, body, delivery="r-1"))
    assert status == 200 and doc["verdict"] == "duplicate"
    for case, sig in _bad_signatures(body).items():
        headers = {k: v for k, v in headers_for(name, body).items() if k != "X-Forgejo-Signature"} | sig
        status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", body, headers)
        assert status == 401 and doc["error"]["code"] == "bad_signature", case
    status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", b"{nope", headers_for(name, b"{nope"))
    assert status == 400 and doc["error"]["code"] == "invalid_json"
    ignored = (SHARED / "issue_comment-created.json").read_bytes()
    status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", ignored,
                        headers_for("issue_comment-created.json", ignored))  # fmt: skip
    assert status == 202 and doc["verdict"] == "ignored"
    assert len(_tasks_in(hook_server.db_path)) == 1
    result = subprocess.run([sys.executable, "-m", "fleetctl", "deliveries", "list", "--json", "--config",
                             str(hook_server.config_path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    verdicts = sorted(d["verdict"] for d in json.loads(result.stdout)["items"])
    assert verdicts == ["accepted", "ignored", "rejected"]  # unsigned deliveries are never recorded


def test_oversized_body_gets_413_without_being_read(hook_server):
    with socket.create_connection(("127.0.0.1", hook_server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/webhooks/forgejo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 6000000\r\n\r\n")  # fmt: skip
        reply = sock.recv(4096)  # answered before a byte of the body was sent
    assert reply.startswith(b"HTTP/1.1 413")


def test_form_encoded_deliveries_get_415(hook_server):
    body = b"payload=%7B%7D"
    status, doc = _post(
        hook_server.port,
        "/api/v1/webhooks/forgejo",
        body,
        headers_for("issues-opened.json", body) | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415 and "application/json" in doc["error"]["message"]


def test_route_is_off_without_forgejo(live_server):
    status, doc = _post(live_server.port, "/api/v1/webhooks/forgejo", b"{}", {"X-Forgejo-Signature": "0" * 64})
    assert status == 404 and doc["error"]["code"] == "webhooks_disabled"


def test_serve_refuses_a_webhook_route_without_a_secret(make_server):
    server = make_server(forgejo={"url": "https://forgejo.example.com"})
    with pytest.raises(AssertionError, match="exited 2"):
        server.start()
    assert "webhook listener with an empty secret" in server.stderr_path.read_text()


def test_answers_within_5s_while_another_process_holds_the_write_lock(hook_server):
    """The store is locked by another process for longer than Forgejo waits: the delivery is answered in time
    (spooled) and applied once the lock is gone."""
    name = "issues-opened-with-labels.json"
    body = (SHARED / name).read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(hook_server.db_path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(8); c.execute('COMMIT')\n")],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        status, doc = _post(hook_server.port, "/api/v1/webhooks/forgejo", body, headers_for(name, body), timeout=5.0)
        elapsed = time.monotonic() - started
        assert status == 202 and doc["verdict"] == "queued", doc
        assert elapsed < 5.0  # httpx's timeout would have raised anyway
        assert _tasks_in(hook_server.db_path) == [] or holder.poll() is not None
    finally:
        holder.wait(20)
    deadline = time.monotonic() + 20
    while not _tasks_in(hook_server.db_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [state for _, state in _tasks_in(hook_server.db_path)] == ["queued"]


# ---------------------------------------------------------------------------------------------- the CLI


def test_ingest_webhook_cli(tmp_path, cfg):
    name = "issues-opened-with-labels.json"
    body_path = SHARED / name
    body = body_path.read_bytes()
    base = [sys.executable, "-m", "fleetctl", "--config", str(cfg.path), "ingest-webhook"]
    run = lambda *a, **kw: subprocess.run([*base, *a], capture_output=True, text=True, timeout=60, **kw)  # noqa: E731
    r = run("--file", str(body_path), "--event", "issues", "--delivery", "c-1", "--signature", sign(SECRET, body))
    assert r.returncode == 0 and r.stdout.startswith("accepted: "), r.stderr
    r = run("--file", str(body_path), "--event", "issues", "--delivery", "c-2", "--signature", "0" * 64)
    assert r.returncode == 6 and "does not match" in r.stderr
    r = run("--file", str(body_path), "--event", "issues", "--delivery", "c-3")
    assert r.returncode == 2 and "no signature" in r.stderr
    headers = tmp_path / "headers.txt"
    headers.write_text(f"POST /hook HTTP/1.1\nX-Forgejo-Delivery: c-1\nX-Forgejo-Event: issues\n"
                       f"X-Forgejo-Event-Type: issues\nX-Forgejo-Signature: {sign(SECRET, body)}\n")  # fmt: skip
    r = run("--headers", str(headers), input=body.decode())
    assert r.returncode == 0 and r.stdout.startswith("duplicate: "), r.stderr
    r = run("--event", "issues", "--delivery", "c-4", "--unsigned", "--json", input="[1]")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == "invalid_body"
    with Store.open(cfg.orchestrator.db_path) as store:
        assert len(store.tasks()) == 1 and store.check().ok


def test_the_sweep_forgets_deliveries_past_their_retention(db, cfg):
    from dataclasses import replace

    from fleetctl import passes

    send(db, cfg, "issues-opened-with-labels.json", delivery="old-1")
    issues.ingest(db, cfg, headers_for("issue_comment-created.json", b"{}", delivery="old-2"), b"{}", now=1000.0)
    issues.ingest(db, cfg, headers_for("issue_comment-created.json", b"{}", delivery="old-3"), b"{}", now=2000.0)
    db.conn.execute("UPDATE deliveries SET received_at = 500.0 WHERE delivery_id = 'old-1'")
    cfg = replace(cfg, forgejo=replace(cfg.forgejo, token=None, delivery_retention_secs=3600.0))
    report = passes.sweep(db, cfg, now=lambda: 1500.0 + 3600)
    assert [d["delivery_id"] for d in db.deliveries()] == ["old-3"]
    assert {"action": "deliveries.pruned", "removed": 2, "older_than_secs": 3600} in report.actions
    assert db.tasks() and db.check().ok  # deliveries are a log: forgetting them changes no task
    keep_all = replace(cfg, forgejo=replace(cfg.forgejo, delivery_retention_secs=0))
    passes.sweep(db, keep_all, now=lambda: 10**10)
    assert len(db.deliveries()) == 1


def test_without_the_event_type_header_the_action_says_what_changed(db, cfg):
    tid = send(db, cfg, "issues-opened-with-labels.json").task_id
    doc = json.loads((SHARED / "issue_label-label_cleared.json").read_bytes())
    body = forgejo_bytes(doc)
    headers = {k: v for k, v in headers_for("issue_label-label_cleared.json", body).items()
               if k != "X-Forgejo-Event-Type"}  # only X-Forgejo-Event: issues  # fmt: skip
    result = issues.ingest(db, cfg, headers, body)
    assert result.verdict == "accepted" and db.task(tid)["state"] == "cancelled"
