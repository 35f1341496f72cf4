"""schemathesis against docs/openapi.json on a live ``fleetctl serve``: no 5xx, nothing outside the schema.

The server is a real subprocess on a free port, started once for this module. Every operation gets the
token kind the document says it takes (``x-token-kinds``): admin, registration, or a registered pull
agent's own token. The agent holds a claimed task whose id is the document's path example, so generated
requests also reach a task that exists. Generated data rarely walks a task through its life, so a second
test does, deterministically: every operation's main outcomes, each reply validated against the document.

Checks: no server error; status codes, content types, headers and bodies as documented; data that
violates the schema is refused with a 4xx; undeclared methods answer 405 with ``Allow``; a protected
operation refuses a request without (or with a wrong) token. Bounded: a fixed seed, derandomised
Hypothesis, at most ``MAX_EXAMPLES`` generated cases per operation and phase.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import ADMIN_TOKEN, REGISTRATION_TOKEN, LiveServer, stop_cleanly
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
MAX_EXAMPLES = 25
SEED = 20240611
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    ignored_auth,
]
AGENT_ID = "contract-agent"
CAPABILITY = "contract"

schema = schemathesis.openapi.from_path(
    DOC,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "mode": "all",
                "allow-extra-parameters": False,
                "with-security-parameters": False,
            },
        }
    ),
)
EXAMPLE_TASK_ID = json.loads(DOC.read_text())["paths"]["/api/v1/tasks/{task_id}"]["get"]["parameters"][0]["example"]


class ContractServer:
    """The live server plus a token for every kind an operation may ask for."""

    def __init__(self, server: LiveServer):
        self.server = server
        self.url = server.url
        self.agent_token = server.register(AGENT_ID, [CAPABILITY], max_concurrency=1000)
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            r = admin.post("/api/v1/tasks", json={"task_id": EXAMPLE_TASK_ID, "title": "the documented example",
                                                  "labels": [f"agent:{CAPABILITY}"]})  # fmt: skip
            assert r.status_code == 201, r.text
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.agent_token}"}) as agent:
            r = agent.post("/api/v1/tasks/dequeue", json={})
            assert r.status_code == 200 and r.json()["task"]["task_id"] == EXAMPLE_TASK_ID, r.text

    def headers_for(self, operation) -> dict[str, str]:
        kinds = operation.definition.raw.get("x-token-kinds") or []
        if not kinds:
            return {}
        token = {"admin": ADMIN_TOKEN, "registration": REGISTRATION_TOKEN, "agent": self.agent_token}[kinds[0]]
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("contract")).start()
    try:
        yield ContractServer(server)
    finally:
        stop_cleanly(server)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_the_live_server_keeps_its_documented_contract(case, contract_server):
    if case.operation.path == "/api/v1/tasks/dequeue" and isinstance(case.body, dict):
        wait = case.body.get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0.2:
            case.body["wait"] = 0.2  # a long-poll per example would take minutes; 0.2 s still waits
    excluded = [negative_data_rejection] if _lenient_query(case.query) else []
    case.call_and_validate(base_url=contract_server.url, headers=contract_server.headers_for(case.operation),
                           checks=CHECKS, excluded_checks=excluded, timeout=15)  # fmt: skip


def _lenient_query(query: dict | None) -> bool:
    """True for a query the API reads leniently, as documented: an empty parameter counts as absent, and of
    a repeated one (other than ``state``) the last wins — so a mutation hidden there is not refused."""
    for name, value in (query or {}).items():
        items = value if isinstance(value, list) else [value]
        if len(items) > 1 and name != "state":
            return True
        if any(v == "" or isinstance(v, dict | list) for v in items):
            return True
    return False


# ------------------------------------------------------------------------------------------------------
# A walk through every documented outcome, each response checked against the document


@pytest.fixture
def served(tmp_path):
    """A live server (short backoff, so a failed attempt is claimable again at once); must stop with 0."""
    server = LiveServer(tmp_path, retry_backoff_secs=0.01, retry_backoff_max_secs=0.01).start()
    try:
        yield server
    finally:
        stop_cleanly(server)


class Walker:
    """Calls the live server and checks each answer: the expected status, documented for the operation,
    a body that validates against the document, and never a traceback."""

    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=15)
        self.doc = json.loads(DOC.read_text())
        self.seen: set[tuple[str, str, int]] = set()

    def call(self, method: str, url: str, status: int, *, token: str | None = None, json_body=None,
             operation: str | None = None) -> httpx.Response:  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.client.request(method, url, headers=headers, json=json_body)
        assert r.status_code == status, f"{method} {url}: {r.status_code} {r.text}"
        assert b"Traceback" not in r.content
        path = operation or url.split("?")[0]
        responses = self.doc["paths"][path][method.lower()]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, which is not documented"
        schema[path][method].validate_response(r)
        self.seen.add((method, path, status))
        return r


def test_every_operation_answers_as_documented_on_its_main_paths(served):
    w = Walker(served.url)
    admin, reg = ADMIN_TOKEN, REGISTRATION_TOKEN
    task_op, detail = "/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}"

    # meta
    w.call("GET", "/healthz", 200)
    w.call("GET", "/metrics", 200)
    assert w.call("GET", "/openapi.json", 200).content == DOC.read_bytes()

    # register: 201 new, 200 again with a fresh token (the old one stops working), 400, 401, 403
    body = {"agent_id": "walker", "agent_type": "codex-cli", "capabilities": ["walk"], "max_concurrency": 3}
    first = w.call("POST", "/api/v1/agents/register", 201, token=reg, json_body=body).json()["token"]
    token = w.call("POST", "/api/v1/agents/register", 200, token=admin, json_body=body).json()["token"]
    assert token != first
    w.call("POST", "/api/v1/agents/heartbeat", 401, token=first, json_body={})
    w.call("POST", "/api/v1/agents/register", 400, token=reg, json_body={"agent_id": "../x", "agent_type": "t"})
    w.call("POST", "/api/v1/agents/register", 401, json_body=body)
    w.call("POST", "/api/v1/agents/register", 403, token=token, json_body=body)
    other = w.call("POST", "/api/v1/agents/register", 201, token=reg,
                   json_body={"agent_id": "other", "agent_type": "t", "capabilities": ["walk"]}).json()["token"]  # fmt: skip

    # create: 201, 409 (same id; same issue), 400, 403
    mk = {"title": "walk 1", "labels": ["agent:walk", "priority:9"], "repo": "acme/api", "issue_number": 1,
          "task_id": "walk-1"}  # fmt: skip
    w.call("POST", "/api/v1/tasks", 201, token=admin, json_body=mk)
    w.call("POST", "/api/v1/tasks", 409, token=admin, json_body=mk)
    w.call("POST", "/api/v1/tasks", 409, token=admin, json_body={**mk, "task_id": "walk-1b"})
    w.call("POST", "/api/v1/tasks", 201, token=admin, json_body={"title": "walk 2", "labels": ["agent:walk"],
                                                                 "task_id": "walk-2"})  # fmt: skip
    w.call("POST", "/api/v1/tasks", 201, token=admin, json_body={"title": "walk 3", "labels": ["agent:walk"],
                                                                 "repo": "acme/api", "issue_number": 3,
                                                                 "task_id": "walk-3"})  # fmt: skip
    w.call("POST", "/api/v1/tasks", 400, token=admin, json_body={"title": 7})
    w.call("POST", "/api/v1/tasks", 403, token=token, json_body={"title": "no"})

    # heartbeat and dequeue: 200 claimed in priority order, 204 when nothing is left
    assert w.call("POST", "/api/v1/agents/heartbeat", 200, token=token, json_body={}).json()["cancelled"] == []
    w.call("POST", "/api/v1/agents/heartbeat", 403, token=admin, json_body={})
    w.call("POST", "/api/v1/agents/heartbeat", 400, token=token, json_body=[])
    one = w.call("POST", "/api/v1/tasks/dequeue", 200, token=token, json_body={"wait": 0}).json()
    two = w.call("POST", "/api/v1/tasks/dequeue", 200, token=token, json_body={}).json()
    three = w.call("POST", "/api/v1/tasks/dequeue", 200, token=token, json_body={"wait": 0}).json()
    assert [one["task"]["task_id"], two["task"]["task_id"], three["task"]["task_id"]] == ["walk-1", "walk-2",
                                                                                          "walk-3"]  # fmt: skip
    w.call("POST", "/api/v1/tasks/dequeue", 204, token=token, json_body={"wait": 0.1})
    w.call("POST", "/api/v1/tasks/dequeue", 400, token=token, json_body={"wait": "soon"})

    # status: running, progress; 409 for a stale attempt, 403 for another agent, 404, 400
    w.call("POST", "/api/v1/tasks/walk-1/status", 200, token=token, operation="/api/v1/tasks/{task_id}/status",
           json_body={"attempt": 1, "status": "running", "message": "cloning"})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-1/status", 200, token=one["task_token"],
           operation="/api/v1/tasks/{task_id}/status", json_body={"message": "tests pass"})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-1/status", 409, token=token, operation="/api/v1/tasks/{task_id}/status",
           json_body={"attempt": 2, "status": "running"})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-1/status", 403, token=other, operation="/api/v1/tasks/{task_id}/status",
           json_body={"attempt": 1, "status": "running"})  # fmt: skip
    w.call("POST", "/api/v1/tasks/nope/status", 404, token=token, operation="/api/v1/tasks/{task_id}/status",
           json_body={"attempt": 1})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-1/status", 400, token=token, operation="/api/v1/tasks/{task_id}/status",
           json_body={"attempt": 1, "status": "done"})  # fmt: skip

    # complete: awaiting_review with a pull request; the identical repeat is 200 "repeated"; a late one 409
    receipt = {"attempt": 1, "outcome": "success", "summary": "fixed",
               "artifacts": [{"kind": "pull_request", "url": "https://forgejo.example/acme/api/pulls/12"},
                             {"kind": "branch", "name": "fleet/walk-1"}, {"kind": "commit", "sha": "ABCDEF1"},
                             {"kind": "log", "text": "ok"}]}  # fmt: skip
    complete = "/api/v1/tasks/{task_id}/complete"
    done = w.call("POST", "/api/v1/tasks/walk-1/complete", 200, token=token, json_body=receipt, operation=complete)
    assert done.json()["state"] == "awaiting_review" and done.json()["repeated"] is False
    again = w.call("POST", "/api/v1/tasks/walk-1/complete", 200, token=token, json_body=receipt, operation=complete)
    assert again.json()["repeated"] is True
    w.call("POST", "/api/v1/tasks/walk-1/complete", 409, token=token, operation=complete,
           json_body={**receipt, "summary": "something else"})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-1/complete", 400, token=token, operation=complete,
           json_body={"attempt": 1, "artifacts": [{"kind": "tarball"}]})  # fmt: skip

    # receipts (task id in the body) with the task token: completed without a pull request
    r = w.call("POST", "/api/v1/receipts", 200, token=two["task_token"],
               json_body={"task_id": "walk-2", "summary": "docs only"})  # fmt: skip
    assert r.json()["state"] == "completed"
    w.call("POST", "/api/v1/receipts", 403, token=two["task_token"], json_body={"task_id": "walk-3"})
    w.call("POST", "/api/v1/receipts", 403, token=admin, json_body={"task_id": "walk-3", "attempt": 1})
    w.call("POST", "/api/v1/receipts", 404, token=token, json_body={"task_id": "nope", "attempt": 1})

    # run-ended: after the receipt it settles nothing (200, settled false); 409 for another attempt, 400, 403
    ended = "/api/v1/tasks/{task_id}/run-ended"
    r = w.call("POST", "/api/v1/tasks/walk-2/run-ended", 200, token=two["task_token"], operation=ended,
               json_body={"attempt": 1, "exit_code": 0})  # fmt: skip
    assert (r.json()["settled"], r.json()["reason"], r.json()["state"]) == (False, "attempt_over", "completed")
    w.call("POST", "/api/v1/tasks/walk-2/run-ended", 409, token=two["task_token"], operation=ended,
           json_body={"attempt": 2, "exit_code": 0})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-2/run-ended", 400, token=two["task_token"], operation=ended,
           json_body={"attempt": 1, "exit_code": 0, "extra": True})  # fmt: skip
    w.call("POST", "/api/v1/tasks/walk-2/run-ended", 403, token=admin, operation=ended,
           json_body={"attempt": 1, "exit_code": 0})  # fmt: skip
    w.call("POST", "/api/v1/tasks/nope/run-ended", 404, token=token, operation=ended,
           json_body={"attempt": 1, "exit_code": 0})  # fmt: skip

    # a receipt naming a pull request in another repository: 422, the attempt failed (receipt_invalid)
    w.call("POST", "/api/v1/tasks/walk-3/complete", 422, token=three["task_token"], operation=complete,
           json_body={"artifacts": [{"kind": "pull_request", "repo": "else/where", "number": 4}]})  # fmt: skip
    again3 = w.call("POST", "/api/v1/tasks/dequeue", 200, token=token, json_body={"wait": 2}).json()
    assert again3["task"]["task_id"] == "walk-3" and again3["attempt"] == 2
    # …and its run ended after that: a report for attempt 1 settles nothing; attempt 2's settles it
    r = w.call("POST", "/api/v1/tasks/walk-3/run-ended", 200, token=token, operation=ended,
               json_body={"attempt": 1, "exit_code": 1})  # fmt: skip
    assert (r.json()["settled"], r.json()["state"], r.json()["attempt"]) == (False, "assigned", 2)
    r = w.call("POST", "/api/v1/tasks/walk-3/run-ended", 200, token=again3["task_token"], operation=ended,
               json_body={"attempt": 2, "exit_code": 1, "detail": "boom"})  # fmt: skip
    assert (r.json()["settled"], r.json()["failure_reason"]) == (True, "agent_error")
    again3 = w.call("POST", "/api/v1/tasks/dequeue", 200, token=token, json_body={"wait": 2}).json()
    assert again3["task"]["task_id"] == "walk-3" and again3["attempt"] == 3

    # detail: admin, the agent, the task token; 403 for others, 404, 400
    d = w.call("GET", "/api/v1/tasks/walk-1", 200, token=admin, operation=detail).json()
    assert d["pull_request"]["number"] == 12 and d["attempts"][0]["receipt"]["artifacts"][2]["sha"] == "abcdef1"
    w.call("GET", "/api/v1/tasks/walk-3", 200, token=token, operation=detail)
    w.call("GET", "/api/v1/tasks/walk-1", 200, token=one["task_token"], operation=detail)
    w.call("GET", "/api/v1/tasks/walk-3", 403, token=one["task_token"], operation=detail)
    w.call("GET", "/api/v1/tasks/walk-1", 403, token=other, operation=detail)
    w.call("GET", "/api/v1/tasks/nope", 404, token=admin, operation=detail)
    w.call("GET", "/api/v1/tasks/-rf", 400, token=admin, operation=detail)
    w.call("GET", "/api/v1/tasks/walk-1", 401, operation=task_op)

    # cancel the running task: the next heartbeat says so; cancel again 422; retry 200, retry again 422
    w.call("POST", "/api/v1/tasks/walk-3/cancel", 200, token=admin, operation="/api/v1/tasks/{task_id}/cancel",
           json_body={"reason": "not needed"})  # fmt: skip
    assert w.call("POST", "/api/v1/agents/heartbeat", 200, token=token, json_body={}).json()["cancelled"] == ["walk-3"]
    w.call("POST", "/api/v1/tasks/walk-3/cancel", 422, token=admin, operation="/api/v1/tasks/{task_id}/cancel")
    w.call("POST", "/api/v1/tasks/nope/cancel", 404, token=admin, operation="/api/v1/tasks/{task_id}/cancel")
    w.call("POST", "/api/v1/tasks/walk-3/retry", 200, token=admin, operation="/api/v1/tasks/{task_id}/retry")
    w.call("POST", "/api/v1/tasks/walk-3/retry", 422, token=admin, operation="/api/v1/tasks/{task_id}/retry")
    w.call("POST", "/api/v1/tasks/walk-3/retry", 403, token=token, operation="/api/v1/tasks/{task_id}/retry")
    w.call("POST", "/api/v1/tasks/no%00pe/retry", 400, token=admin, operation="/api/v1/tasks/{task_id}/retry")

    # lists: paging with a cursor, filters, 400 for a bad filter
    page = w.call("GET", "/api/v1/tasks?limit=2", 200, token=admin).json()
    assert len(page["items"]) == 2 and page["next"] is not None
    rest = w.call("GET", f"/api/v1/tasks?limit=2&cursor={page['next']}", 200, token=admin).json()
    assert [t["task_id"] for t in page["items"] + rest["items"]] == ["walk-1", "walk-2", "walk-3"]
    assert rest["next"] is None
    states = w.call("GET", "/api/v1/tasks?state=completed,awaiting_review", 200, token=admin).json()
    assert {t["task_id"] for t in states["items"]} == {"walk-1", "walk-2"}
    w.call("GET", "/api/v1/tasks?state=finished", 400, token=admin)
    w.call("GET", "/api/v1/tasks", 403, token=token)
    agents = w.call("GET", "/api/v1/agents?status=online&capability=walk", 200, token=admin).json()
    assert {a["agent_id"] for a in agents["items"]} == {"walker", "other"}
    w.call("GET", "/api/v1/agents?mode=carrier-pigeon", 400, token=admin)
    w.call("GET", "/api/v1/agents", 401, token="not-a-token")

    # deregister: offline; its running attempts fail agent_lost
    assert w.call("POST", "/api/v1/agents/deregister", 200, token=other, json_body={}).json()["status"] == "offline"

    # the webhook route is off without Forgejo (tests/test_webhooks.py drives it with a secret)
    w.call("POST", "/api/v1/webhooks/forgejo", 404, json_body={"action": "opened"})

    answered = {(m, p) for m, p, _s in w.seen}
    documented = {(m.upper(), p) for p, item in w.doc["paths"].items() for m in item}
    assert documented <= answered, documented - answered
