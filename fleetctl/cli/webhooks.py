"""``fleetctl ingest-webhook`` and ``fleetctl deliveries list|show``: Forgejo deliveries from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, err, load, open_store, print_fields, print_json

app = typer.Typer(help="Forgejo webhook deliveries received: what came in, and why it was accepted, ignored or "
                  "rejected.", no_args_is_help=True)  # fmt: skip

MAX_HEADERS_BYTES = 64 * 1024


@cli_errors
def ingest_webhook(
    file: Annotated[str, typer.Option("--file", "-f", help="The raw body: a file, or - for stdin.")] = "-",
    event: Annotated[str | None, typer.Option("--event", help="X-Forgejo-Event, e.g. issues.")] = None,
    delivery: Annotated[str | None, typer.Option("--delivery", help="X-Forgejo-Delivery (the delivery id).")] = None,
    signature: Annotated[
        str | None, typer.Option("--signature", help="X-Forgejo-Signature: lowercase hex HMAC-SHA256 of the body.")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--event-type", help="X-Forgejo-Event-Type, e.g. issue_label (default: --event).")
    ] = None,
    headers: Annotated[
        Path | None,
        typer.Option(
            "--headers",
            help="A file of the delivery's headers ('Name: value' lines or a JSON object); "
            "the options above override it.",
            dir_okay=False,
        ),
    ] = None,  # fmt: skip
    unsigned: Annotated[
        bool, typer.Option("--unsigned", help="Apply without a signature: an operator's replay of a body you trust.")
    ] = False,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Verify and apply one Forgejo delivery from a file or stdin, as the webhook route would (relays, replays).

    The same delivery id twice is applied once. Exit 0 when accepted, ignored or a duplicate; 6 for a bad
    signature (nothing recorded); 2 for an unreadable delivery (recorded as rejected); 4 when the state
    machine refused the change (recorded).

    Example: fleetctl ingest-webhook --file body.json --event issues --delivery 0b6f2c1e --signature 9c1f…
    """
    from fleetctl.errors import ExitCode, UsageError
    from fleetctl.forgejo.webhooks import parse_header_block
    from fleetctl.gateway import read_capped
    from fleetctl.services import issues

    cfg = load(config)
    given = parse_header_block(read_capped(str(headers), MAX_HEADERS_BYTES, what="headers file", cap_key="64 KiB")
                               ) if headers else {}  # fmt: skip
    for name, value in (("X-Forgejo-Event", event), ("X-Forgejo-Event-Type", event_type),
                        ("X-Forgejo-Delivery", delivery), ("X-Forgejo-Signature", signature)):  # fmt: skip
        if value is not None:
            given = {k: v for k, v in given.items() if k.lower() != name.lower()} | {name: value}
    if not unsigned and not any(k.lower() in _SIGNATURE_NAMES for k in given):
        raise UsageError("no signature: give --signature, a --headers file with X-Forgejo-Signature, or --unsigned "
                         "to apply a body you trust")  # fmt: skip
    body = read_capped(file, cfg.server.webhook_max_body_bytes, what="webhook body",
                       cap_key="server.webhook_max_body_bytes")  # fmt: skip
    with open_store(cfg) as store:
        result = issues.ingest(store, cfg, given, body, source="cli", verified=unsigned)
    if json_:
        print_json(result.to_json())
    else:
        (err if result.error_code else print)(f"{result.verdict}: {result.detail}")
    if result.error_code:
        raise typer.Exit(int(ExitCode.USAGE))
    if result.verdict == "rejected":
        raise typer.Exit(int(ExitCode.CONFLICT))


_SIGNATURE_NAMES = ("x-forgejo-signature", "x-gitea-signature", "x-hub-signature-256")


@app.command("list")
@cli_errors
def deliveries_list(
    verdict: Annotated[str | None, typer.Option("--verdict", help="accepted, ignored or rejected.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.", min=1, max=10_000)] = 50,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List received deliveries, newest first.

    Example: fleetctl deliveries list --verdict rejected
    """
    from fleetctl.cli._common import Col, print_table
    from fleetctl.cli.render import ago
    from fleetctl.services import issues

    cfg = load(config)
    with open_store(cfg) as store:
        items = issues.list_deliveries(store, verdict=verdict, limit=limit)
    if json_:
        print_json({"items": items, "next": None})
        return
    rows = [(d["delivery_id"], ago(d["received_at"]), f"{d['event_type']}/{d['action']}".rstrip("/"),
             f"{d['repo']}#{d['number']}" if d["number"] else (d["repo"] or ""), d["verdict"], d["task_id"] or "",
             d["detail"])
            for d in items]  # fmt: skip
    print_table(None, [Col("DELIVERY", "id"), Col("RECEIVED", drop=2), Col("EVENT"), Col("ISSUE", drop=3),
                       Col("VERDICT"), Col("TASK", "id", drop=1), Col("DETAIL", "text")], rows)  # fmt: skip


@app.command("show")
@cli_errors
def deliveries_show(
    delivery_id: Annotated[str, typer.Argument(help="The delivery id.", metavar="DELIVERY_ID", show_default=False)],
    body: Annotated[bool, typer.Option("--body", help="Print the raw body as received (kept when accepted).")] = False,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show one delivery: its event, verdict and why; --body prints the raw body (to replay it).

    Example: fleetctl deliveries show 0b6f2c1e-… --body > body.json
    """
    import sys

    from fleetctl.services import issues

    cfg = load(config)
    with open_store(cfg) as store:
        doc, raw = issues.get_delivery(store, delivery_id)
    if body:
        if raw is None:
            err(f"delivery {delivery_id} was {doc['verdict']}: its body was not kept")
            raise typer.Exit(3)
        sys.stdout.buffer.write(raw)
        return
    if json_:
        print_json(doc)
        return
    print_fields(f"delivery {delivery_id}", [(k.replace("_", " "), v) for k, v in doc.items()])
