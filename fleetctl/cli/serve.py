"""``fleetctl serve``: the HTTP listener for pull agents."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetctl.cli._common import ConfigOpt, cli_errors, load


@cli_errors
def serve(
    bind: Annotated[str | None, typer.Option("--bind", help="Address to listen on (default: server.bind).")] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port (default: server.port; 0 = any free port).", min=0, max=65535)
    ] = None,  # fmt: skip
    workers: Annotated[
        int,
        typer.Option(
            "--workers", help="Serving processes sharing the port (SO_REUSEPORT); 1 = one process.", min=1, max=64
        ),
    ] = 1,  # fmt: skip
    config: ConfigOpt = None,
) -> None:
    """Run the HTTP API for pull agents until SIGTERM (then answer waiting long-polls, finish in-flight
    requests and exit 0).

    Example: fleetctl serve --bind 127.0.0.1 --port 9090 --workers 2
    """
    from fleetctl.server import serve as run_server

    cfg = load(config)
    raise typer.Exit(run_server(cfg, host=bind, port=port, workers=workers))
