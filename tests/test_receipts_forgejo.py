"""Receipts checked against real pull requests (SPEC §7.4), against the fake Forgejo over real HTTP.

Nothing is mocked: the fake Forgejo (tests/fakes/forgejo.py) answers on 127.0.0.1, the database is a real
SQLite file, the CLI runs as a subprocess and the HTTP path is a real ``fleetctl serve``. Every wait is
bounded; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, config_of

from fleetctl import passes, services
from fleetctl.errors import ValidationFailed
from fleetctl.gateway import LocalGateway
from fleetctl.store import Store

REPO = "acme/widgets"
OK = {"outcome": "success", "summary": "done"}


def pr_artifact(number: int, repo: str = REPO) -> dict:
    return {"kind": "pull_request", "repo": repo, "number": number}


@pytest.fixture
def cfg(orch, forgejo):
    """A configuration whose Forgejo is the fake (the bot's token)."""
    return config_of(orch, url=forgejo.url, token=forgejo.bot_token)


@pytest.fixture
def issue(forgejo) -> int:
    return forgejo.open_issue(REPO, "Fix the parser", labels=["agent-task"], user="alice")


@pytest.fixture
def task(store, orch, issue):
    """Task ``t1`` for the issue, claimed by pull agent ``a1`` and running (attempt 1)."""
    services.register_agent(store, "a1", agent_type="codex-cli", now=100.0)
    services.create_task(store, orch, title="Fix the parser", task_id="t1", repo=REPO, issue_number=issue)
    assert store.claim(agent_id="a1", capabilities=(), max_concurrency=3, lease_secs=300, ts=200.0, task_id="t1")
    return services.start_task(store, "t1", agent_id="a1", attempt=1)


@pytest.fixture(autouse=True)
def _db_stays_consistent(orch):
    """After each scenario, events replay to exactly the stored projections."""
    yield
    if orch.db_path.exists():
        with Store.open(orch.db_path) as s:
            report = s.check()
        assert report.ok, report.problems


def complete(store, cfg, doc, **kw) -> dict:
    """The CLI's local path: ``LocalGateway.complete`` (prepare, then one write)."""
    return LocalGateway(cfg, store).complete("t1", doc, agent_id="a1", attempt=1, **kw)


def last_event(store, task_id="t1") -> dict:
    return store.events(task_id=task_id)[-1]


# ---------------------------------------------------------------------------------------------- accepted


def test_a_pull_request_on_the_task_branch_is_accepted_with_its_url(store, cfg, task, forgejo):
    n = forgejo.open_pull(REPO, head="fleet/t1", title="Parser fix")
    out = complete(store, cfg, {**OK, "artifacts": [pr_artifact(n)]})
    assert (out["state"], out["repeated"], out["pending"]) == ("awaiting_review", False, False)
    pr = store.task("t1")["pull_request"]
    assert pr["url"] == forgejo.pull_json(forgejo.repos[REPO], forgejo.repos[REPO].issues[n])["html_url"]
    assert (pr["repo"], pr["number"], pr["head"], pr["state"], pr["merged"]) == (REPO, n, "fleet/t1", "open", False)
    assert pr["head_sha"] == forgejo.repos[REPO].branches["fleet/t1"]


def test_a_pull_request_saying_closes_the_issue_is_accepted(store, cfg, task, forgejo, issue):
    n = forgejo.open_pull(REPO, head="parser-fix", body=f"Some text.\n\nfixes #{issue}")
    url = f"{forgejo.url}/{REPO}/pulls/{n}"
    sha = forgejo.repos[REPO].branches["parser-fix"]
    out = complete(store, cfg, {**OK, "artifacts": [{"kind": "pull_request", "url": url},
                                                    {"kind": "commit", "sha": sha[:10]}]})  # fmt: skip
    assert out["state"] == "awaiting_review"
    assert store.task("t1")["pull_request"]["head"] == "parser-fix"


def test_an_already_merged_pull_request_completes_the_task(store, cfg, task, forgejo):
    n = forgejo.open_pull(REPO, head="fleet/t1")
    forgejo.merge_pull(REPO, n)
    out = complete(store, cfg, {**OK, "artifacts": [pr_artifact(n)]})
    assert out["state"] == "completed"
    assert store.task("t1")["pull_request"]["merged"] is True


# ---------------------------------------------------------------------------------------------- refused


def _forged(forgejo, issue) -> dict:
    """Each forged receipt and the reason it must be refused with."""
    forgejo.add_repo("evil/fork")
    other = forgejo.open_pull("evil/fork", head="fleet/t1")
    plain = forgejo.open_issue(REPO, "just an issue")
    unrelated = forgejo.open_pull(REPO, head="something-else", body="Closes #9999")
    closed = forgejo.open_pull(REPO, head="fleet/t1", title="first try")
    forgejo.close_pull(REPO, closed)
    good = forgejo.open_pull(REPO, head="fleet/t1", title="second try")
    return {
        "another repository": ([{"kind": "pull_request", "url": f"{forgejo.url}/evil/fork/pulls/{other}"}],
                               "is not in the task's repository acme/widgets"),
        "a plain issue": ([pr_artifact(plain)], f"{REPO}#{plain} is not a pull request"),
        "not referencing the task": ([pr_artifact(unrelated)], "does not reference task t1"),
        "closed unmerged": ([pr_artifact(closed)], "is closed without being merged"),
        "a commit that is not the head": ([pr_artifact(good), {"kind": "commit", "sha": "0123456789abcdef"}],
                                          "commit 0123456789abcdef is not the head of the pull request"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["another repository", "a plain issue", "not referencing the task",
                                  "closed unmerged", "a commit that is not the head"])  # fmt: skip
def test_a_forged_receipt_fails_the_attempt_receipt_invalid(store, cfg, task, forgejo, issue, case):
    artifacts, reason = _forged(forgejo, issue)[case]
    with pytest.raises(ValidationFailed) as err:
        complete(store, cfg, {**OK, "artifacts": artifacts})
    assert err.value.code == "receipt_invalid" and reason in err.value.message
    t = store.task("t1")
    assert (t["state"], t["failure_reason"], t["pull_request"]) == ("queued", "receipt_invalid", None)
    ev = last_event(store)
    assert ev["type"] == "task.requeued" and reason in ev["data"]["detail"]


def test_require_pull_request_refuses_a_receipt_naming_none(store, cfg, task, forgejo):
    with pytest.raises(ValidationFailed, match="a pull request is required"):
        complete(store, cfg, OK)
    assert store.task("t1")["failure_reason"] == "receipt_invalid"
    assert forgejo.requests == []  # refused on its face: Forgejo was not asked


# ---------------------------------------------------------------------------------------------- pending


def test_forgejo_down_stores_the_receipt_as_pending_until_a_sweep_validates_it(store, cfg, task, forgejo):
    n = forgejo.open_pull(REPO, head="fleet/t1")
    doc = {**OK, "artifacts": [pr_artifact(n)]}
    forgejo.down()
    out = complete(store, cfg, doc)
    assert (out["state"], out["pending"]) == ("running", True)
    assert complete(store, cfg, doc)["pending"] is True  # a repeat: the same answer, nothing recorded twice
    assert [e["type"] for e in store.events(task_id="t1")].count("task.receipt_pending") == 1
    assert store.attempt("t1", 1)["receipt_pending"] == 1

    far = store.task("t1")["lease_expires_at"] + 10 * 3600  # far past the lease and the hard timeout
    report = passes.sweep(store, cfg, now=lambda: far)
    assert [a["action"] for a in report.actions] == ["agent.offline"]  # silent for hours: offline, and yet …
    assert store.task("t1")["state"] == "running"  # … not lost, expired, timed out or settled
    assert services.settle_run(store, cfg.orchestrator, "t1", 1, 0) is None  # the run ended: not a no_receipt

    forgejo.up()
    report = passes.sweep(store, cfg)
    assert [a["action"] for a in report.actions] == ["task.receipt_validated"]
    t = store.task("t1")
    assert (t["state"], t["pull_request"]["number"]) == ("awaiting_review", n)
    assert store.attempt("t1", 1)["receipt_pending"] is None


def test_a_pending_receipt_that_turns_out_forged_fails_receipt_invalid(store, cfg, task, forgejo):
    plain = forgejo.open_issue(REPO, "not a PR")
    forgejo.down()
    assert complete(store, cfg, {**OK, "artifacts": [pr_artifact(plain)]})["pending"] is True
    forgejo.up()
    assert services.validate_pending(store, cfg)[0]["rejected"].endswith("(a plain issue or no such number)")
    assert store.task("t1")["failure_reason"] == "receipt_invalid"
    assert "is not a pull request" in last_event(store)["data"]["detail"]


def test_a_run_that_ended_without_a_receipt_is_left_for_the_sweep_while_forgejo_is_down(store, cfg, task, forgejo):
    forgejo.open_pull(REPO, head="fleet/t1")
    forgejo.down()
    assert services.settle_ended_run(store, cfg, "t1", 1, 0) is None  # not failed because Forgejo is down
    assert store.task("t1")["state"] == "running"
    forgejo.up()
    assert services.settle_ended_run(store, cfg, "t1", 1, 0)["state"] == "awaiting_review"
    assert store.attempt("t1", 1)["receipt"]["summary"] == "found by branch after the run ended"


def test_a_run_that_ended_without_a_receipt_or_a_pull_request_is_no_receipt(store, cfg, task, forgejo):
    assert services.settle_ended_run(store, cfg, "t1", 1, 0)["failure_reason"] == "no_receipt"


# ---------------------------------------------------------------------------------------------- the CLI


def _cli_fleet(fleet, forgejo):
    path = fleet.configure(forgejo={"url": forgejo.url, "token": forgejo.bot_token})
    os.chmod(path, 0o600)  # it holds the Forgejo token
    assert fleet.run("agent", "register", "puller", "--type", "t").returncode == 0
    return path


def test_the_cli_refuses_a_forged_receipt_with_exit_6_and_the_reason(fleet, forgejo, issue):
    _cli_fleet(fleet, forgejo)
    task_id = fleet.create("--title", "Fix", "--repo", REPO, "--issue", str(issue))
    fleet.claim(task_id, "puller")
    plain = forgejo.open_issue(REPO, "not a PR")
    done = fleet.run("task", "complete", task_id, "--attempt", "1", "--agent", "puller", "--pr", str(plain))
    assert done.returncode == 6, done.stderr
    assert f"{REPO}#{plain} is not a pull request" in done.stderr
    assert fleet.task(task_id)["failure_reason"] == "receipt_invalid"
    fleet.check_db()


def test_the_cli_stores_a_pending_receipt_with_exit_0_and_says_so(fleet, forgejo, issue):
    _cli_fleet(fleet, forgejo)
    task_id = fleet.create("--title", "Fix", "--repo", REPO, "--issue", str(issue))
    fleet.claim(task_id, "puller")
    n = forgejo.open_pull(REPO, head=f"fleet/{task_id}")
    forgejo.down()
    args = ("task", "complete", task_id, "--attempt", "1", "--agent", "puller", "--pr", str(n))
    done = fleet.run(*args)
    assert done.returncode == 0, done.stderr
    assert "receipt is stored and will be validated when Forgejo answers" in done.stderr
    assert fleet.task(task_id)["state"] == "assigned"
    forgejo.up()
    done = fleet.run(*args, "--json")  # the agent repeats it once Forgejo is back: validated now
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "awaiting_review", done.stderr
    fleet.check_db()


def test_a_local_run_that_ended_without_a_receipt_gets_its_pull_request_by_branch(fleet, forgejo, issue):
    # The run ends 0 and hands in nothing. The run wrapper's own `python -m fleetctl task run-ended` runs in the
    # workspace with a scrubbed environment (no PYTHONPATH), so the run links this checkout's package there:
    # the wrapper then reports with the code under test, not with whatever fleetctl is installed.
    link = f"import os; os.symlink({str(Path(services.__file__).parents[1])!r}, 'fleetctl')"
    quiet = {"quiet": {"command": ["{python}", "-c", link], "prompt": "file"}}
    fleet.configure(forgejo={"url": forgejo.url, "token": forgejo.bot_token}, agent_types=quiet,
                    agents=[{"agent_type": "quiet", "agent_id": "local-q", "max_concurrency": 1}])  # fmt: skip
    os.chmod(fleet.config, 0o600)
    task_id = fleet.create("--title", "Fix", "--repo", REPO, "--issue", str(issue))
    forgejo.down()  # the run wrapper's own `task run-ended` cannot ask Forgejo: it leaves the run to the sweep
    assert fleet.run("dispatch").returncode == 0
    ws = fleet.dir / "ws" / task_id / "1" / ".fleet"
    fleet.wait_for(lambda: (ws / "report.log").exists() and "not settled" in (ws / "report.log").read_text(),
                   what="the run wrapper to report the end")  # fmt: skip
    assert fleet.task(task_id)["state"] == "running"
    forgejo.up()
    n = forgejo.open_pull(REPO, head=f"fleet/{task_id}")
    done = fleet.run("sweep-timeouts", "--json")
    assert done.returncode == 0, done.stderr
    t = fleet.task(task_id)
    assert (t["state"], t["pull_request"]["number"]) == ("awaiting_review", n)
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- HTTP


def _served(make_server, forgejo):
    server = make_server(lease_secs=30, forgejo={"url": forgejo.url, "token": forgejo.bot_token,
                                                 "webhook_secret": "test-secret"})  # fmt: skip
    return server.start()


def _dequeued(server, issue) -> tuple[str, dict]:
    token = server.register("a1")
    with server.client(ADMIN_TOKEN) as admin:
        r = admin.post("/api/v1/tasks", json={"title": "Fix", "repo": REPO, "issue_number": issue})
        assert r.status_code == 201, r.text
    with server.client(token) as c:
        r = c.post("/api/v1/tasks/dequeue", json={"wait": 0})
        assert r.status_code == 200, r.text
    return token, r.json()


def test_http_refuses_a_forged_receipt_422_receipt_invalid(make_server, forgejo, issue):
    server = _served(make_server, forgejo)
    token, claim = _dequeued(server, issue)
    task_id = claim["task"]["task_id"]
    n = forgejo.open_pull(REPO, head="elsewhere")
    with server.client(token) as c:
        r = c.post(f"/api/v1/tasks/{task_id}/complete", json={**OK, "attempt": 1, "artifacts": [pr_artifact(n)]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "receipt_invalid", r.text
    assert f"does not reference task {task_id}" in r.json()["error"]["message"]


def test_http_answers_202_pending_while_forgejo_is_down_then_a_sweep_validates(make_server, forgejo, issue):
    server = _served(make_server, forgejo)
    token, claim = _dequeued(server, issue)
    task_id = claim["task"]["task_id"]
    n = forgejo.open_pull(REPO, head=f"fleet/{task_id}")
    forgejo.down()
    doc = {**OK, "task_id": task_id, "attempt": 1, "artifacts": [pr_artifact(n)]}
    with server.client(token) as c:
        first = c.post("/api/v1/receipts", json=doc)
        again = c.post("/api/v1/receipts", json=doc)
    for r in (first, again):
        assert r.status_code == 202, r.text
        assert (r.json()["receipt"], r.json()["pending"], r.json()["state"]) == ("pending", True, "assigned")
    with Store.open(server.db_path) as store:
        assert [e["type"] for e in store.events(task_id=task_id)].count("task.receipt_pending") == 1
        forgejo.up()
        from fleetctl.config import load_config

        cfg = load_config(server.config_path)
        passes.sweep(store, cfg)
        assert store.task(task_id)["state"] == "awaiting_review"
        assert store.check().ok


# ---------------------------------------------------------------------------------------------- without the token


def test_a_process_without_the_token_keeps_the_receipt_pending_for_a_pass_that_has_it(store, orch, task, forgejo):
    """systemd gives the Forgejo token to the passes, not to local runs: their receipts wait, asking nothing."""
    n = forgejo.open_pull(REPO, head="fleet/t1", title="Parser fix")
    asked = len(forgejo.requests)
    tokenless = config_of(orch, url=forgejo.url)
    out = complete(store, tokenless, {**OK, "artifacts": [pr_artifact(n)]})
    assert out["pending"] and store.task("t1")["state"] == "running" and len(forgejo.requests) == asked
    assert services.validate_pending(store, tokenless) == []  # a pass without it leaves it pending too
    done = services.validate_pending(store, config_of(orch, url=forgejo.url, token=forgejo.bot_token))
    assert [d["state"] for d in done] == ["awaiting_review"]


def test_a_run_ended_without_the_token_is_left_to_the_sweep_which_looks_the_pr_up(store, orch, task, forgejo):
    n = forgejo.open_pull(REPO, head="fleet/t1", title="Parser fix")
    tokenless = config_of(orch, url=forgejo.url)
    assert services.settle_ended_run(store, tokenless, "t1", 1, 0) is None  # `task run-ended` in a local run
    assert store.task("t1")["state"] == "running"
    link = services.ForgejoLink(config_of(orch, url=forgejo.url, token=forgejo.bot_token))
    try:
        settled = services.settle_ended_run(store, link.cfg, "t1", 1, 0, link=link)
    finally:
        link.close()
    assert settled["state"] == "awaiting_review" and settled["pull_request"]["number"] == n
    # and a sweep with no token anywhere settles as before instead of waiting for ever
    services.create_task(store, orch, title="Other", task_id="t2", repo=REPO, issue_number=n + 100)
    assert store.claim(agent_id="a1", capabilities=(), max_concurrency=3, lease_secs=300, ts=300.0, task_id="t2")
    link = services.ForgejoLink(tokenless)
    assert services.settle_ended_run(store, tokenless, "t2", 1, 0, link=link)["failure_reason"] == "no_receipt"


def test_a_run_that_never_started_is_settled_at_once_even_with_forgejo_down(store, cfg, task, forgejo):
    forgejo.down()
    try:
        link = services.ForgejoLink(cfg)
        settled = services.settle_ended_run(store, cfg, "t1", 1, 127, link=link)
        link.close()
    finally:
        forgejo.up()
    assert settled["failure_reason"] == "launch_failed"  # no pull request to look for: nothing to wait for
