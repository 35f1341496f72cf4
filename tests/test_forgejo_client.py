"""The Forgejo client against the fake Forgejo over real HTTP (no mocks), and the fake against the swagger.

- every route the client can call, and every route the fake serves, is in Forgejo's ``swagger.v1.json``;
- every body the fake answers validates against the swagger's response schema (objects closed: a key the
  swagger does not list is an error, except ``username`` on users, which real Forgejo adds);
- the client's paging, filters, 404 -> None, error messages, retries, timeouts and size bound;
- the fake's webhook deliveries are byte-shaped like Forgejo's and signed.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO_ROOT
from fakes.forgejo import ROUTE_TEMPLATES, FakeForgejo, forgejo_json

from fleetctl.errors import ExitCode, RemoteError
from fleetctl.forgejo import client as client_module
from fleetctl.forgejo.client import ROUTES, ForgejoClient, ForgejoError, retry_after_secs

#: Go ``*string`` fields the swagger types as plain strings; Forgejo sends null for them (see the samples).
GO_STRING_POINTERS = {("PullRequest", "merge_commit_sha")}
SHARED = REPO_ROOT.parent / "shared" / "forgejo"
REPO = "acme/widgets"


def _shared(name: str):
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must provide shared/forgejo next to the checkout")
        pytest.skip(f"{path} is missing (it lives next to the checkout); these checks run in CI")
    return path


@pytest.fixture(scope="module")
def swagger() -> dict:
    return json.loads(_shared("swagger.v1.json").read_text())


@pytest.fixture
def client(forgejo):
    """The bot's client; no real sleeping between retries."""
    with ForgejoClient(forgejo.url, forgejo.bot_token, sleep=lambda s: None) as c:
        yield c


# ------------------------------------------------------------------------------------------------------
# the swagger


def test_every_client_route_is_in_the_swagger(swagger):
    missing = [(m, t) for m, t in ROUTES.values() if m.lower() not in swagger["paths"].get(t, {})]
    assert not missing, f"the client calls routes Forgejo does not have: {missing}"


def test_every_fake_route_is_in_the_swagger(swagger):
    missing = [(m, t) for m, t in ROUTE_TEMPLATES if m.lower() not in swagger["paths"].get(t, {})]
    assert not missing, f"the fake serves routes Forgejo does not have: {missing}"
    assert {t for t in ROUTES.values()} <= set(ROUTE_TEMPLATES), "the fake must serve every route of the client"


def _closed_definitions(swagger: dict) -> dict:
    """The swagger's definitions as JSON Schema: Go's nil pointers/slices/times may be null, and objects are
    closed (no key the swagger does not list) except ``username`` on User, which real Forgejo sends."""
    defs = copy.deepcopy(swagger["definitions"])
    for name, schema in defs.items():
        props = schema.get("properties")
        if not props:
            continue
        for key, prop in list(props.items()):
            pointer = (name, key) in GO_STRING_POINTERS or "$ref" in prop or prop.get("format") == "date-time"
            if pointer or prop.get("type") in ("array", "object"):
                props[key] = {"anyOf": [prop, {"type": "null"}]}
        if name == "User":
            props["username"] = {"type": "string"}
        schema["additionalProperties"] = False
    return defs


def _response_schema(swagger: dict, method: str, template: str, status: int) -> dict | None:
    responses = swagger["paths"][template][method.lower()]["responses"]
    resp = responses.get(str(status))
    if resp is None:
        return None
    if "$ref" in resp:
        resp = swagger["responses"][resp["$ref"].rsplit("/", 1)[-1]]
    return resp.get("schema")


def test_every_fake_answer_validates_against_the_swagger(forgejo, swagger):
    import httpx
    import jsonschema

    defs = _closed_definitions(swagger)
    n = forgejo.open_issue(REPO, "An issue", "body <b>", labels=["agent-task", "status/ready"])
    forgejo.comment(REPO, n, "a human comment")
    pr = forgejo.open_pull(REPO, "agent/issue-1", body=f"Closes #{n}")
    forgejo.comment(REPO, pr, "on the PR")
    merged = forgejo.open_pull(REPO, "agent/other")
    forgejo.merge_pull(REPO, merged)
    review = forgejo.review(REPO, pr, "REQUEST_CHANGES", "not yet", comments=[("a.py", 3, "rename")])
    label = forgejo.label_id(REPO, "agent-task")
    calls = [
        ("GET", "/user", None), ("GET", "/version", None), ("GET", f"/repos/{REPO}", None),
        ("GET", "/repos/acme/nope", None), ("GET", f"/repos/{REPO}/issues?state=all&limit=1", None),
        ("GET", f"/repos/{REPO}/issues/{n}", None), ("GET", f"/repos/{REPO}/issues/{pr}", None),
        ("GET", f"/repos/{REPO}/issues/999", None), ("PATCH", f"/repos/{REPO}/issues/{n}", {"title": "Renamed"}),
        ("POST", f"/repos/{REPO}/issues", {"title": "via API", "labels": [label]}),
        ("GET", f"/repos/{REPO}/issues/{n}/comments", None), ("GET", f"/repos/{REPO}/issues/{pr}/comments", None),
        ("POST", f"/repos/{REPO}/issues/{n}/comments", {"body": "bot comment"}),
        ("POST", f"/repos/{REPO}/issues/{pr}/comments", {"body": "bot on PR"}),
        ("GET", f"/repos/{REPO}/issues/{n}/labels", None),
        ("POST", f"/repos/{REPO}/issues/{n}/labels", {"labels": ["status/ready"]}),
        ("PUT", f"/repos/{REPO}/issues/{n}/labels", {"labels": [label]}),
        ("POST", f"/repos/{REPO}/issues/{n}/labels", {"labels": [label, "x"]}),
        ("DELETE", f"/repos/{REPO}/issues/{n}/labels/{label}", None),
        ("DELETE", f"/repos/{REPO}/issues/{n}/labels/99999", None), ("DELETE", f"/repos/{REPO}/issues/{n}/labels", None),
        ("GET", f"/repos/{REPO}/labels", None), ("POST", f"/repos/{REPO}/labels", {"name": "x", "color": "#f00"}),
        ("POST", f"/repos/{REPO}/labels", {"name": "x", "color": "red"}),
        ("GET", f"/repos/{REPO}/pulls?state=all", None), ("GET", f"/repos/{REPO}/pulls/{pr}", None),
        ("GET", f"/repos/{REPO}/pulls/{n}", None), ("GET", f"/repos/{REPO}/pulls/main/agent/issue-1", None),
        ("GET", f"/repos/{REPO}/pulls/main/agent/nope", None), ("GET", f"/repos/{REPO}/pulls/{merged}/merge", None),
        ("GET", f"/repos/{REPO}/pulls/{pr}/merge", None),
        ("POST", f"/repos/{REPO}/pulls", {"head": "agent/issue-1", "base": "main", "title": "again"}),
        ("GET", f"/repos/{REPO}/branches/main", None), ("GET", f"/repos/{REPO}/branches/nope", None),
        ("GET", f"/repos/{REPO}/pulls/{pr}/reviews", None), ("GET", f"/repos/{REPO}/pulls/{pr}/reviews/{review}/comments", None),
        ("GET", f"/repos/{REPO}/pulls/{pr}/reviews/999/comments", None),
        ("GET", f"/repos/{REPO}/collaborators/alice/permission", None),  # 403: the bot is no admin of the repo
        ("GET", f"/repos/{REPO}/collaborators/fleet-bot/permission", None),  # its own: allowed
        ("GET", f"/repos/{REPO}/collaborators/nobody/permission", None),
    ]  # fmt: skip
    forgejo.push_branch(REPO, "agent/api")
    calls.append(("POST", f"/repos/{REPO}/pulls", {"head": "agent/api", "base": "main", "title": "new"}))
    forgejo.add_hook(REPO, "https://fleet.example.org/api/v1/webhooks/forgejo")
    calls.append(("GET", f"/repos/{REPO}/hooks", None))  # 403: the bot is no admin of the repository
    calls.append(("GET", f"/repos/{REPO}/hooks", "admin"))  # listed to an admin
    headers = {"Authorization": f"token {forgejo.bot_token}"}
    checked = 0
    with httpx.Client(base_url=forgejo.url + "/api/v1", headers=headers) as http:
        for method, path, body in calls:
            if body == "admin":
                forgejo.set_permission(REPO, "fleet-bot", "admin")
                body = None
            resp = http.request(method, path, json=body)
            verb, template, status = forgejo.requests[-1]
            assert (verb, status) == (method, resp.status_code) and template, (method, path)
            schema = _response_schema(swagger, method, template, status)
            if 200 <= status < 300:
                assert str(status) in swagger["paths"][template][method.lower()]["responses"], (method, template)
            if status == 204:
                assert resp.content == b""
            if schema is None:
                continue
            jsonschema.Draft4Validator({"definitions": defs, "allOf": [schema]}).validate(resp.json())
            checked += 1
    statuses = {(m, t, s) for m, t, s in forgejo.requests}
    assert {(m, t) for m, t, s in statuses if s < 300} == set(ROUTE_TEMPLATES), "a route was not exercised"
    assert {s for _, _, s in statuses} >= {200, 201, 204, 400, 404, 409, 422}
    assert checked >= 30
    assert all(t in swagger["paths"] for _, t, _ in forgejo.requests)


def test_the_webhook_payloads_validate_against_the_swagger_objects(forgejo, swagger):
    import jsonschema

    defs = _closed_definitions(swagger)
    n = forgejo.open_issue(REPO, "An issue", labels=["agent-task"])
    forgejo.comment(REPO, n, "hello")
    pr = forgejo.open_pull(REPO, "agent/x", body=f"Fixes #{n}")
    forgejo.merge_pull(REPO, pr)

    def check(obj, name):
        jsonschema.Draft4Validator({"definitions": defs, "$ref": f"#/definitions/{name}"}).validate(obj)

    for _, body in forgejo.deliveries:
        doc = json.loads(body)
        check(doc["repository"], "Repository")
        check(doc["sender"], "User")
        if "issue" in doc:
            check(doc["issue"], "Issue")
        if "pull_request" in doc:
            check(doc["pull_request"], "PullRequest")
        if "comment" in doc:
            check(doc["comment"], "Comment")


# ------------------------------------------------------------------------------------------------------
# the client


def test_it_is_a_remote_error_with_exit_code_5():
    err = ForgejoError("x", status=503, retryable=True)
    assert isinstance(err, RemoteError) and err.exit_code == ExitCode.REMOTE and err.code == "forgejo_error"


def test_whoami_version_and_repo(client, forgejo):
    assert client.whoami()["login"] == "fleet-bot"
    assert client.version() == "11.0.1+gitea-1.22.0"
    repo = client.get_repo(REPO)
    assert repo["full_name"] == REPO and repo["default_branch"] == "main"
    with pytest.raises(ForgejoError) as info:
        client.get_repo("acme/nope")
    assert info.value.status == 404 and not info.value.retryable


def test_list_issues_pages_through_120(client, forgejo):
    for i in range(120):
        forgejo.open_issue(REPO, f"issue {i}")
    forgejo.requests.clear()
    numbers = [issue["number"] for issue in client.list_issues(REPO)]
    assert numbers == list(range(120, 0, -1))
    pages = [r for r in forgejo.requests if r[1] == "/repos/{owner}/{repo}/issues"]
    assert len(pages) == 3  # 50 + 50 + 20 (a short page ends the walk)


def test_the_fake_sends_total_count_and_link_headers(forgejo):
    import httpx

    for i in range(7):
        forgejo.open_issue(REPO, f"issue {i}")
    r = httpx.get(f"{forgejo.url}/api/v1/repos/{REPO}/issues", params={"limit": 3, "page": 2},
                  headers={"Authorization": f"token {forgejo.bot_token}"})  # fmt: skip
    assert r.headers["X-Total-Count"] == "7" and len(r.json()) == 3
    assert 'rel="next"' in r.headers["Link"] and 'rel="last"' in r.headers["Link"] and "page=3" in r.headers["Link"]
    r = httpx.get(f"{forgejo.url}/api/v1/repos/{REPO}/issues", params={"limit": 500},
                  headers={"Authorization": f"token {forgejo.bot_token}"})  # fmt: skip
    assert len(r.json()) == 7
    forgejo.requests.clear()


def test_type_issues_leaves_pull_requests_out(client, forgejo):
    n = forgejo.open_issue(REPO, "an issue")
    pr = forgejo.open_pull(REPO, "agent/x")
    assert [i["number"] for i in client.list_issues(REPO)] == [n]
    both = list(client.list_issues(REPO, type=None))
    assert [i["number"] for i in both] == [pr, n] and both[0]["pull_request"]["html_url"].endswith(f"/pulls/{pr}")


def test_the_labels_filter_needs_all_names_and_drops_unknown_ones(client, forgejo):
    a = forgejo.open_issue(REPO, "a", labels=["a"])
    ab = forgejo.open_issue(REPO, "ab", labels=["a", "b"])
    b = forgejo.open_issue(REPO, "b", labels=["b"])
    none = forgejo.open_issue(REPO, "none")

    def numbers(labels):
        return sorted(i["number"] for i in client.list_issues(REPO, labels=labels))

    assert numbers(["a", "b"]) == [ab]
    assert numbers(["a", "no-such-label"]) == [a, ab]
    assert numbers(["no-such-label"]) == [a, ab, b, none]  # no known name: no filter at all (API-NOTES §2)
    assert numbers(["A"]) == [a, ab, b, none]  # names are case-sensitive


def test_list_issues_state_and_since(client, forgejo):
    n = forgejo.open_issue(REPO, "x")
    forgejo.close_issue(REPO, n)
    assert list(client.list_issues(REPO)) == []
    assert [i["number"] for i in client.list_issues(REPO, state="closed")] == [n]
    assert list(client.list_issues(REPO, state="all", since="2999-01-01T00:00:00Z")) == []


def test_pull_by_branch_with_slashes_in_any_state(client, forgejo):
    branch = "agent/issue-7/retry#2"
    pr = forgejo.open_pull(REPO, branch, title="Retry")
    found = client.pull_by_branch(REPO, "main", branch)
    assert found["number"] == pr and found["head"]["label"] == branch and found["head"]["ref"] == branch
    forgejo.merge_pull(REPO, pr)
    assert client.pull_by_branch(REPO, "main", branch)["merged"] is True
    assert client.pull_by_branch(REPO, "main", "agent/issue-7") is None
    assert client.pull_by_branch(REPO, "develop", branch) is None


def test_get_pull_is_none_for_a_plain_issue_and_get_issue_for_nothing(client, forgejo):
    n = forgejo.open_issue(REPO, "plain")
    pr = forgejo.open_pull(REPO, "agent/y")
    assert client.get_pull(REPO, n) is None
    assert client.get_pull(REPO, pr)["head"]["repo"]["full_name"] == REPO
    assert client.get_issue(REPO, pr)["pull_request"]["merged"] is False
    assert client.get_issue(REPO, 999) is None and client.get_pull(REPO, 999) is None


def test_reviews_and_their_inline_comments_and_none_for_what_is_not_there(client, forgejo):
    n = forgejo.open_issue(REPO, "plain")
    pr = forgejo.open_pull(REPO, "agent/r")
    review = forgejo.review(REPO, pr, "REQUEST_CHANGES", "no", comments=[("a.py", 3, "new"), ("b.py", -4, "old")])
    (got,) = client.list_reviews(REPO, pr)
    assert (got["id"], got["state"], got["body"], got["dismissed"]) == (review, "REQUEST_CHANGES", "no", False)
    assert [(c["path"], c["position"], c["original_position"], c["body"])
            for c in client.review_comments(REPO, pr, review)] == [("a.py", 3, 0, "new"), ("b.py", 0, 4, "old")]  # fmt: skip
    # a plain issue or no such pull request: no reviews (the rework goes on with the webhook's body only)
    assert client.list_reviews(REPO, n) == [] and client.list_reviews(REPO, 999) == []
    assert client.review_comments(REPO, pr, 999) is None


def test_comments_and_labels(client, forgejo):
    n = forgejo.open_issue(REPO, "x")
    comment = client.create_comment(REPO, n, "Picked up: task t-1 <b>")
    assert comment["html_url"].endswith(f"/issues/{n}#issuecomment-{comment['id']}")
    assert [c["body"] for c in client.list_comments(REPO, n)] == ["Picked up: task t-1 <b>"]
    label = client.create_label(REPO, "status/in-progress", "#1D76DB", "an agent works on it")
    assert label["color"] == "1d76db"
    assert client.create_label(REPO, "status/in-progress", "abc")["color"] == "aabbcc"  # duplicates are allowed
    assert [lb["name"] for lb in client.add_labels(REPO, n, [label["id"]])] == ["status/in-progress"]
    assert forgejo.labels_of(REPO, n) == ["status/in-progress"]
    assert client.remove_label(REPO, n, label["id"]) is None and forgejo.labels_of(REPO, n) == []
    assert client.remove_label(REPO, n, label["id"]) is None  # already gone
    assert client.remove_label(REPO, n, 99999) is None  # 422 unknown label: fine
    assert len(client.list_labels(REPO)) == 2


def test_list_labels_pages(client, forgejo):
    for i in range(55):
        forgejo.label_id(REPO, f"label-{i:02}")
    assert [lb["name"] for lb in client.list_labels(REPO)] == [f"label-{i:02}" for i in range(55)]


def test_api_changes_send_webhooks_with_the_bot_as_sender(client, forgejo):
    n = forgejo.open_issue(REPO, "x")
    label = client.create_label(REPO, "agent-task", "#0e8a16")
    forgejo.deliveries.clear()
    client.add_labels(REPO, n, [label["id"]])
    client.add_labels(REPO, n, [label["id"]])  # nothing visible changes: still label_updated
    client.create_comment(REPO, n, "hi")
    events = [(h["X-Forgejo-Event-Type"], json.loads(b)["action"], json.loads(b)["sender"]["login"])
              for h, b in forgejo.deliveries]  # fmt: skip
    assert events == [("issue_label", "label_updated", "fleet-bot")] * 2 + [("issue_comment", "created", "fleet-bot")]


def test_a_bad_token_is_401_naming_the_setting_without_the_token(forgejo):
    token = "sekrit-0123456789abcdef"
    with ForgejoClient(forgejo.url, token, sleep=lambda s: None) as c, pytest.raises(ForgejoError) as info:
        c.get_issue(REPO, 1)
    assert info.value.status == 401 and not info.value.retryable
    assert "forgejo.token" in info.value.message and token not in str(info.value) and token not in repr(info.value)
    with ForgejoClient(forgejo.url, None) as anonymous, pytest.raises(ForgejoError) as info:
        anonymous.whoami()
    assert info.value.status == 401


def test_a_token_without_the_scope_is_403_and_a_bad_colour_422(forgejo, client):
    n = forgejo.open_issue(REPO, "x")
    token = forgejo.add_user("reader", scopes=("read:issue", "read:repository"))
    with ForgejoClient(forgejo.url, token) as c:
        assert c.get_issue(REPO, n)["number"] == n
        with pytest.raises(ForgejoError) as info:
            c.create_comment(REPO, n, "no")
    assert info.value.status == 403 and "scopes" in info.value.message and token not in info.value.message
    with pytest.raises(ForgejoError) as info:
        client.create_label(REPO, "bad", "not-a-colour")
    assert info.value.status == 422 and "not a valid color" in info.value.message


def test_retries_back_off_exponentially_and_honour_retry_after(forgejo):
    delays: list[float] = []
    n = forgejo.open_issue(REPO, "x")
    with ForgejoClient(forgejo.url, forgejo.bot_token, sleep=delays.append, retries=2, backoff=0.5) as c:
        forgejo.fail_next(2, 500)
        assert c.get_issue(REPO, n)["number"] == n
        assert delays == [0.5, 1.0]
        delays.clear()
        forgejo.fail_next(1, 429, retry_after=3)
        assert c.get_issue(REPO, n)["number"] == n
        assert delays == [3.0]
        delays.clear()
        forgejo.fail_next(3, 503, retry_after=3600)
        with pytest.raises(ForgejoError) as info:
            c.get_issue(REPO, n)
    assert delays == [30.0, 30.0]  # Retry-After is capped at max_backoff
    assert info.value.status == 503 and info.value.retryable


def test_retry_after_as_an_http_date():
    assert retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_secs("7") == 7.0 and retry_after_secs("soon") is None and retry_after_secs(None) is None


def test_a_post_is_not_retried_after_a_500_but_is_after_a_503(forgejo):
    delays: list[float] = []
    n = forgejo.open_issue(REPO, "x")
    with ForgejoClient(forgejo.url, forgejo.bot_token, sleep=delays.append) as c:
        forgejo.requests.clear()
        forgejo.fail_next(1, 500)
        with pytest.raises(ForgejoError) as info:
            c.create_comment(REPO, n, "once")
        assert info.value.status == 500 and info.value.retryable and delays == []
        assert len(forgejo.requests) == 1 and forgejo.comments(REPO, n) == []
        forgejo.fail_next(1, 503)
        c.create_comment(REPO, n, "after a 503")
    assert delays == [0.5] and [c["body"] for c in forgejo.comments(REPO, n)] == ["after a 503"]


def test_a_server_that_is_down_is_a_retryable_error_without_status(forgejo):
    delays: list[float] = []
    with ForgejoClient(forgejo.url, forgejo.bot_token, sleep=delays.append, retries=1) as c:
        forgejo.down()
        with pytest.raises(ForgejoError) as info:
            c.whoami()
        assert info.value.status is None and info.value.retryable and delays == [0.5]
        assert info.value.message.startswith(f"cannot reach Forgejo at {forgejo.url}")
        forgejo.up()
        assert c.whoami()["login"] == "fleet-bot"


def test_a_hanging_server_times_out_within_the_timeout(forgejo):
    forgejo.hang_next(1, 2.0)
    with ForgejoClient(forgejo.url, forgejo.bot_token, timeout=0.5, retries=0) as c:
        started = time.monotonic()
        with pytest.raises(ForgejoError) as info:
            c.whoami()
        elapsed = time.monotonic() - started
    assert elapsed < 1.5 and info.value.status is None and info.value.retryable and "timed out" in info.value.message


def test_a_huge_answer_is_refused(client, forgejo):
    n = forgejo.open_issue(REPO, "huge", body="x" * (client_module.MAX_RESPONSE_BYTES + 1))
    with pytest.raises(ForgejoError, match="too large"):
        client.get_issue(REPO, n)


def test_a_bad_repo_name_is_refused_before_any_request(client, forgejo):
    forgejo.requests.clear()
    for bad in ("acme", "acme/widgets/x", "/widgets"):
        with pytest.raises(ForgejoError, match="owner/name"):
            client.get_repo(bad)
    assert forgejo.requests == []


# ------------------------------------------------------------------------------------------------------
# the fake's webhooks


class _Receiver:
    """A webhook receiver: records every POST and answers 200."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append((dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_webhook_bytes_headers_and_signatures(forgejo):
    receiver = _Receiver()
    secret = "s3cr3t-webhook-key"
    forgejo.set_hook(receiver.url, secret)
    try:
        forgejo.open_issue(REPO, "Fix <script> & co", body="a > b", labels=["agent-task"])
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    assert [(h["X-Forgejo-Event-Type"], json.loads(b)["action"]) for h, b in forgejo.deliveries] == [
        ("issues", "opened"), ("issue_label", "label_updated")]  # fmt: skip
    assert [b for _, b in receiver.got] == [b for _, b in forgejo.deliveries]
    assert [s for s, _ in forgejo.delivery_results] == [200, 200]
    for headers, body in forgejo.deliveries:
        doc = json.loads(body)
        assert forgejo_json(doc) == body and not body.endswith(b"\n") and body.startswith(b'{\n  "action": ')
        assert b"<" not in body and b">" not in body and b"&" not in body
        assert b"\\u003cscript\\u003e \\u0026 co" in body and doc["issue"]["title"] == "Fix <script> & co"
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        for name in ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Gogs-Signature"):
            assert hmac.compare_digest(headers[name], expected)
        assert headers["X-Hub-Signature-256"] == f"sha256={expected}"
        assert headers["X-Hub-Signature"] == "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
        delivery = headers["X-Forgejo-Delivery"]
        assert uuid.UUID(delivery).version == 4 and headers["Content-Type"] == "application/json"
        for prefix in ("Gitea", "Gogs", "GitHub"):
            assert headers[f"X-{prefix}-Delivery"] == delivery
            assert headers[f"X-{prefix}-Event"] == headers["X-Forgejo-Event"] == "issues"
            assert headers[f"X-{prefix}-Event-Type"] == headers["X-Forgejo-Event-Type"]
        received = next(h for h, b in receiver.got if h["X-Forgejo-Delivery"] == delivery)
        assert received["X-Forgejo-Signature"] == expected
    assert len({h["X-Forgejo-Delivery"] for h, _ in forgejo.deliveries}) == 2


def test_an_empty_secret_still_sends_empty_signature_headers(forgejo):
    forgejo.open_issue(REPO, "x")
    headers, _ = forgejo.deliveries[0]
    assert headers["X-Forgejo-Signature"] == "" and headers["X-Hub-Signature-256"] == "sha256="


def test_the_encoder_reproduces_forgejos_bytes_and_the_fake_its_key_order(forgejo):
    index = json.loads(_shared("webhooks/index.json").read_text())
    samples = {}
    for entry in index["files"]:
        if entry.get("provenance") != "assembled-v11":
            continue
        raw = (SHARED / "webhooks" / entry["file"]).read_bytes()
        assert forgejo_json(json.loads(raw)) == raw, entry["file"]
        samples[entry["file"]] = json.loads(raw)

    n = forgejo.open_issue(REPO, "x", labels=["a"])
    forgejo.edit_issue(REPO, n, title="y")
    forgejo.comment(REPO, n, "hi")
    pr = forgejo.open_pull(REPO, "agent/z", body=f"Resolves #{n}")
    forgejo.comment(REPO, pr, "on the PR")
    forgejo.review(REPO, pr, "REQUEST_CHANGES", "no")
    forgejo.merge_pull(REPO, pr)
    produced = {(h["X-Forgejo-Event-Type"], json.loads(b)["action"]): json.loads(b) for h, b in forgejo.deliveries}
    pairs = {
        ("issues", "opened"): "issues-opened.json", ("issue_label", "label_updated"): "issue_label-label_updated.json",
        ("issues", "edited"): "issues-edited.json", ("issue_comment", "created"): "issue_comment-created.json",
        ("pull_request", "opened"): "pull_request-opened.json",
        ("pull_request_comment", "created"): "pull_request_comment-created.json",
        ("pull_request_review_rejected", "reviewed"): "pull_request_review_rejected-reviewed.json",
        ("pull_request", "closed"): "pull_request-closed-merged.json", ("issues", "closed"): "issues-closed.json",
    }  # fmt: skip

    def same_order(ours, theirs, where):
        if isinstance(ours, dict) and isinstance(theirs, dict):
            assert list(ours) == list(theirs), f"{where}: {list(ours)} != {list(theirs)}"
            for key in ours:
                same_order(ours[key], theirs[key], f"{where}.{key}")
        elif isinstance(ours, list) and isinstance(theirs, list) and ours and theirs:
            same_order(ours[0], theirs[0], f"{where}[0]")

    for key, sample in pairs.items():
        same_order(produced[key], samples[sample], sample)


def test_a_merge_closes_the_referenced_issue_with_the_merge_sha(forgejo):
    n = forgejo.open_issue(REPO, "x")
    other = forgejo.open_issue(REPO, "untouched")
    pr = forgejo.open_pull(REPO, "agent/fix", title="Fix x", body=f"Closes #{n}\n\nsee #{other}")
    forgejo.deliveries.clear()
    sha = forgejo.merge_pull(REPO, pr, user="alice")
    (h1, b1), (h2, b2) = forgejo.deliveries
    closed_pr, closed_issue = json.loads(b1), json.loads(b2)
    assert h1["X-Forgejo-Event"] == "pull_request" and closed_pr["action"] == "closed"
    assert closed_pr["pull_request"]["merged"] is True and closed_pr["pull_request"]["merge_commit_sha"] == sha
    assert h2["X-Forgejo-Event-Type"] == "issues" and closed_issue["action"] == "closed"
    assert closed_issue["number"] == n and closed_issue["commit_id"] == sha
    assert closed_issue["sender"]["login"] == "alice"
    assert forgejo.issue(REPO, other)["state"] == "open"


def test_opening_a_second_pull_request_for_the_same_branch_is_409(forgejo, client):
    import httpx

    forgejo.open_pull(REPO, "agent/dup")
    r = httpx.post(f"{forgejo.url}/api/v1/repos/{REPO}/pulls", json={"head": "agent/dup", "base": "main"},
                   headers={"Authorization": f"Bearer {forgejo.bot_token}"})  # fmt: skip
    assert r.status_code == 409 and "already exists" in r.json()["message"]


def test_the_fake_answers_unknown_tokens_401_everywhere(forgejo):
    import httpx

    for path in ("/version", f"/repos/{REPO}", f"/repos/{REPO}/issues"):
        r = httpx.get(f"{forgejo.url}/api/v1{path}", headers={"Authorization": "token nope"})
        assert r.status_code == 401 and r.json()["message"].startswith("user does not exist")
    r = httpx.get(f"{forgejo.url}/api/v1/user")
    assert r.status_code == 401 and r.json() == {"message": "token is required", "url": f"{forgejo.url}/api/swagger"}
    r = httpx.get(f"{forgejo.url}/api/v1/user", headers={"Authorization": f"Token {forgejo.bot_token}"})
    assert r.status_code == 401  # the word `token` must be lowercase
    r = httpx.get(f"{forgejo.url}/api/v1/user", headers={"Authorization": f"BEARER {forgejo.bot_token}"})
    assert r.status_code == 200


def test_a_fresh_fake_is_independent():
    fake = FakeForgejo().start()
    try:
        fake.add_repo("o/r")
        assert fake.open_issue("o/r", "one") == 1 and fake.open_pull("o/r", "b") == 2  # one number sequence
    finally:
        fake.stop()
