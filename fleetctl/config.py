"""Configuration: TOML files into typed, validated, frozen objects.

INTERFACE CONTRACT (other modules rely on these names; add freely, rename none):
    load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config
    Config.server / .forgejo / .orchestrator / .hosts / .agent_types / .matrix / .path (None = embedded)
    Config.agent_specs() -> list[tuple[HostConfig, AgentSpec]]   (every configured ssh_cli agent)
    AgentSpec.agent_id (always set after loading: explicit `agent_id` or f"{host_id}.{agent_type}")
    OrchestratorConfig.db_path is an absolute Path; FLEET_DB_PATH in env overrides it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import ConfigError


def data_home(env: Mapping[str, str] | None = None) -> Path:
    """Where fleetctl keeps its data when no config says otherwise: $FLEETCTL_HOME, else XDG data dir."""
    env = os.environ if env is None else env
    if env.get("FLEETCTL_HOME"):
        return Path(env["FLEETCTL_HOME"]).expanduser().resolve()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base).expanduser() / "fleetctl").resolve()


@dataclass(frozen=True)
class AgentSpec:
    agent_type: str
    agent_id: str
    max_concurrency: int = 1
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostConfig:
    host_id: str
    hostname: str = "localhost"
    local: bool = False
    ssh_user: str | None = None
    ssh_port: int = 22
    ssh_key_path: str | None = None
    known_hosts: str | None = None
    accept_new_host_keys: bool = False
    connect_timeout_secs: float = 10.0
    work_dir: str = "/tmp/agent-workspace"
    agents: tuple[AgentSpec, ...] = ()

    @property
    def is_local(self) -> bool:
        """A host runs by subprocess (no SSH) when marked local or named ``local``."""
        return self.local or self.host_id == "local"


@dataclass(frozen=True)
class AgentTypeConfig:
    name: str
    command: tuple[str, ...]
    prompt: str = "stdin"  # stdin | file | arg
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = 9090
    admin_token: str | None = None
    max_body_bytes: int = 1048576
    webhook_max_body_bytes: int = 5 * 1048576
    metrics_public: bool = True


@dataclass(frozen=True)
class ForgejoConfig:
    url: str | None = None
    token: str | None = None
    webhook_secret: str | None = None
    repositories: tuple[str, ...] = ()
    require_pull_request: bool = True


@dataclass(frozen=True)
class OrchestratorConfig:
    db_path: Path = Path("data/agent-fleet.db")
    heartbeat_interval_secs: float = 60
    heartbeat_timeout_threshold: int = 3
    task_timeout_secs: float = 1800
    default_max_retries: int = 2
    retry_backoff_secs: float = 30
    retry_backoff_max_secs: float = 600
    dispatch_interval_secs: float = 10
    requirement_prefix: str = "agent:"
    http_pull_token: str | None = None
    lease_secs: float = 300
    output_cap_bytes: int = 1048576
    prompt_template: str | None = None


@dataclass(frozen=True)
class MatrixConfig:
    homeserver: str | None = None
    access_token: str | None = None
    room_id: str | None = None
    events: tuple[str, ...] = ("task.failed", "task.awaiting_review", "task.completed", "agent.offline")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    forgejo: ForgejoConfig
    orchestrator: OrchestratorConfig
    hosts: tuple[HostConfig, ...]
    agent_types: Mapping[str, AgentTypeConfig]
    matrix: MatrixConfig
    path: Path | None = None  # None: the embedded default

    def agent_specs(self) -> list[tuple[HostConfig, AgentSpec]]:
        """Every agent configured under ``[[hosts]]``, with its host."""
        return [(h, a) for h in self.hosts for a in h.agents]

    def host(self, host_id: str) -> HostConfig:
        for h in self.hosts:
            if h.host_id == host_id:
                return h
        raise ConfigError(f"no host {host_id!r} in the configuration")


EXAMPLE_AGENT_TYPE = "example"


def embedded_default(env: Mapping[str, str] | None = None) -> Config:
    """The configuration used when no file is found: enough for ``fleetctl demo``."""
    home = data_home(env)
    example = AgentTypeConfig(
        name=EXAMPLE_AGENT_TYPE, command=(sys.executable, "-m", "fleetctl.example_agent"), prompt="file"
    )
    host = HostConfig(
        host_id="local",
        hostname="localhost",
        local=True,
        work_dir=str(home / "workspace"),
        agents=(
            AgentSpec(
                agent_type=EXAMPLE_AGENT_TYPE,
                agent_id="local.example",
                max_concurrency=2,
                capabilities=("code:python", "docs"),
            ),
        ),
    )
    return Config(
        server=ServerConfig(),
        forgejo=ForgejoConfig(),
        orchestrator=OrchestratorConfig(db_path=home / "fleet.db"),
        hosts=(host,),
        agent_types={EXAMPLE_AGENT_TYPE: example},
        matrix=MatrixConfig(),
        path=None,
    )


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Find and load the configuration (PLACEHOLDER: embedded default + FLEET_DB_PATH only)."""
    env = os.environ if env is None else env
    cfg = embedded_default(env)
    if env.get("FLEET_DB_PATH"):
        from dataclasses import replace

        cfg = replace(
            cfg, orchestrator=replace(cfg.orchestrator, db_path=Path(env["FLEET_DB_PATH"]).resolve())
        )
    return cfg
