"""Comment commands (issue 10; ``forgejo.comment_commands``): ``/fleet retry|cancel|rework`` by a user with write
access acts as the operator command; anyone else gets one polite reply and nothing changes; fleetctl's own
comments never count; the permission asked from Forgejo is remembered no longer than its TTL.

End to end with the fake Forgejo (its webhooks to a real ``fleetctl serve``) and the real passes.
"""

from __future__ import annotations

import json

import pytest
from conftest import stop_cleanly
from test_reviews import REPO, db_check, events, fleet, in_review, passes, serve, show

from fleetctl.forgejo.mapping import comment_command


def _serve(make_server, forgejo, **settings):
    """serve with comment commands; fleetctl's account is an admin of the repository, as Forgejo requires for
    asking another user's permission (docs/forgejo.md §10)."""
    forgejo.set_permission(REPO, "fleet-bot", "admin")
    return serve(make_server, forgejo, **settings)


def _task(server) -> dict:
    (task,) = json.loads(fleet(server, "task", "list", "--json").stdout)["items"]
    return task


def _replies(forgejo, n: int) -> list[str]:
    return [c["body"] for c in forgejo.comments(REPO, n) if c["user"]["login"] == "fleet-bot" and "@" in c["body"]]


def test_a_writer_cancels_and_retries_a_reader_gets_one_reply_and_fleetctls_own_comment_does_nothing(
    make_server, forgejo
):
    server = _serve(make_server, forgejo, comment_commands=True)
    forgejo.add_user("carol")
    forgejo.set_permission(REPO, "alice", "write")
    forgejo.set_permission(REPO, "carol", "read")
    n = forgejo.open_issue(REPO, "Do it", "", labels=["agent:code"])
    tid = _task(server)["task_id"]

    forgejo.comment(REPO, n, "/fleet cancel", user="carol")  # a reader: refused, nothing changes
    first = len(forgejo.deliveries) - 1
    passes(server)
    assert show(server, tid)["state"] == "queued"
    import test_reviews

    assert test_reviews.redeliver(server, forgejo, first, new_id=True).json()["verdict"] == "ignored"  # a Replay
    passes(server)
    refusals = [b for b in _replies(forgejo, n) if "only people with write access" in b]
    assert len(refusals) == 1 and "@carol" in refusals[0]
    delivery = forgejo.deliveries[first][0]["X-Forgejo-Delivery"]  # the operator finds the outcome there
    shown = json.loads(fleet(server, "deliveries", "show", delivery, "--json").stdout)
    assert shown["command"] | {"detail": None} == {"command": "/fleet cancel", "sender": "carol", "state": "refused",
                                                   "detail": None, "task_id": None, "tries": 1}  # fmt: skip
    assert "carol has read access" in shown["command"]["detail"]
    assert "state=refused" in fleet(server, "deliveries", "show", delivery).stdout

    forgejo.comment(REPO, n, "/fleet cancel", user="fleet-bot")  # fleetctl's own account: nothing at all
    passes(server)
    assert show(server, tid)["state"] == "queued"

    forgejo.comment(REPO, n, "Thanks!\n/fleet cancel", user="alice")  # a writer: acts
    passes(server)
    cancelled = show(server, tid)
    assert cancelled["state"] == "cancelled"
    cancel_event = [e for e in cancelled["events"] if e["type"] == "task.cancelled"][0]
    assert cancel_event["data"]["reason"] == "cancelled by @alice via /fleet cancel"
    assert cancel_event["data"]["by"] == "@alice via /fleet cancel"
    forgejo.comment(REPO, n, "/FLEET retry", user="alice")
    passes(server)
    retried = show(server, tid)
    assert retried["state"] in ("queued", "assigned", "running")
    assert [e for e in retried["events"] if e["type"] == "task.retried"][0]["data"]["by"] == "@alice via /fleet retry"
    forgejo.comment(REPO, n, "/fleet retry", user="alice")  # not possible now: said, nothing changes
    passes(server)
    assert any("did nothing: cannot retry a task that is queued" in b for b in _replies(forgejo, n))
    forgejo.edit_issue(REPO, n, body="/fleet cancel")  # an issue body is not a comment
    passes(server)
    assert show(server, tid)["state"] == "queued"
    assert events(server, tid).count("task.cancelled") == 1
    db_check(server)
    stop_cleanly(server)


def test_rework_from_a_pull_request_comment_and_the_feature_switched_off(make_server, forgejo):
    server = _serve(make_server, forgejo, comment_commands=True)
    forgejo.set_permission(REPO, "alice", "admin")
    tid, n, pr, _token = in_review(server, forgejo, "Needs care", ["agent:code", "review-rounds:0"])
    forgejo.comment(REPO, pr, "/fleet rework\nPlease also update the changelog.", user="alice")
    passes(server)
    task = show(server, tid)
    assert (task["state"], task["attempt_kind"]) == ("queued", "rework")  # an operator override: past the cap (0)
    assert [e for e in task["events"] if e["type"] == "task.rework"][0]["data"]["review"]["body"] == (
        "Please also update the changelog.")  # fmt: skip
    forgejo.comment(REPO, pr, "/fleet cancel", user="alice")  # the pull request's task, linked to it
    passes(server)
    assert show(server, tid)["state"] == "cancelled"
    forgejo.comment(REPO, pr, "/fleet retry", user="alice")  # a finished task: found through the branch
    passes(server)
    assert show(server, tid)["state"] in ("queued", "assigned", "running")
    assert not [b for b in _replies(forgejo, pr) if "did nothing" in b or "no fleetctl task" in b]
    db_check(server)
    stop_cleanly(server)
    off = serve(make_server, forgejo)  # comment_commands = false (the default)
    forgejo.set_hook(f"{off.url}/api/v1/webhooks/forgejo", "review-webhook-secret")
    forgejo.comment(REPO, n, "/fleet cancel", user="alice")
    passes(off)
    assert show(off, tid)["state"] != "cancelled"
    stop_cleanly(off)


def test_a_demoted_writer_is_refused_once_the_cached_permission_is_older_than_its_ttl(store, orch, forgejo):
    from dataclasses import replace

    from conftest import config_of

    from fleetctl.forgejo.client import client_for
    from fleetctl.services.commands import permission

    cfg = config_of(orch, url=forgejo.url, token=forgejo.bot_token, permission_cache_secs=60)
    forgejo.set_permission(REPO, "fleet-bot", "admin")
    forgejo.set_permission(REPO, "alice", "write")
    with client_for(cfg.forgejo) as client:
        assert permission(store, cfg, client, REPO, "alice", 1000.0) == "write"
        forgejo.set_permission(REPO, "alice", "read")
        assert permission(store, cfg, client, REPO, "alice", 1059.0) == "write"  # within the TTL
        assert permission(store, cfg, client, REPO, "alice", 1060.0) == "read"  # at the TTL: asked again
        forgejo.set_permission(REPO, "alice", "write")
        assert permission(store, cfg, client, REPO, "alice", 1061.0) == "read"  # remembered again, for 60 s
        assert permission(store, cfg, client, REPO, "alice", 990.0) == "write"  # the clock set back: asked again
        uncached = replace(cfg, forgejo=replace(cfg.forgejo, permission_cache_secs=0))
        forgejo.set_permission(REPO, "alice", "write")
        assert permission(store, uncached, client, REPO, "alice", 1061.0) == "write"
        assert permission(store, cfg, client, REPO, "nobody", 1062.0) == "none"


def test_when_fleetctls_account_may_not_ask_the_command_fails_at_once_with_one_reply(make_server, forgejo):
    server = serve(make_server, forgejo, comment_commands=True)  # fleet-bot has write, not admin: Forgejo says 403
    forgejo.set_permission(REPO, "alice", "write")
    n = forgejo.open_issue(REPO, "Do it", "", labels=["agent:code"])
    tid = _task(server)["task_id"]
    forgejo.comment(REPO, n, "/fleet cancel", user="alice")
    passes(server)
    passes(server)
    assert show(server, tid)["state"] == "queued"
    (reply,) = _replies(forgejo, n)
    assert reply.startswith("**fleetctl**: @alice, fleetctl could not check who may") and "admin access" in reply
    db_check(server)
    stop_cleanly(server)


@pytest.mark.parametrize(
    "body,expected",
    [("/fleet retry", ("retry", "")), ("hi\n/Fleet CANCEL now", ("cancel", "now")), ("/fleet", ("?", "")),
     ("/fleetx retry", None), ("please /fleet retry", None), ("/fleet deploy", ("?deploy", ""))],
)  # fmt: skip
def test_the_command_is_the_first_line_that_starts_with_fleet(body, expected):
    assert comment_command(body) == expected


def test_forgejos_own_comment_payloads_new_comments_once_never_edits_nor_fleetctls_own(tmp_path):
    """The shared payloads as Forgejo sends them, through ``ingest``: what the webhook records (nothing else:
    it never calls Forgejo; the pass does)."""
    from test_webhooks import CONFIG, SHARED, forgejo_bytes, headers_for

    from fleetctl.config import load_config_text
    from fleetctl.services import issues
    from fleetctl.store import Store

    def doc(name: str, body: str, sender: str = "bob") -> dict:
        d = json.loads((SHARED / name).read_text())
        d["comment"]["body"], d["sender"]["login"] = body, sender
        return d

    def send(name: str, d: dict, delivery: str | None = None) -> str:
        raw = forgejo_bytes(d)
        return issues.ingest(store, cfg, headers_for(name, raw, delivery=delivery), raw, source="test").verdict

    for on in (False, True):
        text = CONFIG.replace("webhook_secret =", f"bot_login = 'fleet-bot'\ncomment_commands = {str(on).lower()}\n"
                                                  "webhook_secret =")  # fmt: skip
        (tmp_path / f"{on}").mkdir()
        cfg = load_config_text(text, tmp_path / f"{on}" / "config.toml")
        store = Store.open(cfg.orchestrator.db_path)
        try:
            created = doc("issue_comment-created.json", "Thanks.\n/fleet cancel")
            assert send("issue_comment-created.json", created, "c-1") == ("accepted" if on else "ignored")
            assert send("issue_comment-created.json", created, "c-2") == "ignored"  # a Replay: the same comment
            assert send("issue_comment-edited.json", doc("issue_comment-edited.json", "/fleet retry")) == "ignored"
            own = doc("issue_comment-created.json", "/fleet retry", sender="fleet-bot") | {"comment": {
                **created["comment"], "id": 302, "body": "/fleet retry"}}  # fmt: skip
            assert send("issue_comment-created.json", own) == "ignored"
            on_pr = doc("pull_request_comment-created.json", "/fleet rework\nAdd the test.")
            assert send("pull_request_comment-created.json", on_pr) == ("accepted" if on else "ignored")
            rows = [(r["command"], r["sender"], r["number"], r["is_pull"], r["body"], r["state"])
                    for r in reversed(store.commands())]  # fmt: skip
            assert rows == ([("cancel", "bob", 42, 0, "", "pending"), ("rework", "bob", 43, 1, "Add the test.",
                                                                       "pending")] if on else [])  # fmt: skip
            assert store.check().ok
        finally:
            store.close()
