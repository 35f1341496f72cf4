"""``fleetctl notify …``: Matrix notifications (docs/matrix.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, load, open_store, print_json

app = typer.Typer(help="Matrix notifications: check the setup.", no_args_is_help=True)


@app.command("test")
@cli_errors
def notify_test(
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="The text to send (default: a short test message).")
    ] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Send one message to the configured Matrix room, and say exactly what is wrong when it cannot.

    Checks, in order: [matrix] is complete (exit 2), the homeserver answers and takes the access token,
    the room exists and the bot has joined it, the message is sent (exit 5 with the reason otherwise).

    Example: fleetctl notify test --message "hello from fleetctl"
    """
    from fleetctl.matrix.setup import DEFAULT_TEST_MESSAGE, check_setup

    cfg = load(config)
    with open_store(cfg) as store:  # the room as the outbox knows it (an alias resolved once, kept there)
        result = check_setup(store, cfg.matrix, message or DEFAULT_TEST_MESSAGE)
    if json_:
        print_json(result)
    else:
        print(f"ok: sent to {result['room_id']} as {result['user_id']} (event {result['event_id']})")
