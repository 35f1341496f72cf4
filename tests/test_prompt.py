"""Prompt templates (issue 6): a template is checked once, at config load, against exactly the fields
``render_prompt`` supplies; a template that passes always renders, and one that does not raises only
ConfigError — never the ValueError/KeyError/IndexError/AttributeError that once became a 500 on dequeue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetctl.errors import ConfigError
from fleetctl.prompt import DEFAULT_TEMPLATE, FIELDS, check_template, render_prompt

TASK = {"task_id": "t-1", "max_attempts": 3, "title": "Fix it", "body": "b", "repo": "acme/api", "issue_number": 7,
        "labels": ["agent:docs", "bug"]}  # fmt: skip

BAD = [
    ("{0}", "positional placeholder {0}"),
    ("{}", "positional placeholder {}"),
    ("{nope}", "unknown placeholder {nope}: use one of {task_id}, {attempt}"),
    ("{title.__class__}", "{title.__class__}: attribute and index access are not allowed; use {title}"),
    ("{title[0]}", "{title[0]}: attribute and index access are not allowed"),
    ("{body.__class__.__mro__}", "attribute and index access are not allowed"),
    ("x {", "Single '{' encountered"),
    ("x } y", "Single '}' encountered"),
    ("{title", "expected '}'"),
    ("{title!x}", "unknown conversion !x"),
    ("{title:d}", "unsupported format spec 'd'"),
    ("{attempt:,}", "unsupported format spec ','"),
    ("{title:>99999999999}", "unsupported format spec"),  # would need gigabytes
    ("{title:{body}}", "unsupported format spec '{body}'"),
    ("{ title}", "unknown placeholder { title}"),
]


@pytest.mark.parametrize(("template", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_templates_are_named_and_render_raises_config_error(template, fragment):
    problem = check_template(template)
    assert problem is not None and fragment in problem, problem
    with pytest.raises(ConfigError) as info:
        render_prompt(TASK, 1, template)
    assert info.value.message == f"orchestrator.prompt_template: invalid template: {problem}"


@pytest.mark.parametrize(
    "template",
    ["", "plain text", "{{literal}} braces", "{title!r} {body!s} {labels!a}", "{title:>40.40}|{attempt:<3}",
     "{task_id:*^20}", "{title:.10}", "{branch}{branch}", DEFAULT_TEMPLATE],
)  # fmt: skip
def test_good_templates_render(template):
    assert check_template(template) is None
    assert isinstance(render_prompt(TASK, 1, template), str)


def test_every_field_is_filled():
    template = "\n".join(f"{name}={{{name}}}" for name in FIELDS)
    assert check_template(template) is None
    out = dict(
        line.split("=", 1) for line in render_prompt(TASK, 2, template, "https://forge.example.org/").split("\n")
    )
    assert out == {
        "task_id": "t-1", "attempt": "2", "max_attempts": "3", "title": "Fix it", "body": "b", "repo": "acme/api",
        "repo_or_none": "acme/api", "issue_number": "7", "issue_ref": "acme/api#7", "issue_or_n": "7",
        "clone_url": "https://forge.example.org/acme/api.git", "labels": "agent:docs, bug", "branch": "fleet/t-1",
        "review": "",  # a first attempt: no review to address (tests/test_reviews.py has a rework's)
    }  # fmt: skip


def test_a_format_spec_that_passes_fits_every_task():
    # values are text whatever the task: the spec checked at load time cannot fail on a task without an issue
    template = "{issue_number:>5}|{issue_or_n:>5}|{attempt:>5}"
    assert check_template(template) is None
    assert render_prompt({"task_id": "t", "max_attempts": 1, "title": "x"}, 1, template) == "     |    N|    1"
    assert render_prompt(TASK, 1, template) == "    7|    7|    1"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([*"{}!:.[]0<>^srax ", "title", "attempt", "nope", "99999"]), max_size=20).map("".join))
def test_any_template_is_accepted_and_renders_or_is_refused_with_config_error(template):
    problem = check_template(template)
    if problem is None:
        assert isinstance(render_prompt(TASK, 1, template), str)
    else:
        with pytest.raises(ConfigError):
            render_prompt(TASK, 1, template)
