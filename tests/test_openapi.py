"""docs/openapi.json is the API's contract: shipped in the package, served as is, and in step with the routes.

- the served copy (fleetctl/openapi.json, a package data file) is byte for byte the document in docs/;
- every route of ``Api.routes`` (method + path) is documented, and nothing else is;
- each operation declares the token kinds its route really accepts (``x-token-kinds``);
- every ``$ref`` resolves, every operation documents its errors with the ``Error`` schema;
- ``GET /openapi.json`` on a live server returns exactly these bytes;
- docs/agent-api.md has a section, with a curl example, for every operation.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import httpx
from conftest import LiveServer, stop_cleanly

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "openapi.json"
SERVED = ROOT / "fleetctl" / "openapi.json"
METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}

#: Api route auth kind → the token kinds the document must name (in this order: the first is the usual one).
TOKEN_KINDS = {
    "anyone": [],
    "metrics": [],  # public by default (server.metrics_public); the admin token when it is not
    "registrar": ["registration", "admin"],
    "agent": ["agent"],
    "admin": ["admin"],
    "admin_or_agent": ["admin", "agent", "task"],
    "agent_or_task": ["agent", "task"],
}


def load() -> dict:
    return json.loads(DOC.read_text(encoding="utf-8"))


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method.upper(), path, op


def api_routes(tmp_path) -> dict[tuple[str, str], str]:
    """(method, path pattern) → auth kind, read from a real ``Api`` over a scratch database."""
    from fleetctl.config import load_config
    from fleetctl.server.api import Api

    api = Api(load_config(LiveServer(tmp_path).config_path))
    try:
        return {(method, _pattern(regex.pattern)): auth for method, regex, _handler, auth in api.routes}
    finally:
        api.close()
        api.writer.close()


def _pattern(regex: str) -> str:
    """``^/api/v1/tasks/(?P<task_id>[^/]+)/status$`` → ``/api/v1/tasks/{task_id}/status``."""
    import re

    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", regex).removeprefix("^").removesuffix("$")


def test_the_served_copy_is_the_document_byte_for_byte():
    assert SERVED.read_bytes() == DOC.read_bytes(), "run: cp docs/openapi.json fleetctl/openapi.json"


def test_it_is_openapi_3_with_bearer_auth():
    doc = load()
    assert doc["openapi"].startswith("3.0.")
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {**doc["components"]["securitySchemes"]["bearerAuth"],
                                                                  "type": "http", "scheme": "bearer"}  # fmt: skip
    assert DOC.read_text(encoding="utf-8").endswith("}\n")


def test_every_route_is_documented_and_nothing_else(tmp_path):
    routes = api_routes(tmp_path)
    documented = {(method, path) for method, path, _op in operations(load())}
    assert set(routes) - documented == set(), "routes missing from docs/openapi.json"
    assert documented - set(routes) == set(), "documented operations the server does not have"


def test_each_operation_names_the_tokens_its_route_accepts(tmp_path):
    routes = api_routes(tmp_path)
    for method, path, op in operations(load()):
        kinds = TOKEN_KINDS[routes[(method, path)]]
        assert op.get("x-token-kinds", []) == kinds, (method, path)
        assert op["security"] == ([{"bearerAuth": []}] if kinds else []), (method, path)
        if kinds:
            assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_refs_resolve_and_errors_use_the_error_schema():
    doc = load()
    text = json.dumps(doc)

    def resolve(ref: str) -> dict:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    for ref in {r for r in _refs(doc)}:
        assert resolve(ref), ref
    for name in ("Task", "TaskDetail", "Agent", "AgentWithToken", "DequeueResult", "HeartbeatResult", "TaskList",
                 "AgentList", "Error", "Health", "Receipt", "CompletionResult"):  # fmt: skip
        assert f'"#/components/schemas/{name}"' in text, name
    for method, path, op in operations(doc):
        assert op["operationId"] and op["summary"], (method, path)
        for status, response in op["responses"].items():
            response = resolve(response["$ref"]) if "$ref" in response else response
            if status.startswith(("4", "5")) and path != "/healthz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
        if method == "POST":
            assert {"400", "411", "413"} <= set(op["responses"]), (method, path)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_human_reference_has_a_section_for_every_operation():
    text = (ROOT / "docs" / "agent-api.md").read_text(encoding="utf-8")
    sections = text.split("\n### ")[1:]
    for method, path, _op in operations(load()):
        section = next((s for s in sections if s.startswith(f"`{method} {path}`")), None)
        assert section is not None, f"docs/agent-api.md has no section for {method} {path}"
        assert "$ curl" in section, f"no curl example for {method} {path}"


def test_the_document_ships_in_the_wheel():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["fleetctl"]
    assert any(fnmatch.fnmatch("openapi.json", p) for p in patterns), patterns


def test_a_live_server_serves_it(live_server):
    r = httpx.get(f"{live_server.url}/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.content == DOC.read_bytes()
    head = httpx.head(f"{live_server.url}/openapi.json", timeout=10)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(r.content)
    stop_cleanly(live_server)
