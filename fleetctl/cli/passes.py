"""``fleetctl dispatch``, ``fleetctl sweep-timeouts`` and ``fleetctl sync``: the one-shot passes timers fire."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import MAX_LIMIT, ConfigOpt, JsonOpt, cli_errors, err, load, open_store, print_json


@cli_errors
def dispatch(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and print; claim and launch nothing.")] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Launch at most this many tasks.", min=0, max=MAX_LIMIT, metavar="N")
    ] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """One pass: assign queued tasks to the configured hosts' agents with free capacity and launch them.

    Then flushes the outbox (comments and labels for Forgejo). Safe to run from overlapping timers: a pass
    lock plus conditional claims.

    Example: fleetctl dispatch --dry-run
    """
    from fleetctl.passes import dispatch as run_dispatch

    cfg = load(config)
    with open_store(cfg) as store:
        report = run_dispatch(store, cfg, dry_run=dry_run, limit=limit)
    if json_:
        print_json(report.to_json())
    elif report.skipped:
        print(f"skipped: {report.skipped}")
    else:
        verb = "would assign" if dry_run else "launched"
        count = len(report.planned) if dry_run else len(report.launched)
        print(f"{verb} {count}, launch failures {len(report.failed)}, ready in queue {report.queued_ready}")
        if report.budget and report.budget["why"]:
            print(f"held back by a budget: {report.budget['why']}")
        for p in report.planned if dry_run else report.launched:
            print(f"  {p['task_id']} -> {p['agent_id']}")


@cli_errors
def sweep_timeouts(json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """One pass: hard timeouts, lost agents, ended or dead runs, expired leases, released backoff.

    Also checks pending receipts against Forgejo, forgets old webhook deliveries, removes the workspaces of
    attempts settled longer ago than orchestrator.workspace_retention_secs and flushes the outbox.

    Example: fleetctl sweep-timeouts --json
    """
    from fleetctl.passes import sweep

    cfg = load(config)
    with open_store(cfg) as store:
        report = sweep(store, cfg)
    if json_:
        print_json(report.to_json())
    elif report.skipped:
        print(f"skipped: {report.skipped}")
    else:
        print(f"{len(report.actions)} actions, {report.backoff_released} retries ready")
        for a in report.actions:
            print("  " + " ".join(f"{k}={v}" for k, v in a.items()))


@cli_errors
def sync(
    repo: Annotated[
        list[str] | None, typer.Option("--repo", help="Only this repository (owner/name); repeatable.")
    ] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Reconcile with Forgejo: labelled issues, closes and pull request merges that webhooks missed.

    Safe to run every few minutes; a second run changes nothing. Exit 5 when Forgejo failed for a repository
    (the others are still reconciled).

    Example: fleetctl sync --json
    """
    from fleetctl.errors import ExitCode
    from fleetctl.ids import check_repo
    from fleetctl.sync import sync as run_sync

    cfg = load(config)
    repos = [check_repo(r) for r in repo] if repo else None
    with open_store(cfg) as store:
        report = run_sync(store, cfg, repos=repos)
    if json_:
        print_json(report.to_json())
    elif report.skipped:
        print(f"skipped: {report.skipped}")
    else:
        print(f"{len(report.repositories)} repositories, {report.issues_seen} open issues, "
              f"{len(report.changes)} changes, {len(report.errors)} errors")  # fmt: skip
        for c in report.changes:
            print(f"  {c['repo']}#{c['number']}: {c['detail']}")
        for e in report.errors:
            err(f"error: {e['repo']}: {e['error']}")
    if report.errors:
        raise typer.Exit(int(ExitCode.REMOTE))
