"""The prompt an agent receives: a template filled with the task (SPEC §8).

The built-in template tells the agent what to do, which branch to use and how to report; operators
override it with ``orchestrator.prompt_template`` (``{placeholders}`` as below; unknown ones stay as-is).
"""

from __future__ import annotations

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

## When you are done
Hand in a receipt, once, from your workspace:

    fleetctl task complete {task_id} --summary "what you did" [--pr NUMBER]

(`FLEET_TASK_ID`, `FLEET_ATTEMPT` and `FLEET_AGENT_ID` are set for you.) If you cannot do the task, run
`fleetctl task complete {task_id} --outcome failure --summary "why"`. Open the pull request with
`Closes #{issue_or_n}` in its body. Make every side effect idempotent: a retried attempt must update the
same branch and pull request, not open new ones.
"""


class _Keep(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_prompt(task: dict, attempt: int, template: str | None = None, forgejo_url: str | None = None) -> str:
    """Fill the template for ``task`` at ``attempt``."""
    repo = task.get("repo")
    issue = task.get("issue_number")
    clone = f"{forgejo_url.rstrip('/')}/{repo}.git" if forgejo_url and repo else "(none)"
    values = _Keep(
        task_id=task["task_id"], attempt=attempt, max_attempts=task["max_attempts"], title=task["title"],
        body=task.get("body") or "", repo=repo or "", repo_or_none=repo or "(none)",
        issue_ref=f"{repo}#{issue}" if repo and issue else "(none)", issue_or_n=issue or "N",
        issue_number=issue or "", clone_url=clone, labels=", ".join(task.get("labels") or []) or "(none)",
        branch=f"fleet/{task['task_id']}",
    )  # fmt: skip
    return (template or DEFAULT_TEMPLATE).format_map(values)
