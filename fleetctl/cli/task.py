"""``fleetctl task …``: create, inspect and act on tasks; ``complete`` is what agents shell out to."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from fleetctl.cli._common import (
    INT64_MAX,
    MAX_LIMIT,
    ApiUrlOpt,
    ConfigOpt,
    JsonOpt,
    TokenOpt,
    cli_errors,
    err,
    load,
    open_store,
    print_json,
)
from fleetctl.cli.render import render_task, render_task_list
from fleetctl.errors import UsageError

app = typer.Typer(help="Create, list, inspect, cancel, retry and complete tasks.", no_args_is_help=True)

TaskIdArg = Annotated[str, typer.Argument(help="The task id.", show_default=False, metavar="TASK_ID")]
AttemptOpt = Annotated[
    int | None,
    typer.Option(
        "--attempt",
        help="Attempt number (the fencing token); default $FLEET_ATTEMPT.",
        min=1,
        max=INT64_MAX,
        metavar="N",
    ),  # fmt: skip
]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Acting agent id; default $FLEET_AGENT_ID.")]
RetryAfterOpt = Annotated[
    int | None,
    typer.Option("--retry-after", min=0, max=INT64_MAX, metavar="SECS",
                 help="With rate_limited: seconds until the usage limit resets (default: the fleet's cooldown)."),
]  # fmt: skip
InputTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--input-tokens", min=0, max=INT64_MAX, metavar="N", help="Usage: input tokens of this attempt so far."
    ),
]
OutputTokensOpt = Annotated[
    int | None,
    typer.Option("--output-tokens", min=0, max=INT64_MAX, metavar="N",
                 help="Usage: output tokens of this attempt so far."),
]  # fmt: skip
CostOpt = Annotated[
    str | None, typer.Option("--cost-usd", metavar="USD", help="Usage: this attempt's cost so far, in dollars (0.42).")
]


def _usage(input_tokens: int | None, output_tokens: int | None, cost_usd: str | None) -> dict | None:
    """The usage options as a receipt's/status report's ``usage`` (None when none is given); checked by
    ``receipts.parse_usage`` on the way (a bad value is exit 2 before anything is sent)."""
    from fleetctl.receipts import parse_usage

    cost: float | str | None = cost_usd
    if cost_usd is not None:
        try:
            cost = float(cost_usd)
        except ValueError:
            raise UsageError(f"--cost-usd must be a number of dollars >= 0, got {cost_usd!r}") from None
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost}
    usage = {k: v for k, v in usage.items() if v is not None}
    try:
        return parse_usage(usage) or None
    except UsageError as exc:
        raise UsageError(exc.message.replace("usage.", "--").replace("_", "-")) from None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"${name} must be an integer, not {value!r}") from None
    if not 1 <= number <= INT64_MAX:
        raise UsageError(f"${name} must be an integer from 1 to {INT64_MAX}, not {value}")
    return number


@app.command("create")
@cli_errors
def task_create(
    title: Annotated[str, typer.Option("--title", help="Task title.")],
    body: Annotated[str, typer.Option("--body", help="Task body (the issue text).")] = "",
    repo: Annotated[str | None, typer.Option("--repo", help="Forgejo repository owner/name.")] = None,
    issue: Annotated[
        int | None, typer.Option("--issue", help="Issue number in --repo.", min=1, max=INT64_MAX, metavar="N")
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="A label; repeatable.")] = None,
    task_id: Annotated[str | None, typer.Option("--id", help="Use this task id instead of a generated one.")] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Create a queued task and print its id (or the task as JSON).

    Labels `agent:X` require capability X; `priority:N`, `retries:N` and `timeout:DURATION` (90s, 30m, 2h) tune it.

    Example: fleetctl task create --title "Fix the flaky test" --label agent:code:python --label priority:5
    """
    from fleetctl import services

    cfg = load(config)
    with open_store(cfg) as store:
        task = services.create_task(store, cfg.orchestrator, title=title, body=body, labels=label or [], repo=repo,
                                    issue_number=issue, task_id=task_id)  # fmt: skip
    for warning in task["warnings"]:
        err(f"warning: {warning}")
    print_json({**services.task_view(task), "warnings": task["warnings"]}) if json_ else print(task["task_id"])


@app.command("list")
@cli_errors
def task_list(
    state: Annotated[list[str] | None, typer.Option("--state", "-s", help="Only this state; repeatable.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only tasks held by this agent.")] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Only tasks of this repository.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="At most this many (0: no limit).", min=0, max=MAX_LIMIT, metavar="N")
    ] = 100,
    after: Annotated[
        int | None,
        typer.Option(
            "--after", help="Page: the 'next' cursor of the previous page.", min=0, max=INT64_MAX, metavar="CURSOR"
        ),
    ] = None,  # fmt: skip
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List tasks in creation order.

    Example: fleetctl task list --state queued --state running --json
    """
    from fleetctl import services

    cfg = load(config)
    items: list[dict] = []
    cursor = after
    with open_store(cfg) as store:
        while True:  # pages of the service's size until --limit (0: all) is reached
            size = min(services.views.MAX_PAGE, limit - len(items)) if limit else services.views.MAX_PAGE
            page = services.list_tasks(store, states=state or (), agent_id=agent, repo=repo, cursor=cursor,
                                       limit=size)  # fmt: skip
            items += page["items"]
            cursor = page["next"]
            if cursor is None or (limit and len(items) >= limit):
                break
    if json_:
        print_json({"items": items, "next": cursor})
    else:
        render_task_list(items, cursor)


@app.command("show")
@cli_errors
def task_show(task_id: TaskIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show a task with its attempts and events.

    Each attempt says where its workspace is (host:path), or when the sweep removed it.

    Example: fleetctl task show t-3f9a1c2b7e --json
    """
    from fleetctl import services

    cfg = load(config)
    with open_store(cfg) as store:
        doc = services.task_detail(store, task_id)
    print_json(doc) if json_ else render_task(doc)


@app.command("cancel")
@cli_errors
def task_cancel(
    task_id: TaskIdArg,
    reason: Annotated[str, typer.Option("--reason", help="Why; kept in the event.")] = "cancelled by operator",
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Cancel a task that is not finished (a running attempt is told at its next heartbeat or sweep).

    Example: fleetctl task cancel t-3f9a1c2b7e --reason "duplicate of #12"
    """
    from fleetctl import services

    cfg = load(config)
    with open_store(cfg) as store:
        task = services.cancel_task(store, task_id, reason)
    _done(task, json_)


@app.command("retry")
@cli_errors
def task_retry(task_id: TaskIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Re-queue a failed or cancelled task with a fresh attempt budget.

    Example: fleetctl task retry t-3f9a1c2b7e
    """
    from fleetctl import services

    cfg = load(config)
    with open_store(cfg) as store:
        task = services.retry_task(store, cfg.orchestrator, task_id)
    _done(task, json_)


def _done(task: dict, json_: bool) -> None:
    from fleetctl import services

    if json_:
        print_json(services.task_view(task))
    else:
        print(f"{task['task_id']} {task['state']}")


@app.command("complete")
@cli_errors
def task_complete(
    task_id: TaskIdArg,
    attempt: AttemptOpt = None,
    outcome: Annotated[
        str,
        typer.Option("--outcome", help="success, failure, or rate_limited (a usage limit: re-queued, no retry used)."),
    ] = "success",
    retry_after: RetryAfterOpt = None,
    summary: Annotated[str, typer.Option("--summary", help="What was done (or why it failed).")] = "",
    pr: Annotated[
        list[int] | None,
        typer.Option(
            "--pr", help="Pull request number in the task's repo; repeatable.", min=1, max=INT64_MAX, metavar="N"
        ),
    ] = None,  # fmt: skip
    pr_url: Annotated[list[str] | None, typer.Option("--pr-url", help="Pull request URL; repeatable.")] = None,
    branch: Annotated[str | None, typer.Option("--branch", help="Branch the work is on.")] = None,
    receipt: Annotated[
        str | None,
        typer.Option("--receipt", help="Receipt JSON file, or - for stdin (shape: skill/SKILL.md, docs/agent-api.md)."),
    ] = None,
    input_tokens: InputTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    cost_usd: CostOpt = None,
    agent: AgentOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Hand in the receipt for a task's attempt (what agents run when they finish).

    Exit 0 accepted (or an identical repeat), 4 lease lost, 6 receipt rejected. --outcome rate_limited says
    the agent hit a usage limit: the task goes back to the queue without using a retry and the agent rests for
    --retry-after seconds. --input-tokens/--output-tokens/--cost-usd report the attempt's usage (for budgets).
    With --api-url or $FLEET_API_URL it goes through that fleetctl serve (the acting agent is the token's).

    Example: fleetctl task complete "$FLEET_TASK_ID" --summary "Fixed the parser" --pr 12 --cost-usd 0.42
    """
    from fleetctl.gateway import open_gateway

    attempt = attempt if attempt is not None else _env_int("FLEET_ATTEMPT")
    agent = agent or os.environ.get("FLEET_AGENT_ID") or None
    usage = _usage(input_tokens, output_tokens, cost_usd)
    if retry_after is not None and outcome != "rate_limited":
        raise UsageError("--retry-after goes with --outcome rate_limited")
    if receipt is not None and (usage is not None or retry_after is not None):
        raise UsageError("with --receipt, put usage and retry_after_secs in the receipt itself")
    with open_gateway(api_url, token, "task", lambda: load(config)) as gateway:
        doc = _receipt_doc(receipt, outcome, summary, pr or [], pr_url or [], branch, _receipt_cap(gateway))
        if retry_after is not None:
            doc["retry_after_secs"] = retry_after
        if usage is not None:
            doc["usage"] = usage
        out = gateway.complete(task_id, doc, attempt=attempt, agent_id=agent)
    if out.get("pending"):
        print(f"{task_id}: Forgejo could not be reached; the receipt is stored and will be validated when "
              "Forgejo answers (the task keeps its state and lease)", file=sys.stderr)  # fmt: skip
    if json_:
        print_json(out)
    else:
        note = " (repeat: already recorded)" if out["repeated"] else ""
        print(f"{task_id} {out['state']}{note}")


def _receipt_cap(gateway) -> int:
    """What a receipt may weigh: the API's body cap (the local config's, else the default)."""
    from fleetctl.gateway import DEFAULT_MAX_RECEIPT_BYTES

    cfg = getattr(gateway, "cfg", None)
    return cfg.server.max_body_bytes if cfg is not None else DEFAULT_MAX_RECEIPT_BYTES


def _receipt_doc(path: str | None, outcome: str, summary: str, prs: list[int], urls: list[str], branch: str | None,
                 cap: int) -> dict:  # fmt: skip
    if outcome not in ("success", "failure", "rate_limited"):
        raise UsageError("--outcome must be success, failure or rate_limited")
    if path is not None:
        from fleetctl.gateway import read_receipt

        return read_receipt(path, cap)
    artifacts = [{"kind": "pull_request", "number": n} for n in prs]
    artifacts += [{"kind": "pull_request", "url": u} for u in urls]
    if branch:
        artifacts.append({"kind": "branch", "name": branch})
    return {"outcome": outcome, "summary": summary, "artifacts": artifacts}


@app.command("status")
@cli_errors
def task_status(
    task_id: TaskIdArg,
    status: Annotated[
        str, typer.Option("--status", help="running (the run started), progress, or rate_limited (a usage limit).")
    ] = "progress",
    message: Annotated[str, typer.Option("--message", "-m", help="Progress text.")] = "",
    retry_after: RetryAfterOpt = None,
    input_tokens: InputTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    cost_usd: CostOpt = None,
    attempt: AttemptOpt = None,
    agent: AgentOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Report that the run started, a line of progress, usage so far, or a usage limit, for the current attempt.

    With --status running and a --message, both are recorded or neither (a refused message leaves the
    task as it was). --status rate_limited ends the attempt: the task goes back to the queue without using a
    retry and the agent rests for --retry-after seconds. A report whose usage takes the task over its budget
    ends the attempt (budget_exceeded). With --api-url or $FLEET_API_URL it goes through that fleetctl serve.

    Example: fleetctl task status "$FLEET_TASK_ID" --message "tests pass, opening the PR" --cost-usd 0.31
    """
    from fleetctl.gateway import open_gateway

    if status not in ("running", "progress", "rate_limited"):
        raise UsageError("--status must be running, progress or rate_limited")
    if retry_after is not None and status != "rate_limited":
        raise UsageError("--retry-after goes with --status rate_limited")
    attempt = attempt if attempt is not None else _env_int("FLEET_ATTEMPT")
    agent = agent or os.environ.get("FLEET_AGENT_ID") or None
    with open_gateway(api_url, token, "task", lambda: load(config)) as gateway:
        view = gateway.status(task_id, status, message, attempt=attempt, agent_id=agent, retry_after=retry_after,
                              usage=_usage(input_tokens, output_tokens, cost_usd))  # fmt: skip
    print_json(view) if json_ else print(f"{view['task_id']} {view['state']}")


NOT_SETTLED = {
    "attempt_over": "the attempt was settled already (its receipt came first, or it is over)",
    "receipt_pending": "its receipt waits for Forgejo",
    "deferred": "Forgejo could not be asked about the branch's pull request; the sweep settles it",
}
"""What ``task run-ended`` says when its report settled nothing, by the service's ``reason``."""


@app.command("run-ended")
@cli_errors
def task_run_ended(
    task_id: TaskIdArg,
    exit_code: Annotated[
        int, typer.Option("--exit-code", help="The run's exit status.", min=-(2**31), max=2**31 - 1, metavar="CODE")
    ],
    attempt: AttemptOpt = None,
    detail: Annotated[str, typer.Option("--detail", help="A note kept with the failure, e.g. the end of stderr.")] = "",
    retry_after: RetryAfterOpt = None,
    agent: AgentOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Settle an attempt whose run ended (the run wrapper calls this; the sweep does it otherwise).

    If the agent handed in no receipt, the attempt fails: no_receipt (exit 0) or agent_error; exit code 75 is a
    usage limit (re-queued, the agent rests for --retry-after seconds). If it did, nothing changes (exit 0,
    "not settled"). With --api-url or $FLEET_API_URL it goes through that fleetctl serve.

    Example: fleetctl task run-ended t-3f9a1c2b7e --attempt 1 --exit-code 0
    """
    from fleetctl.gateway import open_gateway

    attempt = attempt if attempt is not None else _env_int("FLEET_ATTEMPT")
    if attempt is None:
        raise UsageError("--attempt (or $FLEET_ATTEMPT) is required")
    agent = agent or os.environ.get("FLEET_AGENT_ID") or None
    with open_gateway(api_url, token, "task", lambda: load(config)) as gateway:
        out = gateway.run_ended(task_id, attempt, exit_code, detail, agent_id=agent, retry_after=retry_after)
    if json_:
        print_json(out)
    elif out["settled"]:
        print(f"{task_id} {out['state']}")
    else:
        print(f"{task_id} not settled: {NOT_SETTLED.get(out['reason'], out['reason'])} (the task is {out['state']})")
