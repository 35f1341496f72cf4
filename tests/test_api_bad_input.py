"""Every bad input of SPEC §12 that reaches the HTTP API, table-driven, against a live ``fleetctl serve``.

Requests go over raw sockets, so nothing normalises them on the way (no client adds a Content-Length,
re-encodes a path or refuses a header). Each case asserts the status code and the JSON error code, that
no traceback leaks into the body, that the database did not change (events, tasks, agents), and that
``/healthz`` still answers 200 afterwards. The slow-client test checks that a client stalled mid-body
does not hold up anyone else.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import time
from dataclasses import dataclass

import pytest
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer, stop_cleanly

from fleetctl import services
from fleetctl.config import OrchestratorConfig
from fleetctl.states import AgentStatus
from fleetctl.store import Store

TIMEOUT = 5.0


def send(port: int, data: bytes, timeout: float = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """Write ``data`` as is on a new connection; the status, headers (lower-cased) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def request(method: str, target: str, *, token: str | None = None, body: bytes | None = None,
            headers: tuple[str, ...] = (), length: bool = True) -> bytes:  # fmt: skip
    lines = [f"{method} {target} HTTP/1.1", "Host: fleet.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class World:
    """A live server with agents and tasks in known states, and its tokens by name."""

    def __init__(self, server: LiveServer):
        self.server = server
        self.port = server.port
        self.tokens = {"admin": ADMIN_TOKEN, "reg": REGISTRATION_TOKEN}
        for name, caps in (("alice", ["x"]), ("bob", ["x"]), ("late", ["late"]), ("taker", ["late"]), ("gone", ["x"])):
            self.tokens[name] = server.register(name, caps)
        self.post("admin", "/api/v1/tasks", {"task_id": "t-alice", "title": "alice's", "labels": ["agent:x"]})
        self.tokens["alice-task"] = self.post("alice", "/api/v1/tasks/dequeue", {})["task_token"]
        self.post("admin", "/api/v1/tasks", {"task_id": "t-done", "title": "done", "labels": ["agent:x"]})
        claim = self.post("bob", "/api/v1/tasks/dequeue", {})
        assert claim["task"]["task_id"] == "t-done"
        self.post("bob", "/api/v1/tasks/t-done/complete", {"attempt": 1, "summary": "ok"})
        self.post("admin", "/api/v1/tasks", {"task_id": "t-queued", "title": "nobody", "labels": ["agent:nobody"]})
        # "late" claims t-late, is found lost (offline: the attempt fails agent_lost, its token stays valid),
        # "taker" claims attempt 2
        self.post("admin", "/api/v1/tasks", {"task_id": "t-late", "title": "late", "labels": ["agent:late"]})
        self.tokens["late-task"] = self.post("late", "/api/v1/tasks/dequeue", {})["task_token"]
        with Store.open(server.db_path) as store:  # what the sweep does to an agent that stopped heartbeating
            services.set_agent_status(store, OrchestratorConfig(), "late", AgentStatus.OFFLINE, "lost")
        again = self.post("taker", "/api/v1/tasks/dequeue", {"wait": 5})
        assert again["task"]["task_id"] == "t-late" and again["attempt"] == 2
        # "gone" deregistered itself: its token is revoked
        self.post("gone", "/api/v1/agents/deregister", {})

    def post(self, who: str, path: str, doc: dict) -> dict:
        status, _headers, body = send(self.port, request("POST", path, token=self.tokens[who],
                                                         body=json.dumps(doc).encode()))  # fmt: skip
        assert status in (200, 201), body
        return json.loads(body)

    def fingerprint(self) -> tuple:
        """What a refused request must leave as it was: every event, task and agent."""
        conn = sqlite3.connect(self.server.db_path, timeout=10)
        try:
            return (
                conn.execute("SELECT count(*), coalesce(max(id), 0) FROM events").fetchone(),
                conn.execute("SELECT task_id, state, attempt, agent_id FROM tasks ORDER BY task_id").fetchall(),
                conn.execute("SELECT agent_id, status, token_hash FROM agents ORDER BY agent_id").fetchall(),
            )
        finally:
            conn.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("bad-input"), retry_backoff_secs=0.01,
                        retry_backoff_max_secs=0.01).start()  # fmt: skip
    tokens: dict[str, str] = {}
    try:
        world = World(server)
        tokens = world.tokens
        yield world
    finally:
        log = stop_cleanly(server)
    assert not [name for name, token in tokens.items() if token in log], "a token reached the server log"


@dataclass
class Bad:
    """One bad request and the refusal it must get."""

    id: str
    method: str = "GET"
    target: str = "/healthz"
    token: str | None = None  # a name in World.tokens, or a literal after "="
    body: object = None  # bytes as is; anything else as JSON; None: no body
    status: int | tuple[int, ...] = 400
    code: str | tuple[str, ...] = "invalid_field"
    headers: tuple[str, ...] = ()
    length: bool = True
    raw: bytes | None = None
    allow: str | None = None

    def encode(self, world: World) -> bytes:
        if self.raw is not None:
            return self.raw
        token = None
        if self.token is not None:
            token = self.token[1:] if self.token.startswith("=") else world.tokens[self.token]
        body = self.body
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return request(self.method, self.target, token=token, body=body, headers=self.headers, length=self.length)


# fmt: off
def _types(id_: str, method: str, target: str, token: str, base: dict, bad: dict[str, list], code: str) -> list[Bad]:
    """A wrong value for each field of a valid ``base`` body, one case each."""
    return [Bad(f"{id_}-{name}={json.dumps(v)}", method, target, token, {**base, name: v}, 400, code)
            for name, values in bad.items() for v in values]


CREATE = ("POST", "/api/v1/tasks", "admin")
REGISTER = ("POST", "/api/v1/agents/register", "reg")
COMPLETE = ("POST", "/api/v1/tasks/t-alice/complete", "alice")
RUN_ENDED = ("POST", "/api/v1/tasks/t-alice/run-ended", "alice-task")
DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_ARTIFACTS = [
    {}, "pr", None, [1], [{"kind": "pull_request", "number": "3"}], [{"kind": "pull_request", "number": 0}],
    [{"kind": "pull_request", "url": "ftp://x/y/z/pulls/1"}], [{"kind": "commit", "sha": "xyz"}],
    [{"kind": "branch", "name": ""}], [{"kind": "branch", "name": "a\nb"}], [{"kind": "log", "text": 5}],
    [{"kind": "tarball"}], [{"kind": "log", "text": "x"}] * 101,
]
BAD_IDS = ("../x", "..", "a/b", "a\u0000b", "a\nb", "$(reboot)", "a;rm -rf ~", "`id`", "a|b", "-rf", "a b",
           "x" * 129, "")
BAD_PATH_IDS = ("..%2F..%2Fetc%2Fpasswd", "%2E%2E", "a%00b", "a%0Ab", "a%0D%0AX-Injected:%201", "%24(reboot)",
                "a;rm%20-rf%20~", "%60id%60", "a|b", "-rf", "x'%20OR%20'1'='1", "%FF%FE", "x" * 129)

CASES: list[Bad] = [
    # malformed JSON, and JSON that is not an object
    Bad("json-truncated", *CREATE, body=b'{"title": ', code="invalid_json"),
    Bad("json-single-quotes", *CREATE, body=b"{'title': 'x'}", code="invalid_json"),
    Bad("json-trailing-garbage", *CREATE, body=b'{"title": "x"} x', code="invalid_json"),
    Bad("json-not-utf8", *CREATE, body=b'{"title": "\xff\xfe"}', code="invalid_json"),
    Bad("json-nan", *CREATE, body=b'{"title": "x", "priority": NaN}', code="invalid_json"),
    Bad("json-infinity", "POST", "/api/v1/tasks/dequeue", "alice", body=b'{"wait": Infinity}', code="invalid_json"),
    Bad("json-int-past-64-bits", *CREATE, body=b'{"title": "x", "repo": "o/r", "issue_number": 99999999999999999999}',
        code="invalid_json"),
    Bad("json-float-overflow", *CREATE, body=b'{"title": "x", "n": 1e999}', code="invalid_json"),
    Bad("json-lone-surrogate", *CREATE, body=b'{"title": "\\ud800"}', code="invalid_json"),
    Bad("json-nested-too-deep", *CREATE, body=DEEP, code="invalid_json"),
    *[Bad(f"json-not-object-{v.decode()}", *CREATE, body=v, code="invalid_body")
      for v in (b"[]", b'"title"', b"1", b"null", b"true")],
    Bad("heartbeat-json-array", "POST", "/api/v1/agents/heartbeat", "alice", body=b"[1]", code="invalid_body"),
    # missing required fields and bodies
    Bad("create-empty-object", *CREATE, body={}),
    Bad("create-no-body", *CREATE, body=b"", code="invalid_body"),
    Bad("create-blank-title", *CREATE, body={"title": "   "}),
    Bad("create-repo-without-issue", *CREATE, body={"title": "x", "repo": "o/r"}),
    Bad("register-no-body", *REGISTER, body=b"", code="invalid_body"),
    Bad("register-no-agent-id", *REGISTER, body={"agent_type": "t"}),
    Bad("register-no-agent-type", *REGISTER, body={"agent_id": "z1"}),
    Bad("status-no-body", "POST", "/api/v1/tasks/t-alice/status", "alice", body=b"", code="invalid_body"),
    Bad("complete-no-attempt", *COMPLETE, body={"summary": "which attempt?"}),
    Bad("receipts-no-task-id", "POST", "/api/v1/receipts", "alice", body={"attempt": 1}),
    # wrong types (and out-of-range values), field by field
    *_types("create", *CREATE, {"title": "t"}, {
        "title": [7, [], {}, True, None], "body": [7, ["b"]], "labels": ["agent:x", [1], {"a": 1}],
        "task_id": [5, ["t"]], "repo": [5], "issue_number": ["1", True, 1.5, 0, -3]}, "invalid_field"),
    *_types("register", *REGISTER, {"agent_id": "z1", "agent_type": "t"}, {
        "agent_id": [5, None, []], "agent_type": [5, None, ["t"]], "capabilities": ["x", [1], {"a": 1}],
        "max_concurrency": ["2", 1.5, True, 0, 1001], "mode": [1, "ssh_cli", None]}, "invalid_field"),
    *_types("dequeue", "POST", "/api/v1/tasks/dequeue", "alice", {}, {
        "wait": ["1", True, -1, [], {}, None]}, "invalid_field"),
    *_types("status", "POST", "/api/v1/tasks/t-alice/status", "alice", {"attempt": 1}, {
        "attempt": ["1", True, 0, -1, 1.5], "status": [5, "done", None], "message": [5, ["m"], "a\u0000b"]},
        "invalid_field"),
    *_types("complete", *COMPLETE, {"attempt": 1}, {"attempt": ["1", True, 0, 1.5]}, "invalid_field"),
    *_types("complete", *COMPLETE, {"attempt": 1}, {
        "outcome": [1, "maybe", None], "summary": [5, ["s"]], "artifacts": BAD_ARTIFACTS}, "invalid_receipt"),
    *_types("receipts", "POST", "/api/v1/receipts", "alice", {"task_id": "t-alice", "attempt": 1}, {
        "task_id": [5, None, ["t-alice"]]}, "invalid_field"),
    *_types("cancel", "POST", "/api/v1/tasks/t-queued/cancel", "admin", {}, {"reason": [5, ["r"]]}, "invalid_field"),
    *_types("run-ended", *RUN_ENDED, {"attempt": 1, "exit_code": 3}, {
        "attempt": ["1", True, 0, -1, 1.5, None, [1]], "exit_code": ["3", True, 1.5, 2**31, -(2**31) - 1, [3], {}],
        "detail": [5, ["d"], None, "a\u0000b", "x" * 4097]}, "invalid_field"),
    # run-ended takes exactly its three fields
    Bad("run-ended-no-body", *RUN_ENDED, body=b"", code="invalid_body"),
    Bad("run-ended-no-attempt", *RUN_ENDED, body={"exit_code": 3}),
    Bad("run-ended-no-exit-code", *RUN_ENDED, body={"attempt": 1}),
    Bad("run-ended-unknown-field", *RUN_ENDED, body={"attempt": 1, "exit_code": 3, "stderr": "x"}),
    Bad("run-ended-json-array", *RUN_ENDED, body=[1, 3], code="invalid_body"),
    # the right type, not an acceptable value
    Bad("create-label-newline", *CREATE, body={"title": "x", "labels": ["a\nb"]}, code="invalid_label"),
    Bad("create-label-empty", *CREATE, body={"title": "x", "labels": [""]}, code="invalid_label"),
    Bad("create-title-nul", *CREATE, body={"title": "a\u0000b"}),
    Bad("create-title-too-long", *CREATE, body={"title": "x" * 1001}),
    Bad("register-capability-space", *REGISTER, body={"agent_id": "z1", "agent_type": "t", "capabilities": ["a b"]},
        code="invalid_capability"),
    Bad("complete-pr-repo-traversal", *COMPLETE, body={"attempt": 1, "artifacts": [
        {"kind": "pull_request", "number": 3, "repo": "../etc"}]}, code="invalid_repo"),
    # ids in bodies: ../, NUL, newline, shell metacharacters, too long → refused, never used
    *[Bad(f"create-task-id-{v!r}", *CREATE, body={"title": "x", "task_id": v}, code="invalid_id") for v in BAD_IDS],
    *[Bad(f"register-agent-id-{v!r}", *REGISTER, body={"agent_id": v, "agent_type": "t"}, code="invalid_id")
      for v in ("../../etc", "a\u0000", "$(id)", "")],
    *[Bad(f"create-repo-{v!r}", *CREATE, body={"title": "x", "repo": v, "issue_number": 1}, code="invalid_repo")
      for v in ("../x", "o/r;rm -rf", "o/r/../../x", "o", "o/r\n")],
    Bad("receipts-task-id-traversal", "POST", "/api/v1/receipts", "alice", {"task_id": "../t-alice", "attempt": 1},
        code="invalid_id"),
    # ids in paths, encoded or raw: 400 (a refused id) or 404 (no such route), nothing else
    *[Bad(f"path-{t}", "GET", f"/api/v1/tasks/{t}", "admin", code="invalid_id") for t in BAD_PATH_IDS],
    Bad("path-dot-dot-segments", "GET", "/api/v1/tasks/../../etc/passwd", "admin", status=404, code="not_found"),
    Bad("path-cancel-traversal", "POST", "/api/v1/tasks/..%2Ft-queued/cancel", "admin", body={}, code="invalid_id"),
    Bad("path-run-ended-traversal", "POST", "/api/v1/tasks/..%2Ft-alice/run-ended", "alice",
        body={"attempt": 1, "exit_code": 3}, code="invalid_id"),
    Bad("path-complete-nul", "POST", "/api/v1/tasks/t-alice%00/complete", "alice", body={"attempt": 1},
        code="invalid_id"),
    # a raw NUL is not allowed in a request target at all: the framing refuses the request (h11)
    Bad("path-raw-nul", raw=request("GET", "/api/v1/tasks/a\x00b", token=ADMIN_TOKEN), code="bad_request"),
    Bad("path-raw-newline", raw=request("GET", "/api/v1/tasks/a\nb", token=ADMIN_TOKEN), status=(400, 401, 404),
        code=("bad_request", "unauthorized", "not_found")),
    Bad("path-raw-space", raw=request("GET", "/api/v1/tasks/a b", token=ADMIN_TOKEN), code="bad_request"),
    # query parameters
    *[Bad(f"query-{q}", "GET", f"/api/v1/tasks?{q}", "admin", code="invalid_query")
      for q in ("limit=abc", "limit=0", "limit=100000", "cursor=-1", "cursor=1e3", "state=finished", "state=queued,no")],
    *[Bad(f"query-agents-{q}", "GET", f"/api/v1/agents?{q}", "admin", code="invalid_query")
      for q in ("status=asleep", "mode=carrier")],
    # sizes and framing, refused before the body is read
    Bad("body-over-cap-post", raw=b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
        status=413, code="body_too_large"),
    Bad("body-over-cap-get", raw=b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
        status=413, code="body_too_large"),
    Bad("post-without-content-length", *CREATE, body=b'{"title": "x"}', length=False, status=411,
        code="length_required"),
    Bad("post-chunked", *CREATE, body=b'e\r\n{"title": "x"}\r\n0\r\n\r\n', length=False,
        headers=("Transfer-Encoding: chunked",), status=411, code="length_required"),
    Bad("post-chunked-and-length", *CREATE, body=b'{"title": "x"}', headers=("Transfer-Encoding: chunked",),
        code="bad_request"),
    Bad("post-length-and-identity-encoding", *CREATE, body=b'{"title": "x"}', headers=("Transfer-Encoding: identity",),
        code="bad_request"),
    Bad("content-length-not-a-number", raw=b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        code="bad_request"),
    Bad("content-length-negative", raw=b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        code="bad_request"),
    # RFC 9112 §6.3: Content-Length is 1*DIGIT (ASCII), and copies that disagree are refused, not last-wins
    *[Bad(f"content-length-{name}", *CREATE, body=b'{"title": "smuggled"}', length=False,
          headers=tuple(f"Content-Length: {v}" for v in values), code="bad_request")
      for name, values in (("plus-sign", ["+21"]), ("underscore", ["2_1"]), ("leading-underscore", ["_21"]),
                           ("trailing-underscore", ["21_"]), ("minus-zero", ["-0"]), ("hex", ["0x15"]),
                           ("superscript-digits", ["\u00b2\u00b9"]),
                           ("decimal-point", ["21.0"]), ("inner-space", ["2 1"]), ("empty", [""]),
                           ("two-fields-disagree", ["21", "5"]), ("two-fields-disagree-first-right", ["5", "21"]),
                           ("list-disagrees", ["21, 5"]), ("list-empty-member", ["21,"]),
                           ("vertical-tab", ["\x0b21"]))],
    Bad("content-length-two-fields-smuggle", raw=request("POST", "/api/v1/tasks", token=ADMIN_TOKEN,
        body=b'{"title": "a"}', length=False, headers=("Content-Length: 14", "Content-Length: 0")) +
        request("POST", "/api/v1/tasks", token=ADMIN_TOKEN, body=b'{"title": "b"}'), code="bad_request"),
    Bad("request-line-too-long", raw=b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", status=414,
        code="uri_too_long"),
    Bad("header-block-too-large", raw=b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"p" * 40_000 + b"\r\n\r\n",
        status=431, code="headers_too_large"),
    Bad("header-line-too-long", raw=b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"p" * 70_000 + b"\r\n\r\n",
        status=431, code="headers_too_large"),
    Bad("too-many-headers", raw=b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(120))
        + b"\r\n", status=431, code="headers_too_large"),
    Bad("request-line-garbage", raw=b"GARBAGE\r\n\r\n", code="bad_request"),
    Bad("http11-without-host", raw=b"GET /healthz HTTP/1.1\r\n\r\n", code="bad_request"),  # RFC 9112 §3.2
    Bad("content-length-over-20-digits", raw=b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + b"0" * 20 + b"21\r\n\r\n", code="bad_request"),
    Bad("http-version-2", raw=b"GET /healthz HTTP/2.0\r\n\r\n", status=505, code="http_version"),
    # routes and methods
    *[Bad(f"route-{p}", "GET", p, "admin", status=404, code="not_found")
      for p in ("/nope", "/api/v2/tasks", "/api/v1/tasks/a/b/c", "/api/v1/", "/healthz/", "/HEALTHZ")],
    Bad("method-delete-tasks", "DELETE", "/api/v1/tasks", "admin", status=405, code="method_not_allowed",
        allow="GET, POST"),
    Bad("method-put-healthz", "PUT", "/healthz", body=b"{}", status=405, code="method_not_allowed", allow="GET"),
    Bad("method-post-task", "POST", "/api/v1/tasks/t-alice", "admin", body={}, status=405,
        code="method_not_allowed", allow="GET"),
    Bad("method-get-register", "GET", "/api/v1/agents/register", "reg", status=405, code="method_not_allowed",
        allow="POST"),
    Bad("method-brew", "BREW", "/healthz", status=405, code="method_not_allowed", allow="GET"),
    # authentication (401) and authorisation (403)
    Bad("auth-missing", "GET", "/api/v1/tasks", status=401, code="unauthorized"),
    Bad("auth-missing-on-post", *CREATE[:2], body={"title": "x"}, status=401, code="unauthorized"),
    Bad("auth-unknown-token", "GET", "/api/v1/tasks", "=not-a-known-token", status=401, code="unauthorized"),
    Bad("auth-empty-bearer", "GET", "/api/v1/tasks", headers=("Authorization: Bearer ",), status=401,
        code="unauthorized"),
    Bad("auth-basic", "GET", "/api/v1/tasks", headers=(f"Authorization: Basic {ADMIN_TOKEN}",), status=401,
        code="unauthorized"),
    Bad("auth-token-too-long", "GET", "/api/v1/tasks", "=" + "t" * 600, status=401, code="unauthorized"),
    *[Bad(f"auth-deregistered-agent-{name}", "POST", path, "gone", body={}, status=401, code="unauthorized")
      for name, path in (("dequeue", "/api/v1/tasks/dequeue"), ("heartbeat", "/api/v1/agents/heartbeat"),
                         ("deregister", "/api/v1/agents/deregister"))],
    Bad("auth-admin-token-prefix", "GET", "/api/v1/tasks", "=" + ADMIN_TOKEN[:-1], status=401, code="unauthorized"),
    Bad("agent-token-on-admin-list", "GET", "/api/v1/tasks", "alice", status=403, code="forbidden"),
    Bad("agent-token-on-create", *CREATE[:2], "alice", body={"title": "x"}, status=403, code="forbidden"),
    Bad("agent-token-on-cancel", "POST", "/api/v1/tasks/t-alice/cancel", "alice", body={}, status=403,
        code="forbidden"),
    Bad("agent-token-on-register", *REGISTER[:2], "alice", body={"agent_id": "z1", "agent_type": "t"}, status=403,
        code="forbidden"),
    Bad("registration-token-on-list", "GET", "/api/v1/agents", "reg", status=403, code="forbidden"),
    Bad("registration-token-on-heartbeat", "POST", "/api/v1/agents/heartbeat", "reg", body={}, status=403,
        code="forbidden"),
    Bad("admin-token-on-dequeue", "POST", "/api/v1/tasks/dequeue", "admin", body={}, status=403, code="forbidden"),
    Bad("task-token-on-heartbeat", "POST", "/api/v1/agents/heartbeat", "alice-task", body={}, status=403,
        code="forbidden"),
    Bad("task-token-on-other-task", "POST", "/api/v1/tasks/t-queued/status", "alice-task", body={"attempt": 1},
        status=403, code="forbidden"),
    Bad("agent-completes-anothers-task", "POST", "/api/v1/tasks/t-alice/complete", "bob",
        body={"attempt": 1, "summary": "mine now"}, status=403, code="forbidden"),
    Bad("agent-reports-on-anothers-task", "POST", "/api/v1/tasks/t-alice/status", "bob",
        body={"attempt": 1, "status": "running"}, status=403, code="forbidden"),
    Bad("agent-reads-anothers-task", "GET", "/api/v1/tasks/t-alice", "bob", status=403, code="forbidden"),
    Bad("admin-token-on-run-ended", "POST", "/api/v1/tasks/t-alice/run-ended", "admin",
        body={"attempt": 1, "exit_code": 3}, status=403, code="forbidden"),
    Bad("task-token-run-ended-of-other-task", "POST", "/api/v1/tasks/t-queued/run-ended", "alice-task",
        body={"attempt": 1, "exit_code": 3}, status=403, code="forbidden"),
    Bad("agent-run-ended-of-anothers-task", "POST", "/api/v1/tasks/t-alice/run-ended", "bob",
        body={"attempt": 1, "exit_code": 3}, status=403, code="forbidden"),
    Bad("agent-receipt-for-anothers-task", "POST", "/api/v1/receipts", "bob", body={"task_id": "t-alice", "attempt": 1},
        status=403, code="forbidden"),
    # fencing: late and foreign writes change nothing
    Bad("late-completion-after-lease-lost", "POST", "/api/v1/tasks/t-late/complete", "late",
        body={"attempt": 1, "summary": "too late"}, status=409, code="lease_lost"),
    Bad("late-completion-task-token", "POST", "/api/v1/receipts", "late-task", body={"task_id": "t-late"},
        status=409, code="lease_lost"),
    Bad("late-status-after-lease-lost", "POST", "/api/v1/tasks/t-late/status", "late",
        body={"attempt": 1, "status": "running"}, status=409, code="lease_lost"),
    Bad("completion-of-a-future-attempt", *COMPLETE, body={"attempt": 2, "summary": "x"}, status=409,
        code="lease_lost"),
    Bad("task-token-names-another-attempt", "POST", "/api/v1/tasks/t-alice/complete", "alice-task",
        body={"attempt": 2}, status=409, code="lease_lost"),
    Bad("run-ended-task-token-names-another-attempt", *RUN_ENDED, body={"attempt": 2, "exit_code": 3}, status=409,
        code="lease_lost"),
    Bad("run-ended-of-an-attempt-another-agent-holds", "POST", "/api/v1/tasks/t-late/run-ended", "late",
        body={"attempt": 2, "exit_code": 3}, status=409, code="lease_lost"),
    Bad("completion-of-a-finished-task", "POST", "/api/v1/tasks/t-done/complete", "bob",
        body={"attempt": 1, "summary": "a different receipt"}, status=409, code="lease_lost"),
    # the state machine
    Bad("retry-a-queued-task", "POST", "/api/v1/tasks/t-queued/retry", "admin", body={}, status=422,
        code="invalid_transition"),
    Bad("retry-a-completed-task", "POST", "/api/v1/tasks/t-done/retry", "admin", body={}, status=422,
        code="invalid_transition"),
    Bad("cancel-a-completed-task", "POST", "/api/v1/tasks/t-done/cancel", "admin", body={}, status=422,
        code="invalid_transition"),
    # unknown things
    Bad("unknown-task", "GET", "/api/v1/tasks/t-nope", "admin", status=404, code="task_not_found"),
    Bad("unknown-task-cancel", "POST", "/api/v1/tasks/t-nope/cancel", "admin", body={}, status=404,
        code="task_not_found"),
    Bad("unknown-task-complete", "POST", "/api/v1/tasks/t-nope/complete", "alice", body={"attempt": 1}, status=404,
        code="task_not_found"),
    Bad("unknown-task-run-ended", "POST", "/api/v1/tasks/t-nope/run-ended", "alice", body={"attempt": 1, "exit_code": 3},
        status=404, code="task_not_found"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, case):
    before = world.fingerprint()
    started = time.monotonic()
    status, headers, body = send(world.port, case.encode(world))
    elapsed = time.monotonic() - started
    statuses = case.status if isinstance(case.status, tuple) else (case.status,)
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert status in statuses, (status, body)
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["error"]["code"] in codes, doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert b"Traceback" not in body and b'File "' not in body
    if case.allow is not None:
        assert headers["allow"] == case.allow
    assert elapsed < 3, f"answered after {elapsed:.1f}s"  # e.g. a 413 never waits for the body
    assert world.fingerprint() == before, "a refused request changed the database"
    assert send(world.port, request("GET", "/healthz"))[0] == 200


def test_a_slow_client_does_not_hold_up_the_others(world):
    before = world.fingerprint()
    slow_body = json.dumps({"title": "slow", "task_id": "t-slow"}).encode()
    stalled = []
    try:
        for _ in range(4):  # a few, each stalled halfway through its body (and one in its headers)
            sock = socket.create_connection(("127.0.0.1", world.port), timeout=TIMEOUT)
            sock.sendall(request("POST", "/api/v1/tasks", token=ADMIN_TOKEN, body=slow_body)[: -len(slow_body) // 2])
            stalled.append(sock)
        sock = socket.create_connection(("127.0.0.1", world.port), timeout=TIMEOUT)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stalled.append(sock)
        time.sleep(0.2)
        for _ in range(3):
            started = time.monotonic()
            assert send(world.port, request("GET", "/healthz"))[0] == 200
            status, _h, body = send(world.port, request("GET", "/api/v1/tasks/t-alice", token=ADMIN_TOKEN))
            assert status == 200 and json.loads(body)["task_id"] == "t-alice"
            assert time.monotonic() - started < 2
        assert world.fingerprint() == before, "a half-sent request was acted on"
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.2)
    assert world.fingerprint() == before, "a cut-off request was acted on"
    assert send(world.port, request("GET", "/healthz"))[0] == 200


@pytest.mark.parametrize("lengths", [["21"], ["21, 21"], ["21", "21"], [" 021 "], ["\t21"], ["0" * 10 + "21"]])
def test_content_length_copies_that_agree_are_accepted(world, lengths):
    """RFC 9112 §6.3 allows repeated (or listed) Content-Length values when they are all the same number."""
    body = json.dumps({"title": "framed"}).encode()  # 19 bytes … padded to 21
    body = body[:-1] + b"  }"
    status, _headers, answer = send(world.port, request("POST", "/api/v1/tasks", token=ADMIN_TOKEN, body=body,
                                                        length=False,
                                                        headers=tuple(f"Content-Length: {v}" for v in lengths)))  # fmt: skip
    assert status == 201, answer
    assert json.loads(answer)["title"] == "framed"
