"""``fleetctl outbox …``: perform and inspect the side effects waiting for Forgejo (comments, status labels) and
Matrix (messages)."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import MAX_LIMIT, ConfigOpt, JsonOpt, cli_errors, load, open_store, print_json

app = typer.Typer(help="Perform and inspect the side effects waiting for Forgejo and Matrix.", no_args_is_help=True)


@app.command("flush")
@cli_errors
def outbox_flush(json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Derive side effects from new events and perform the due ones now (dispatch and sweep do it too).

    A Forgejo or Matrix failure is not an error here: the row is retried later (see `fleetctl outbox list`).

    Example: fleetctl outbox flush --json
    """
    from fleetctl.outbox import flush

    cfg = load(config)
    with open_store(cfg) as store:
        report = flush(store, cfg)
    if json_:
        print_json(report.to_json())
    elif report.skipped:
        print(f"skipped: {report.skipped}")
    else:
        print(f"queued {report.enqueued}, sent {report.sent}, superseded {report.superseded}, "
              f"retry later {report.retried}, dead {report.dead}, waiting {report.deferred}")  # fmt: skip


@app.command("list")
@cli_errors
def outbox_list(
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="Only this state (pending, done, superseded, dead); repeatable."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="At most this many, newest first.", min=1, max=MAX_LIMIT, metavar="N")
    ] = 100,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List outbox rows, newest first, with their tries and last error.

    Example: fleetctl outbox list --state pending --state dead
    """
    from fleetctl.cli.render import render_outbox
    from fleetctl.outbox import list_rows

    cfg = load(config)
    with open_store(cfg) as store:
        doc = list_rows(store, states=state or (), limit=limit)
    if json_:
        print_json(doc)
    else:
        render_outbox(doc)
