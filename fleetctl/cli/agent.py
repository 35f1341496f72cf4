"""``fleetctl agent …``: the agent registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleetctl.cli._common import (
    ApiUrlOpt,
    ConfigOpt,
    JsonOpt,
    TokenOpt,
    cli_errors,
    load,
    open_store,
    print_fields,
    print_json,
)

app = typer.Typer(help="Register, inspect, drain and remove agents.", no_args_is_help=True)

AgentIdArg = Annotated[str, typer.Argument(help="The agent id.", show_default=False, metavar="AGENT_ID")]


def _views(store, agents: list[dict]) -> list[dict]:
    from fleetctl import services

    return services.agent_views(store, agents)


@app.command("register")
@cli_errors
def agent_register(
    agent_id: AgentIdArg,
    agent_type: Annotated[str, typer.Option("--type", "-t", help="Agent type, e.g. codex-cli.")],
    capability: Annotated[list[str] | None, typer.Option("--capability", "-C", help="Repeatable.")] = None,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="Tasks at once.", min=1, max=1000, metavar="N")
    ] = 1,
    mode: Annotated[str, typer.Option("--mode", help="http_pull or ssh_cli.")] = "http_pull",
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create or update an agent and put it online; a pull agent's token is printed once.

    With --api-url or $FLEET_API_URL it registers with that fleetctl serve (registration token: --token,
    $FLEET_REGISTRATION_TOKEN or $FLEET_API_TOKEN).

    Example: fleetctl agent register builder-1 --type codex-cli -C code:rust -C code:python --max-concurrency 2
    """
    from fleetctl.gateway import open_gateway

    with open_gateway(api_url, token, "registration", lambda: load(config)) as gateway:
        reg = gateway.register(agent_id, agent_type=agent_type, capabilities=capability or [],
                               max_concurrency=max_concurrency, mode=mode)  # fmt: skip
    view, new_token, created = reg["agent"], reg["token"], reg["created"]
    if json_:
        print_json({**view, "token": new_token})
    else:
        print(f"{agent_id} {'registered' if created else 'updated'} ({view['status']})")
        if new_token:
            print(f"token: {new_token}")


@app.command("heartbeat")
@cli_errors
def agent_heartbeat(
    agent_id: AgentIdArg,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Record a heartbeat: extends the agent's leases; lists the attempts it must stop (cancelled, timed out, lost).

    With --api-url or $FLEET_API_URL it goes to that fleetctl serve with the agent's own token
    (--token, $FLEET_AGENT_TOKEN or $FLEET_API_TOKEN).

    Example: fleetctl agent heartbeat builder-1 --json
    """
    from fleetctl.gateway import open_gateway

    with open_gateway(api_url, token, "agent", lambda: load(config)) as gateway:
        result = gateway.heartbeat(agent_id)
    view = result["agent"]
    stop = result.get("stop") or []
    if json_:
        print_json({"agent": view, "stop": stop, "cancelled": result["cancelled"]})
    else:
        runs = ", ".join(f"{s['task_id']} attempt {s['attempt']} ({s['reason']})" for s in stop)
        print(f"{agent_id} {view['status']}" + (f"; stop: {runs}" if stop else ""))


def _set_status(agent_id: str, action: str, json_: bool, config) -> None:
    from fleetctl import services

    cfg = load(config)
    with open_store(cfg) as store:
        if action == "deregister":
            agent = services.deregister_agent(store, cfg, agent_id, by="operator")
        elif action == "resume":
            agent = services.resume_agent(store, cfg.orchestrator, agent_id)
        else:
            agent = services.drain_agent(store, cfg.orchestrator, agent_id)
        view = _views(store, [agent])[0]
    if json_:
        print_json(view)
    else:
        print(f"{agent_id} {view['status']}")


@app.command("deregister")
@cli_errors
def agent_deregister(agent_id: AgentIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Take an agent out of the fleet: offline, its token revoked; its assigned and running attempts fail
    (agent_lost) and are retried. A pull agent comes back only by registering again.

    An agent defined in the configuration ([[hosts]], ssh_cli) cannot be deregistered (exit 4): every
    dispatch brings it back. Remove it from the config file, or `fleetctl agent drain` it to give it no
    new work.

    Example: fleetctl agent deregister builder-1
    """
    _set_status(agent_id, "deregister", json_, config)


@app.command("drain")
@cli_errors
def agent_drain(agent_id: AgentIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Let an agent finish what it has but take nothing new (until `fleetctl agent resume`).

    Example: fleetctl agent drain builder-1
    """
    _set_status(agent_id, "drain", json_, config)


@app.command("resume")
@cli_errors
def agent_resume(agent_id: AgentIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """A drained agent takes work again (online). An online agent stays as it is; an offline one is
    refused (exit 4): a pull agent comes back by registering or heartbeating, a config agent with dispatch.

    Example: fleetctl agent resume builder-1
    """
    _set_status(agent_id, "resume", json_, config)


@app.command("list")
@cli_errors
def agent_list(
    status: Annotated[str | None, typer.Option("--status", help="online, offline or draining.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="http_pull or ssh_cli.")] = None,
    capability: Annotated[str | None, typer.Option("--capability", "-C", help="Only agents with it.")] = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List agents with their load.

    Example: fleetctl agent list --status online --json
    """
    from fleetctl import services
    from fleetctl.cli.render import render_agents

    cfg = load(config)
    with open_store(cfg) as store:
        views = services.list_agents(store, status=status, mode=mode, capability=capability)
    if json_:
        print_json({"items": views, "next": None})
    else:
        render_agents(views)


@app.command("show")
@cli_errors
def agent_show(agent_id: AgentIdArg, json_: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show one agent, its tasks in flight and its recent events.

    Example: fleetctl agent show builder-1
    """
    from fleetctl import services
    from fleetctl.cli.render import render_events

    cfg = load(config)
    with open_store(cfg) as store:
        doc = services.agent_detail(store, agent_id)
    if json_:
        print_json(doc)
        return
    fields = {k: v for k, v in doc.items() if k not in ("events", "tasks")}
    print_fields(f"agent {agent_id}", [*fields.items(), ("tasks", " ".join(doc["tasks"]))])
    print()
    render_events(doc["events"], title="recent events")


@app.command("run")
@cli_errors
def agent_run(
    command: Annotated[str, typer.Option("--command", help="What to run for each task (split like a shell would).")],
    shell: Annotated[bool, typer.Option("--shell", help="Run --command with sh -c; the prompt arrives as $1.")] = False,
    prompt: Annotated[
        str,
        typer.Option("--prompt", help="How the command gets the prompt: file (its path, last argument), stdin, arg."),
    ] = "file",
    one_job: Annotated[bool, typer.Option("--one-job", help="Run one task, hand in its receipt, exit.")] = False,
    agent_id: Annotated[
        str | None, typer.Option("--agent-id", help="Agent id (default: the one in --credentials, else the host name).")
    ] = None,
    agent_type: Annotated[str, typer.Option("--type", "-t", help="Agent type, e.g. codex-cli.")] = "command",
    capability: Annotated[list[str] | None, typer.Option("--capability", "-C", help="Repeatable.")] = None,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="Tasks at once.", min=1, max=1000, metavar="N")
    ] = 1,
    workspace_root: Annotated[
        Path | None, typer.Option("--workspace-root", help="Task workspaces go in ROOT/TASK/ATTEMPT.")
    ] = None,
    credentials: Annotated[
        Path | None, typer.Option("--credentials", help="Saved agent token (default $FLEETCTL_HOME/agent-ID.json).")
    ] = None,
    api_url: ApiUrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run a pull agent: register, heartbeat, dequeue tasks, run --command for each, hand in receipts.

    The command runs in the task's workspace with FLEET_TASK_ID, FLEET_ATTEMPT, FLEET_TASK_TOKEN,
    FLEET_API_URL… set; it may hand in its own receipt with `fleetctl task complete`, else the agent does
    (success on exit 0, failure otherwise). SIGTERM drains: running commands finish, then exit 0.
    Exit 2 bad usage or refused credentials, 5 server unreachable at start-up. See docs/agent-onboarding.md.

    Example: fleetctl agent run --api-url http://fleet:9090 -C code:python --command 'codex exec --full-auto' --prompt stdin
    """
    from fleetctl.pull_agent import make_settings, run_agent

    settings = make_settings(command=command, shell=shell, prompt=prompt, one_job=one_job, agent_id=agent_id,
                             agent_type=agent_type, capabilities=capability or [], max_concurrency=max_concurrency,
                             workspace_root=workspace_root, credentials=credentials, api_url=api_url, token=token,
                             load_config=lambda: load(config))  # fmt: skip
    raise typer.Exit(run_agent(settings))
