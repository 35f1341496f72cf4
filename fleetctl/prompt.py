"""The prompt an agent receives: a template filled with the task (SPEC §8).

The built-in template tells the agent what to do, which branch to use and how to report; operators
override it with ``orchestrator.prompt_template`` (the ``{placeholders}`` in ``FIELDS``; ``check_template``
refuses anything else at config load, so a launch never meets a template it cannot fill).
"""

from __future__ import annotations

import re

DEFAULT_TEMPLATE = """\
# Task {task_id} (attempt {attempt} of {max_attempts})

{title}

{body}

## Context
- Repository: {repo_or_none}
- Issue: {issue_ref}
- Clone URL: {clone_url}
- Labels: {labels}
- Work on the branch `{branch}` (reuse it if it exists: this attempt may be a retry).
{review}
## When you are done
Hand in a receipt, once, from your workspace:

    fleetctl task complete {task_id} --summary "what you did" [--pr NUMBER]

(`FLEET_TASK_ID`, `FLEET_ATTEMPT` and `FLEET_AGENT_ID` are set for you.) If you cannot do the task, run
`fleetctl task complete {task_id} --outcome failure --summary "why"`. Open the pull request with
`Closes #{issue_or_n}` in its body. Make every side effect idempotent: a retried attempt must update the
same branch and pull request, not open new ones.
"""


FIELDS = (
    "task_id", "attempt", "max_attempts", "title", "body", "repo", "repo_or_none", "issue_number", "issue_ref",
    "issue_or_n", "clone_url", "labels", "branch", "review",
)  # fmt: skip
"""The placeholders a template may use: exactly the values ``render_prompt`` supplies."""

# a format spec for text: [[fill]align][width][.precision][s], width and precision at most 4 digits
_SPEC_RE = re.compile(r"^(?:.?[<>^])?[0-9]{0,4}(?:\.[0-9]{1,4})?s?\Z", re.S)


def check_template(template: str, fields: tuple[str, ...] = FIELDS) -> str | None:
    """What is wrong with ``template`` as a prompt template, or None when ``render_prompt`` can fill it.

    A template is ``str.format`` text using only the names in ``fields`` (the prompt's ``FIELDS``; the
    Matrix message template checks against its own) — no positional ``{}``/``{0}``,
    no attribute or index access (``{title.upper}``, ``{title[0]}``), conversions ``!s``/``!r``/``!a``
    and text format specs (``{title:>40.40}``) allowed; ``{{`` and ``}}`` are literal braces.

    Example:
        >>> check_template("{title} on {branch}") is None
        True
        >>> check_template("{title[0]}")
        '{title[0]}: attribute and index access are not allowed; use {title}'
    """
    import string  # only when a template is checked (config load with a template, a launch)

    if not isinstance(template, str):
        return f"expected a string, got {type(template).__name__}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"{exc} (write {{{{ and }}}} for literal braces)"
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base in fields and base != name:
            return f"{shown}: attribute and index access are not allowed; use {{{base}}}"
        if name not in fields:
            known = ", ".join("{" + f + "}" for f in fields)
            what = "positional placeholder" if base == "" or base.isdigit() else "unknown placeholder"
            return f"{what} {shown}: use one of {known}, or write {{{{ and }}}} for literal braces"
        if conversion not in (None, "s", "r", "a"):
            return f"{shown}: unknown conversion !{conversion} (use !s, !r or !a)"
        if spec and not _SPEC_RE.match(spec):
            return (
                f"{shown}: unsupported format spec {spec!r} (placeholders are text: [[fill]align][width][.precision])"
            )
    try:
        template.format_map(dict.fromkeys(fields, "x"))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:  # belt and braces
        return f"cannot be filled: {exc}"
    return None


def render_prompt(task: dict, attempt: int, template: str | None = None, forgejo_url: str | None = None) -> str:
    """Fill the template for ``task`` at ``attempt``; a template ``check_template`` refuses raises ConfigError."""
    text = template or DEFAULT_TEMPLATE
    if text is not DEFAULT_TEMPLATE:
        problem = check_template(text)
        if problem is not None:
            from fleetctl.errors import ConfigError

            raise ConfigError(f"orchestrator.prompt_template: invalid template: {problem}", code="invalid_template")
    repo = task.get("repo")
    issue = task.get("issue_number")
    clone = f"{forgejo_url.rstrip('/')}/{repo}.git" if forgejo_url and repo else "(none)"
    values = dict(
        task_id=task["task_id"], attempt=attempt, max_attempts=task["max_attempts"], title=task["title"],
        body=task.get("body") or "", repo=repo or "", repo_or_none=repo or "(none)",
        issue_ref=f"{repo}#{issue}" if repo and issue else "(none)", issue_or_n=issue or "N",
        issue_number=issue or "", clone_url=clone, labels=", ".join(task.get("labels") or []) or "(none)",
        branch=f"fleet/{task['task_id']}", review=review_section(task),
    )  # fmt: skip
    out = text.format_map({k: str(v) for k, v in values.items()})
    if values["review"] and "{review}" not in text:  # an operator's template without the placeholder
        out = out.rstrip("\n") + "\n" + values["review"]
    return out


def review_section(task: dict) -> str:
    """For a ``rework`` attempt: the review to address — its round, the reviewer's words, each inline comment as
    ``path:line`` (a removed line: its line before the change) and its text — and where to push; '' for any
    other attempt."""
    review = task.get("review")
    if task.get("attempt_kind") != "rework" or not isinstance(review, dict):
        return ""
    pr = review.get("pr")
    who = f" by @{review['reviewer']}" if review.get("reviewer") else ""
    lines = ["", f"## Review to address (review round {review.get('round', '?')})", "",
             f"Changes were requested on pull request #{pr}{who}. Address every point below, then push to the same "
             f"branch `fleet/{task['task_id']}` and update the same pull request #{pr}; do not open a new one. Hand "
             "in your receipt naming that pull request again.", ""]  # fmt: skip
    if review.get("body"):
        lines += ["The reviewer wrote:", "", *("> " + line for line in str(review["body"]).splitlines()), ""]
    comments = review.get("comments") or []
    if comments:
        lines += ["Inline comments:", ""]
        for c in comments:
            path, line = c.get("path") or "?", c.get("line")
            text = " ".join(str(c.get("body") or "").split())
            if line and c.get("old"):  # a removed line: its number in the version before the pull request
                lines.append(f"- `{path}` (line {line} before your change, now removed): {text}")
            else:
                lines.append(f"- `{path}:{line}`: {text}" if line else f"- `{path}`: {text}")
        lines.append("")
    return "\n".join(lines)
