"""What fleetctl says in the Matrix room (fleetctl/matrix/messages.py) and which events become messages
(``effects.matrix_effects``): pure functions, table-driven. Sending them is tested against a real Synapse
in tests/test_matrix.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from fleetctl import effects
from fleetctl.config import MatrixConfig
from fleetctl.matrix.messages import DEFAULT_KINDS, FIELDS, KINDS, batch_message, fields_for, message_for
from fleetctl.prompt import check_template

FORGE = "https://forge.example.org"
TASK = {"task_id": "t-1", "title": "Fix the parser", "repo": "acme/widgets", "issue_number": 12}
MATRIX = MatrixConfig(homeserver="https://m.example.org", access_token="tok", room_id="!r:m.example.org")


def ev(kind, data=None, *, attempt=2, agent_id="box.codex", task_id="t-1", id=7):  # noqa: A002
    return {"id": id, "ts": 100.0, "type": kind, "task_id": task_id, "agent_id": agent_id, "attempt": attempt,
            "data": data or {}}  # fmt: skip


class _Text(HTMLParser):
    """The text of an HTML fragment, and its tags with their attributes (to check what the markup is)."""

    def __init__(self, markup: str):
        super().__init__()
        self.text, self.tags = "", []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data


@pytest.mark.parametrize(
    ("event", "body"),
    [
        (ev("task.failed", {"reason": "agent_error", "detail": "exit 3: the tests failed"}),
         "❌ Task t-1 failed (attempt 2) (agent_error: exit 3: the tests failed) — Fix the parser — acme/widgets#12 "
         "https://forge.example.org/acme/widgets/issues/12"),
        (ev("task.awaiting_review", {"pull_request": {"number": 34}}),
         "👀 Task t-1 awaits review (attempt 2) — pull request #34 https://forge.example.org/acme/widgets/pulls/34 "
         "— Fix the parser — acme/widgets#12 https://forge.example.org/acme/widgets/issues/12"),
        (ev("task.completed", {"pull_request": {"number": 34, "html_url": "https://forge.example.org/x/y/pulls/34"}}),
         "✅ Task t-1 completed — pull request #34 https://forge.example.org/x/y/pulls/34 merged — Fix the parser — "
         "acme/widgets#12 https://forge.example.org/acme/widgets/issues/12"),
        (ev("task.completed", {"receipt": {"summary": "wrote the\nchangelog"}}),
         "✅ Task t-1 completed — wrote the changelog — Fix the parser — acme/widgets#12 "
         "https://forge.example.org/acme/widgets/issues/12"),
        (ev("agent.offline", {"reason": "missed heartbeats"}, task_id=None, attempt=None),
         "⚠️ Agent box.codex went offline (missed heartbeats)"),
        (ev("host.down", {"host_id": "box", "error": "connection refused"}, task_id=None, agent_id=None),
         "⚠️ Host box is down (connection refused)"),
        (ev("task.assigned", attempt=1), "Task t-1 was given to box.codex (attempt 1) — Fix the parser — "
         "acme/widgets#12 https://forge.example.org/acme/widgets/issues/12"),
    ],
)  # fmt: skip
def test_each_kind_reads_well_in_text_and_in_html(event, body):
    task = TASK if event["task_id"] else None
    text, markup = message_for(event, task, forgejo_url=FORGE)
    assert text == body
    parsed = _Text(markup)
    # the HTML says the same, and its only tags are these (no markup from the data)
    assert " ".join(parsed.text.split()) == " ".join(re.sub(r" https://\S+", "", body).split())
    assert {tag for tag, _ in parsed.tags} <= {"a", "b", "code"}
    assert all(attrs["href"].startswith("https://") for tag, attrs in parsed.tags if tag == "a")


def test_every_value_from_a_task_or_an_agent_is_escaped_in_the_html():
    task = {**TASK, "title": '<img src=x onerror=alert(1)> & "quotes"'}
    hostile = ev("task.failed", {"reason": "agent_error", "detail": "</code><script>x</script>"},
                 agent_id="<b>me</b>")  # fmt: skip
    text, markup = message_for(hostile, task, forgejo_url=FORGE)
    assert "<img" not in markup and "<script>" not in markup and "&lt;img src=x onerror=alert(1)&gt;" in markup
    assert '<img src=x onerror=alert(1)> & "quotes"' in text  # the plain body keeps the text as it is
    pr = ev("task.awaiting_review", {"pull_request": {"number": 3, "html_url": 'javascript:alert(1)"'}})
    _, markup = message_for(pr, TASK, forgejo_url=FORGE)
    assert "javascript:" not in [a.get("href", "") for _, a in _Text(markup).tags][0:1]
    assert 'href="javascript' not in markup
    long = ev("task.failed", {"reason": "agent_error", "detail": "x" * 5000})
    assert len(message_for(long, TASK)[0]) < 600  # a detail is cut


def test_without_forgejo_or_an_issue_there_are_no_links():
    text, markup = message_for(ev("task.failed", {"reason": "timeout"}), {"task_id": "t-1", "title": "local"})
    assert text == "❌ Task t-1 failed (attempt 2) (timeout) — local" and "<a " not in markup


def test_a_template_fills_fields_and_escapes_them_in_html():
    template = "{kind}: {task_id} «{title}» {issue_url} {pr_url}"
    assert check_template(template, FIELDS) is None
    event = ev("task.awaiting_review", {"pull_request": {"number": 34}})
    text, markup = message_for(event, {**TASK, "title": "<b>x</b>"}, forgejo_url=FORGE, template=template)
    assert text == ("task.awaiting_review: t-1 «<b>x</b>» https://forge.example.org/acme/widgets/issues/12 "
                    "https://forge.example.org/acme/widgets/pulls/34")  # fmt: skip
    assert "&lt;b&gt;x&lt;/b&gt;" in markup and "<b>" not in markup
    assert '<a href="https://forge.example.org/acme/widgets/pulls/34">' in markup
    # a literal in the template is text too
    assert message_for(event, TASK, template="<i>{task_id}</i>")[1] == "&lt;i&gt;t-1&lt;/i&gt;"
    assert check_template("{nope}", FIELDS).startswith("unknown placeholder {nope}")


def test_every_field_is_filled_for_every_kind():
    for kind in KINDS:
        f = fields_for(ev(kind), TASK, FORGE)
        assert set(f) == set(FIELDS) and all(isinstance(v, str) for v in f.values())
        assert message_for(ev(kind), TASK, forgejo_url=FORGE) is not None
    assert message_for(ev("task.progress"), TASK) is None  # not an announced kind
    assert set(DEFAULT_KINDS) <= set(KINDS) and DEFAULT_KINDS == MatrixConfig().events


def test_a_batch_is_one_line_per_message():
    one = ("a", "<b>a</b>")
    assert batch_message([one]) == one
    assert batch_message([one, ("b", "b")]) == ("a\nb", "<b>a</b><br>\nb")


# ---------------------------------------------------------------------------------------------- matrix_effects


def test_only_the_configured_kinds_become_rows_and_only_with_matrix_configured():
    failed = ev("task.failed", {"reason": "timeout"})
    (row,) = effects.matrix_effects(failed, TASK, MATRIX, FORGE)
    assert row["target"] == "matrix" and row["kind"] == "message" and row["event_id"] == 7
    assert row["task_id"] == "t-1" and row["payload"]["event"] == "task.failed"
    assert row["payload"]["body"].startswith("❌ Task t-1 failed")
    assert effects.matrix_effects(ev("task.assigned"), TASK, MATRIX, FORGE) == []  # not in the default kinds
    only = MatrixConfig(homeserver="https://m", room_id="!r", events=("task.assigned",))
    assert effects.matrix_effects(failed, TASK, only, FORGE) == []
    assert len(effects.matrix_effects(ev("task.assigned"), TASK, only, FORGE)) == 1
    assert effects.matrix_effects(failed, TASK, MatrixConfig(), FORGE) == []  # no homeserver
    no_token = MatrixConfig(homeserver="https://m", room_id="!r")  # rows wait for a process that has the token
    assert len(effects.matrix_effects(failed, TASK, no_token, FORGE)) == 1 and not no_token.ready
    offline = ev("agent.offline", {"reason": "missed heartbeats"}, task_id=None, attempt=None)
    (row,) = effects.matrix_effects(offline, None, MATRIX, None)
    assert row["task_id"] is None and row["repo"] is None


def test_long_messages_are_cut_and_long_links_left_out():
    from fleetctl.matrix.messages import MAX_MESSAGE

    event = ev("task.awaiting_review", {"pull_request": {"number": 3, "html_url": "https://x.org/" + "a" * 5000}})
    text, markup = message_for(event, TASK)
    assert "https://x.org/" not in text and "<a " not in markup  # a 5 kB link from a receipt is not shown
    big = message_for(ev("task.failed"), TASK, template="{title:>4000}{title:>4000} <{task_id}>")
    assert len(big[0]) == MAX_MESSAGE and big[0].endswith("…") and big[1] == big[0].replace("<", "&lt;")
