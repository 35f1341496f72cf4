"""``fleetctl usage``: what the fleet spent, from the usage agents report (budgets: docs/forgejo.md §12)."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, load, open_store, print_json


@cli_errors
def usage(
    by: Annotated[str, typer.Option("--by", help="Group by task, repo, agent or day (UTC).")] = "task",
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="DURATION", help="Only attempts started this long ago or later (24h, 7d)."),
    ] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Report spend: attempts with a usage report, tokens in and out, and dollars, grouped, biggest first.

    The figures are the agents' own reports (receipts and status reports with usage); a later report of an
    attempt replaces its earlier one. The last line is the total.

    Example: fleetctl usage --by repo --since 7d
    """
    import time

    from fleetctl import services
    from fleetctl.cli._common import Col, print_table
    from fleetctl.durations import DURATION_HINT, parse_duration
    from fleetctl.errors import UsageError

    start = None
    if since is not None:
        secs = parse_duration(since)
        if secs is None or secs <= 0:
            raise UsageError(f"--since must be {DURATION_HINT}, got {since!r}")
        start = time.time() - secs
    cfg = load(config)
    with open_store(cfg) as store:
        doc = services.usage_report(store, by, start)
    if json_:
        print_json(doc)
        return
    rows = [[i["key"], i["attempts"], f"{i['input_tokens']:,}", f"{i['output_tokens']:,}", f"${i['cost_usd']:,.2f}"]
            for i in doc["items"]]  # fmt: skip
    t = doc["total"]
    rows.append(["total", t["attempts"], f"{t['input_tokens']:,}", f"{t['output_tokens']:,}", f"${t['cost_usd']:,.2f}"])
    print_table(None, [Col(by.upper(), "id"), Col("ATTEMPTS"), Col("INPUT TOKENS"), Col("OUTPUT TOKENS"), Col("COST")],
                rows)  # fmt: skip
