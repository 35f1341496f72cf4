"""``fleetctl config check|show|set`` and ``fleetctl init``: thin skins over ``fleetctl.config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, JsonOpt, cli_errors, config_path, err, print_json

app = typer.Typer(help="Validate, show and edit the configuration.", no_args_is_help=True)


@app.command("check")
@cli_errors
def config_check(
    config: ConfigOpt = None,
    webhooks: Annotated[
        bool | None,
        typer.Option(
            "--webhooks/--no-webhooks",
            help="Check as for a webhook listener (an empty forgejo.webhook_secret is an error). "
            "Default: as serve would, i.e. on when Forgejo is configured (forgejo.url or webhook_secret set).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate the configuration.

    Prints "ok: FILE" (warnings go to stderr) and exits 0, or prints every problem and exits 2.

    Example:

        fleetctl config check --config /etc/fleetctl/config.toml
    """
    from fleetctl.config import check_config, load_config, serves_webhooks

    cfg = load_config(config_path(config))
    serving = serves_webhooks(cfg) if webhooks is None else webhooks
    for warning in check_config(cfg, serving_webhooks=serving, check_files=True):
        err(f"warning: {warning}")
    print(f"ok: {cfg.path or 'embedded default'}")


@app.command("show")
@cli_errors
def config_show(config: ConfigOpt = None, json_: JsonOpt = False) -> None:
    """Print the effective configuration, secrets masked.

    Defaults, the file and the environment applied; TOML by default, --json for one JSON document.

    Example:

        fleetctl config show --json | jq .orchestrator
    """
    from fleetctl.config import load_config, mask, render_toml

    cfg = load_config(config_path(config))
    if json_:
        print_json(mask(cfg))
    else:
        print(f"# effective configuration from {cfg.path or 'the embedded default'}")
        print(render_toml(mask(cfg)), end="")


@app.command("set")
@cli_errors
def config_set(
    key: Annotated[
        str, typer.Argument(help="Dotted key, e.g. orchestrator.task_timeout_secs or hosts.local.work_dir.")
    ],
    value: Annotated[str, typer.Argument(help='A TOML value (60, true, ["a", "b"]) or else a plain string.')],
    config: ConfigOpt = None,
) -> None:
    """Set one key in the config file, keeping its comments.

    VALUE is parsed as TOML when it parses (numbers, booleans, arrays), else taken as a string. The
    edited file is validated before it is written: an invalid result changes nothing and exits 2.

    Example:

        fleetctl config set orchestrator.task_timeout_secs 3600
    """
    from fleetctl.config import find_config, set_value
    from fleetctl.errors import ConfigError

    path = find_config(config_path(config))
    if path is None:
        raise ConfigError("no config file to edit (using the embedded default); run `fleetctl init` first")
    cfg = set_value(path, key, value)
    for warning in cfg.warnings:
        err(f"warning: {warning}")
    err(f"set {key} in {path}")


@cli_errors
def init(
    path: Annotated[
        Path | None,
        typer.Option(
            "--path",
            "--config",
            "-c",
            metavar="PATH",
            help="Where to write the config file.",
            show_default="config.toml",
        ),
    ] = None,  # fmt: skip
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented config file and create the database.

    The file (mode 0600) is the shipped example, config.example.toml; edit it, then run config check.

    Refuses to overwrite an existing file (exit 4) unless --force is given.

    Example:

        fleetctl init --path /etc/fleetctl/config.toml
    """
    from fleetctl.config import init_config
    from fleetctl.store import Store

    cfg = init_config(config_path(path) or Path("config.toml"), force=force)
    Store.open(cfg.orchestrator.db_path).close()
    err(f"wrote {cfg.path}\ncreated database {cfg.orchestrator.db_path}")
    err("next: edit the hosts and agent types, then run `fleetctl config check`")
