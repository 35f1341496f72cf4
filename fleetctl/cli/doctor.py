"""``fleetctl doctor``: a thin skin over ``fleetctl.doctor``."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, config_path, print_json


@cli_errors
def doctor(
    json_: JsonOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a check warns (and nothing fails).")] = False,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also replay every event against the projections (fleetctl db check).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Check every part of the fleet: config, database, serve, Forgejo, SSH hosts, Matrix, clocks.

    One line per check, ok / warn / fail, with a hint for each that is not ok. Changes nothing. Exit 0 when
    nothing fails (1 with --strict if something warns), 2 for a configuration failure, 1 for a local one
    (database, disk, work directory), 5 for a remote one (serve, Forgejo, SSH, Matrix). Takes at most about
    10 seconds, whatever is down.

    Example: fleetctl doctor --config /etc/fleetctl/config.toml
    """
    from fleetctl import doctor as checks

    report = checks.run(config_path(config), deep=deep)
    if json_:
        print_json(report.to_json())
    else:
        width = max((len(c.name) for c in report.checks), default=0)
        for c in report.checks:
            print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            if c.hint and c.status != checks.OK:
                print(f"{'':<4}  {'':<{width}}  hint: {c.hint}")
    raise typer.Exit(report.exit_code(strict))
