"""Configuration: TOML files into typed, validated, frozen objects.

INTERFACE CONTRACT (other modules rely on these names; add freely, rename none):
    load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config
    Config.server / .forgejo / .orchestrator / .hosts / .agent_types / .matrix / .path (None = embedded)
    Config.agent_specs() -> list[tuple[HostConfig, AgentSpec]]   (every configured ssh_cli agent)
    AgentSpec.agent_id (always set after loading: explicit `agent_id` or f"{host_id}.{agent_type}")
    OrchestratorConfig.db_path is an absolute Path; FLEET_DB_PATH in env overrides it.
Added here: Config.warnings, check_config(), mask(), config_search_paths(), find_config(),
render_toml(), parse_value(), set_value(), init_config(), example_text().

Design. Loading runs on every CLI start, so it reads with the stdlib ``tomllib`` and imports nothing
heavy; tomlkit (comment-preserving, ~30 ms to import) is imported only by the functions that *write*
(``set_value``) or render (``render_toml``). A file is validated against a small declarative schema
(``_Key`` per key) and every problem is collected, so one ``fleetctl config check`` reports all of
them, each as ``FILE:LINE:COL: dotted.key: what is wrong``. tomllib gives positions only for syntax
errors; for semantic errors the line is found by scanning the text (``_locate``), good enough for a
person. Files are read bounded (a config file up to ``CONFIG_MAX_BYTES``, a ``*_file`` secret up to
``SECRET_FILE_MAX_BYTES``, regular files only), and no message ever shows a secret's value. ``*_secs``
keys take numbers or duration strings (``"30m"``, fleetctl.durations). Secrets resolve as environment >
``<key>_file`` > inline value. Warnings (loose file modes, a key given twice) are collected in
``Config.warnings``; the loader never prints.
"""

from __future__ import annotations

import copy
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fleetctl.durations import DURATION_HINT, parse_duration
from fleetctl.errors import ConfigError, Conflict
from fleetctl.ids import ID_RE, REPO_RE


class SecretFile:
    """A secret named by ``<key>_file``: read when a command first needs it, never at load.

    A systemd unit gets only the credentials it loads (``LoadCredential=``, under ``$CREDENTIALS_DIRECTORY``);
    a command that does not need a secret must not fail because its file exists only inside another unit.
    ``path`` is None when the name could not be resolved here (``problem`` says why, e.g. an unset variable).
    """

    __slots__ = ("where", "name", "path", "problem")

    def __init__(self, where: str, name: str, path: Path | None, problem: str | None = None):
        self.where, self.name, self.path, self.problem = where, name, path, problem

    def read(self) -> str | None:
        """The secret (None when the file is empty); ConfigError (exit 2) when it cannot be read here."""
        if self.path is None:
            raise ConfigError(f"{self.where}: {self.problem}")
        try:
            content = _read_bounded(self.path, SECRET_FILE_MAX_BYTES).rstrip("\r\n")
        except _Unreadable as exc:
            raise ConfigError(f"{self.where}: cannot read secret file {self.path}: {exc}") from None
        from fleetctl.log import redact

        redact(content)
        return content or None


class _Secret:
    """A dataclass field holding a secret: a value, None, or a ``SecretFile`` read on first access (then kept
    for the life of this config object; a reloaded config reads the file again).

    ``dataclasses.replace`` reads every field, so it reads the file: the loader builds with raw values and
    ``_apply_env`` overrides without it. ``secret_source`` looks at the raw value without reading anything.
    """

    def __init__(self, name: str):
        self.name, self.slot = name, f"_secret_{name}"

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return None
        raw = obj.__dict__.get(self.slot)
        if isinstance(raw, SecretFile):
            read = f"{self.slot}_read"
            if read not in obj.__dict__:
                obj.__dict__[read] = raw.read()
            return obj.__dict__[read]
        return raw

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = None if value is self else value
        obj.__dict__.pop(f"{self.slot}_read", None)


def _secret_field(name: str) -> Any:
    return field(default=_Secret(name), repr=False, compare=False)


def secret_source(section: Any, key: str) -> str | SecretFile | None:
    """A secret as configured, without reading a file: its value, its ``SecretFile``, or None (not set)."""
    return section.__dict__.get(f"_secret_{key}")


def secret_at_hand(section: Any, key: str) -> bool:
    """Whether this process has the secret: set inline or by the environment, or a file it can read now.
    For the optional uses (a receipt check that can wait for a pass with the token); a needed secret is read
    by plain attribute access, which raises ConfigError with the reason."""
    raw = secret_source(section, key)
    if isinstance(raw, SecretFile):
        try:
            return bool(getattr(section, key))
        except ConfigError:
            return False
    return bool(raw)


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
    host_key_policy: str = "strict"  # strict | accept-new
    connect_timeout_secs: float = 10.0
    work_dir: str = "/tmp/agent-workspace"
    agents: tuple[AgentSpec, ...] = ()

    @property
    def is_local(self) -> bool:
        """A host runs by subprocess (no SSH) when marked local or named ``local``."""
        return self.local or self.host_id == "local"

    @property
    def accept_new_host_keys(self) -> bool:
        """``host_key_policy = "accept-new"``: a host seen for the first time has its key recorded."""
        return self.host_key_policy == "accept-new"


@dataclass(frozen=True)
class AgentTypeConfig:
    name: str
    command: tuple[str, ...]
    prompt: str = "stdin"  # stdin | file | arg
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_secs: float | None = None  # a run's hard timeout for this type (else the task's, else the default)


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = 9090
    admin_token: str | None = _secret_field("admin_token")
    max_body_bytes: int = 1048576
    webhook_max_body_bytes: int = 5 * 1048576
    metrics_public: bool = True
    public_url: str | None = None  # how runs on SSH hosts reach this serve (their FLEET_API_URL)


@dataclass(frozen=True)
class ForgejoConfig:
    url: str | None = None
    token: str | None = _secret_field("token")
    webhook_secret: str | None = _secret_field("webhook_secret")
    repositories: tuple[str, ...] = ()
    require_pull_request: bool = True
    comments: bool = True
    status_labels: bool = False
    bot_login: str | None = None
    timeout_secs: float = 10.0
    delivery_retention_secs: float = 30 * 86400
    comment_commands: bool = False  # /fleet retry|cancel|rework in comments by users with write permission
    permission_cache_secs: float = 60  # how long a user's permission on a repository is remembered
    max_active_per_repo: int | None = None  # tasks assigned/running/awaiting review per repository (None: no cap)
    #: per repository (lower-cased owner/name): its own ``max_active_per_repo``
    repository: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def repo_cap(self, repo: str | None) -> int | None:
        """The cap on ``repo``'s active tasks: its own, else the default; None for no cap."""
        own = self.repository.get((repo or "").lower(), {})
        return own.get("max_active_per_repo", self.max_active_per_repo)

    @property
    def api_ready(self) -> bool:
        """Whether Forgejo's API can be used from this process: a URL and a token (systemd gives the token to
        the units that need it; elsewhere receipts wait as pending and the outbox waits)."""
        return bool(self.url) and secret_at_hand(self, "token")


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
    http_pull_token: str | None = _secret_field("http_pull_token")
    lease_secs: float = 300
    output_cap_bytes: int = 1048576
    prompt_template: str | None = None
    workspace_retention_secs: float = 3 * 86400  # 0 keeps workspaces
    max_review_rounds: int = 3  # rework attempts after "changes requested" (per task: label review-rounds:N)
    rate_limit_cooldown_secs: float = 900  # an agent's cooldown after a usage limit that names no time


@dataclass(frozen=True)
class BudgetsConfig:
    """``[budgets]``: spending limits in US dollars, from the ``usage`` agents report (None: no limit)."""

    max_cost_per_task: float | None = None
    max_cost_per_day: float | None = None  # the whole fleet, per UTC day
    #: per repository (lower-cased owner/name): its own ``max_cost_per_task`` / ``max_cost_per_day``
    repository: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self.max_cost_per_task is not None or self.max_cost_per_day is not None or bool(self.repository)

    def task_budget(self, repo: str | None) -> float | None:
        """The per-task budget of a task in ``repo``: its repository's, else the fleet's."""
        own = self.repository.get((repo or "").lower(), {})
        return own.get("max_cost_per_task", self.max_cost_per_task)


@dataclass(frozen=True)
class MatrixConfig:
    homeserver: str | None = None
    access_token: str | None = _secret_field("access_token")
    room_id: str | None = None  # a room id (!…) or an alias (#name:server), resolved once
    events: tuple[str, ...] = ("task.failed", "task.awaiting_review", "task.completed", "task.needs_human",
                               "agent.offline")  # fmt: skip
    template: str | None = None  # a message template ({placeholders}: fleetctl.matrix.messages.FIELDS)
    timeout_secs: float = 10

    @property
    def enabled(self) -> bool:
        """Whether notifications are configured (a homeserver and a room): events are then queued for Matrix."""
        return bool(self.homeserver and self.room_id)

    @property
    def ready(self) -> bool:
        """Whether this process can send them (enabled, and its access token is at hand)."""
        return self.enabled and secret_at_hand(self, "access_token")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    forgejo: ForgejoConfig
    orchestrator: OrchestratorConfig
    hosts: tuple[HostConfig, ...]
    agent_types: Mapping[str, AgentTypeConfig]
    matrix: MatrixConfig
    path: Path | None = None  # None: the embedded default
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    warnings: tuple[str, ...] = ()  # non-fatal findings of the loader; the CLI prints them

    def agent_specs(self) -> list[tuple[HostConfig, AgentSpec]]:
        """Every agent configured under ``[[hosts]]``, with its host."""
        return [(h, a) for h in self.hosts for a in h.agents]

    def host(self, host_id: str) -> HostConfig:
        for h in self.hosts:
            if h.host_id == host_id:
                return h
        raise ConfigError(f"no host {host_id!r} in the configuration")


EXAMPLE_AGENT_TYPE = "example"
"""The built-in agent type: usable from any config file without an ``[agent_types.example]`` section."""

PYTHON_PLACEHOLDER = "{python}"
"""In an agent type's ``command``, replaced by the running interpreter (``sys.executable``)."""

SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("admin_token",),
    "forgejo": ("token", "webhook_secret"),
    "orchestrator": ("http_pull_token",),
    "matrix": ("access_token",),
}
"""Keys holding secrets, by section. Each may also be given as ``<key>_file``; ``mask`` hides them."""
_SECRET_NAMES = frozenset(k for keys in SECRET_KEYS.values() for k in keys)

SECRET_ENV: dict[str, tuple[str, str]] = {
    "FLEET_API_TOKEN": ("server", "admin_token"),
    "FLEET_FORGEJO_TOKEN": ("forgejo", "token"),
    "FLEET_WEBHOOK_SECRET": ("forgejo", "webhook_secret"),
    "FLEET_MATRIX_TOKEN": ("matrix", "access_token"),
    "FLEET_REGISTRATION_TOKEN": ("orchestrator", "http_pull_token"),
}
"""Environment variables that override a secret (they win over ``<key>_file`` and the inline value)."""
SECRET_ENV_OF = {where: var for var, where in SECRET_ENV.items()}

_VAR_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand_vars(text: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    """``$NAME`` and ``${NAME}`` in a ``*_file`` path replaced from ``env``; the first unset name, if any."""
    unset: list[str] = []

    def sub(m: re.Match) -> str:
        name = m[1] or m[2]
        if not env.get(name):
            unset.append(name)
            return m[0]
        return env[name]

    out = _VAR_RE.sub(sub, text)
    return out, (unset[0] if unset else None)


MASK = "***"


def _example_agent_type() -> AgentTypeConfig:
    return AgentTypeConfig(
        name=EXAMPLE_AGENT_TYPE, command=(sys.executable, "-m", "fleetctl.example_agent"), prompt="file"
    )


def embedded_default(env: Mapping[str, str] | None = None) -> Config:
    """The configuration used when no file is found: enough for ``fleetctl demo``."""
    home = data_home(env)
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
        agent_types={EXAMPLE_AGENT_TYPE: _example_agent_type()},
        matrix=MatrixConfig(),
        path=None,
    )


# --------------------------------------------------------------------------------------------- finding


def config_search_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The files tried in order when no ``--config`` is given (``$FLEET_CONFIG`` first, when set)."""
    env = os.environ if env is None else env
    paths = []
    if env.get("FLEET_CONFIG"):
        paths.append(Path(env["FLEET_CONFIG"]).expanduser().absolute())
    paths.append(Path.cwd() / "config.toml")
    home = env.get("HOME") or str(Path.home())
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(home) / ".config")
    paths.append(Path(xdg).expanduser() / "fleetctl" / "config.toml")
    paths.append(Path("/etc/fleetctl/config.toml"))
    return paths


def find_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Path | None:
    """The config file to use, or None for the embedded default.

    An explicit ``path`` or ``$FLEET_CONFIG`` must exist (ConfigError); the other places are optional.

    Example:
        >>> find_config(None, env={"HOME": "/nonexistent"})  # doctest: +SKIP
    """
    env = os.environ if env is None else env
    if path is not None and str(path) != "":
        return _must_exist(Path(path).expanduser().absolute(), "--config")
    if env.get("FLEET_CONFIG"):
        return _must_exist(Path(env["FLEET_CONFIG"]).expanduser().absolute(), "$FLEET_CONFIG")
    for candidate in config_search_paths(env):
        if candidate.exists():
            return candidate
    return None


def _must_exist(path: Path, source: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (named by {source})")
    return path


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Find, read and validate the configuration; secrets and FLEET_DB_PATH come in from ``env``.

    Raises ConfigError (exit code 2) listing every problem, each with file, dotted key and line:column.

    Example:
        >>> cfg = load_config("config.toml")  # doctest: +SKIP
        >>> cfg.orchestrator.task_timeout_secs  # doctest: +SKIP
        1800
    """
    env = os.environ if env is None else env
    found = find_config(path, env=env)
    if found is None:
        return _apply_env(embedded_default(env), env)
    return _apply_env(_Loader(_read_text(found), found, env).load(), env)


def load_config_text(text: str, path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Validate ``text`` as if it were the file at ``path`` (relative paths resolve against its directory)."""
    env = os.environ if env is None else env
    return _apply_env(_Loader(text, Path(path).absolute(), env).load(), env)


CONFIG_MAX_BYTES = 1 << 20
"""The largest config file read (1 MiB); a bigger one is an error, so ``--config /dev/zero`` cannot eat memory."""
SECRET_FILE_MAX_BYTES = 64 << 10
"""The largest ``*_file`` secret read (64 KiB)."""


class _Unreadable(Exception):
    """Why a file cannot be read (no path, and never any of its content)."""


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n >> 10} KiB"


def _read_bounded(path: Path, limit: int) -> str:
    """The UTF-8 text of the regular file at ``path``, refusing other files and files over ``limit`` bytes.

    Opened non-blocking, so a FIFO does not hang the open; checked with fstat on the open file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise _Unreadable("is a directory")
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")  # fmt: skip
        raise _Unreadable(f"not a regular file ({kind})")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise _Unreadable(exc.strerror or str(exc)) from None
    if len(data) > limit:
        raise _Unreadable(f"larger than {_size(limit)}, the most fleetctl reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def _read_text(path: Path) -> str:
    """A config file's text: a regular file of at most ``CONFIG_MAX_BYTES``, UTF-8 (else ConfigError)."""
    try:
        return _read_bounded(path, CONFIG_MAX_BYTES)
    except _Unreadable as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None


def _apply_env(cfg: Config, env: Mapping[str, str]) -> Config:
    """Environment overrides, applied last: secrets (env > file > inline) and FLEET_DB_PATH.

    Sections are copied, not ``replace``d: that would read every ``*_file`` secret (see ``_Secret``)."""
    sections = {name: copy.copy(getattr(cfg, name)) for name in SECRET_KEYS}
    for var, (section, key) in SECRET_ENV.items():
        if env.get(var):
            object.__setattr__(sections[section], key, env[var])  # the field's _Secret.__set__; nothing read
    if env.get("FLEET_DB_PATH"):
        db_path = Path(env["FLEET_DB_PATH"]).expanduser().absolute()
        object.__setattr__(sections["orchestrator"], "db_path", db_path)
    cfg = replace(cfg, **sections)
    _never_logged(cfg)
    return cfg


def _never_logged(cfg: Config) -> None:
    """Register every secret at hand with the action log, which then never writes it anywhere (a
    ``*_file`` secret registers itself when it is read)."""
    from fleetctl.log import redact

    for name, keys in SECRET_KEYS.items():
        for key in keys:
            raw = secret_source(getattr(cfg, name), key)
            if isinstance(raw, str):
                redact(raw)


class _Key:
    """One key of the schema: its kind and the checks on its value.

    A plain class, not a dataclass: each dataclass costs ~1 ms to create at import, on every CLI start.
    """

    __slots__ = ("kind", "gt", "ge", "le", "choices", "required")

    def __init__(self, kind: str, *, gt=None, ge=None, le=None, choices: tuple[str, ...] = (), required=False):
        self.kind = kind  # bool int num secs str optstr secret path url strs repos events argv strmap id optid choice
        self.gt, self.ge, self.le = gt, ge, le  # value must be > gt, >= ge, <= le
        self.choices, self.required = choices, required


_SECS = _Key("secs", gt=0)  # a number of seconds, or a duration string such as "30m"
_POS_INT = _Key("int", gt=0)

_SCHEMA: dict[str, dict[str, _Key]] = {
    "server": {
        "bind": _Key("str"),
        "port": _Key("int", ge=0, le=65535),
        "admin_token": _Key("secret"),
        "max_body_bytes": _POS_INT,
        "webhook_max_body_bytes": _POS_INT,
        "metrics_public": _Key("bool"),
        "public_url": _Key("url"),
    },
    "forgejo": {
        "url": _Key("url"),
        "token": _Key("secret"),
        "webhook_secret": _Key("secret"),
        "repositories": _Key("repos"),
        "require_pull_request": _Key("bool"),
        "comments": _Key("bool"),
        "status_labels": _Key("bool"),
        "bot_login": _Key("optstr"),
        "timeout_secs": _SECS,
        "delivery_retention_secs": _Key("secs", ge=0),
        "comment_commands": _Key("bool"),
        "permission_cache_secs": _Key("secs", ge=0),
        "max_active_per_repo": _Key("int", ge=0),
        "repository": _Key("repotables"),
    },
    "orchestrator": {
        "db_path": _Key("path"),
        "heartbeat_interval_secs": _SECS,
        "heartbeat_timeout_threshold": _Key("int", ge=1),
        "task_timeout_secs": _SECS,
        "default_max_retries": _Key("int", ge=0),
        "retry_backoff_secs": _Key("secs", ge=0),
        "retry_backoff_max_secs": _Key("secs", ge=0),
        "dispatch_interval_secs": _SECS,
        "requirement_prefix": _Key("str"),
        "http_pull_token": _Key("secret"),
        "lease_secs": _SECS,
        "output_cap_bytes": _POS_INT,
        "prompt_template": _Key("optstr"),
        "workspace_retention_secs": _Key("secs", ge=0),
        "max_review_rounds": _Key("int", ge=0),
        "rate_limit_cooldown_secs": _SECS,
    },
    "budgets": {
        "max_cost_per_task": _Key("num", ge=0),
        "max_cost_per_day": _Key("num", ge=0),
        "repository": _Key("repotables"),
    },
    "matrix": {
        "homeserver": _Key("url"),
        "access_token": _Key("secret"),
        "room_id": _Key("optstr"),
        "events": _Key("events"),
        "template": _Key("optstr"),
        "timeout_secs": _SECS,
    },
}
_HOST_KEYS: dict[str, _Key] = {
    "host_id": _Key("id", required=True),
    "hostname": _Key("str"),
    "local": _Key("bool"),
    "ssh_user": _Key("optstr"),
    "ssh_port": _Key("int", ge=1, le=65535),
    "ssh_key_path": _Key("optstr"),
    "known_hosts": _Key("optstr"),
    "host_key_policy": _Key("choice", choices=("strict", "accept-new")),
    "connect_timeout_secs": _SECS,
    "work_dir": _Key("str"),
    "agents": _Key("tables"),
}
_AGENT_KEYS: dict[str, _Key] = {
    "agent_type": _Key("str", required=True),
    "agent_id": _Key("optid"),
    "max_concurrency": _Key("int", ge=1),
    "capabilities": _Key("strs"),
}
_AGENT_TYPE_KEYS: dict[str, _Key] = {
    "command": _Key("argv", required=True),
    "prompt": _Key("choice", choices=("stdin", "file", "arg")),
    "env": _Key("strmap"),
    "timeout_secs": _SECS,
}
_TOP_KEYS = (*_SCHEMA, "hosts", "agent_types")
#: The keys of a ``[forgejo.repository."owner/name"]`` / ``[budgets.repository."owner/name"]`` table.
_REPO_KEYS: dict[str, dict[str, _Key]] = {
    "forgejo": {"max_active_per_repo": _Key("int", ge=0)},
    "budgets": {"max_cost_per_task": _Key("num", ge=0), "max_cost_per_day": _Key("num", ge=0)},
}
_RENAMED = {"accept_new_host_keys": 'replaced by host_key_policy = "accept-new" (or "strict", the default)'}
"""Keys of earlier versions, with what to write instead."""
_EVENT_RE = re.compile(r"^[a-z][a-z_]*\.[a-z][a-z_]*\Z")
_URL_RE = re.compile(r"^https?://[^\s/]+", re.I)
# a room id is "!" and an opaque string (room versions 1-11 end in ":server", later ones need not); an alias
# is "#name:server"
_ROOM_RE = re.compile(r"^(?:![^\s]+|#[^\s:]+:[^\s]+)\Z")
_BAD = object()  # a value that failed validation (already reported)

KeyPath = tuple[str | int, ...]


def dotted(keypath: KeyPath) -> str:
    """``("hosts", 0, "agents", 1, "agent_type")`` → ``hosts[0].agents[1].agent_type``."""
    out = ""
    for seg in keypath:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            bare = re.fullmatch(r"[A-Za-z0-9_-]+", seg)
            out += ("." if out else "") + (seg if bare else '"' + seg.replace('"', '\\"') + '"')
    return out


def _toml_kind(value: Any) -> str:
    """The TOML type of ``value`` (``integer``, ``local date-time``…), never the value itself."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    if type(value) in names:
        return names[type(value)]
    import datetime as dt

    if isinstance(value, dt.datetime):
        return "offset date-time" if value.tzinfo else "local date-time"
    return {dt.date: "local date", dt.time: "local time"}.get(type(value), type(value).__name__)


def _toml_type(value: Any) -> str:
    """The TOML type of ``value`` and, for scalars, the value (cut at 40 characters) — never for secrets."""
    name = _toml_kind(value)
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    return f"{name} {shown[:40]}" if name in ("boolean", "integer", "float", "string") else name


def _did_you_mean(word: str, candidates: list[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Loader:
    """Validate one parsed document into a Config, collecting every problem with its location."""

    def __init__(self, text: str, path: Path, env: Mapping[str, str]):
        self.text, self.path, self.env = text, path, env
        self.errors: list[tuple[KeyPath, str]] = []
        self.warnings: list[str] = []
        self.inline_secrets: list[str] = []

    def problem(self, keypath: KeyPath, message: str) -> None:
        self.errors.append((keypath, message))

    def where(self, keypath: KeyPath) -> str:
        pos = _locate(self.text, keypath) if keypath else None
        loc = f"{self.path}:{pos[0]}:{pos[1]}" if pos else str(self.path)
        return f"{loc}: {dotted(keypath)}" if keypath else loc

    def load(self) -> Config:
        try:
            raw = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(_syntax_message(self.path, self.text, str(exc))) from None
        cfg = self.build(raw)
        if self.errors:
            located = sorted(((_locate(self.text, kp) or (0, 0)), i) for i, (kp, _msg) in enumerate(self.errors))
            msgs = [f"{self.where(self.errors[i][0])}: {self.errors[i][1]}" for _pos, i in located]
            head = msgs[0] if len(msgs) == 1 else f"{len(msgs)} configuration errors:\n  " + "\n  ".join(msgs)
            raise ConfigError(head, details={"errors": msgs})
        if self.inline_secrets and _loose_mode(self.path):
            self.warnings.append(
                f"{self.path}: holds secrets ({', '.join(self.inline_secrets)}) but is readable by "
                f"group/others (mode {_mode(self.path):04o}); chmod 600 it or use *_file keys"
            )
        return replace(cfg, warnings=tuple(self.warnings))

    # -- sections ---------------------------------------------------------------------------------

    def build(self, raw: dict) -> Config:
        for key in raw:
            if key not in _TOP_KEYS:
                self.problem((key,), "unknown section" + _did_you_mean(key, list(_TOP_KEYS)))
        sections = {name: self.section(raw, name) for name in _SCHEMA}
        orch = sections["orchestrator"]
        if isinstance(orch.get("db_path"), str):
            orch["db_path"] = self.resolve(orch["db_path"])
        elif "db_path" not in orch:
            orch["db_path"] = data_home(self.env) / "fleet.db"
        if isinstance(orch.get("prompt_template"), str):
            self.template(orch["prompt_template"])
        base, cap = orch.get("retry_backoff_secs", 30), orch.get("retry_backoff_max_secs", 600)
        if cap is not _BAD and base is not _BAD and cap < base:
            self.problem(
                ("orchestrator", "retry_backoff_max_secs"), f"must be >= retry_backoff_secs ({base}), got {cap}"
            )
        self.matrix(sections["matrix"])
        for sec, key in (("forgejo", "max_active_per_repo"), ("budgets", "max_cost_per_task"),
                         ("budgets", "max_cost_per_day")):  # fmt: skip
            if sections[sec].get(key) == 0:  # 0: no limit
                sections[sec][key] = None
        for sec in ("forgejo", "budgets"):
            if "repository" in sections[sec]:
                sections[sec]["repository"] = self.repo_tables(sec, sections[sec]["repository"])
        for sec in ("server", "forgejo", "orchestrator", "matrix", "budgets"):
            sections[sec] = {k: v for k, v in sections[sec].items() if v is not _BAD}
        agent_types = self.agent_types(raw.get("agent_types", {}))
        declared = set(agent_types) | set(raw.get("agent_types") or ())  # invalid ones were reported
        hosts = self.hosts(raw.get("hosts", []), declared)
        return Config(
            server=ServerConfig(**sections["server"]),
            forgejo=ForgejoConfig(**sections["forgejo"]),
            orchestrator=OrchestratorConfig(**sections["orchestrator"]),
            hosts=hosts,
            agent_types=agent_types,
            matrix=MatrixConfig(**sections["matrix"]),
            path=self.path,
            budgets=BudgetsConfig(**sections["budgets"]),
        )

    def repo_tables(self, section: str, raw: Any) -> Any:
        """``[<section>.repository."owner/name"]`` tables: valid names, known keys, keyed lower-cased."""
        if raw is _BAD:
            return _BAD
        out: dict[str, dict[str, Any]] = {}
        for repo, table in raw.items():
            kp: KeyPath = (section, "repository", repo)
            if not REPO_RE.match(repo) or ".." in repo:
                self.problem(kp, f"expected a repository as owner/name, got {repo!r}")
                continue
            if not isinstance(table, dict):
                self.problem(kp, f"expected a table, got {_toml_type(table)}")
                continue
            values = self.table(table, kp, _REPO_KEYS[section])
            if repo.lower() in out:
                self.problem(kp, f"repository {repo!r} is configured twice (names are case-insensitive)")
            elif not any(v is _BAD for v in values.values()):
                out[repo.lower()] = {k: (None if v == 0 else v) for k, v in values.items()}  # 0: no limit
        return out

    def matrix(self, values: dict) -> None:
        """``[matrix]``: the room's shape, known event kinds, a template that can be filled."""
        room = values.get("room_id")
        if isinstance(room, str) and room and not _ROOM_RE.match(room):
            self.problem(("matrix", "room_id"), f"expected a room id like '!abc:example.org' or an alias like "
                         f"'#fleet:example.org', got {room!r}")  # fmt: skip
            values["room_id"] = _BAD
        events = values.get("events")
        if isinstance(events, tuple) and events:
            from fleetctl.matrix.messages import KINDS

            for kind in events:
                if kind not in KINDS:
                    hint = _did_you_mean(kind, list(KINDS)) or f" (one of {', '.join(KINDS)})"
                    self.problem(("matrix", "events"), f"unknown event kind {kind!r}{hint}")
                    values["events"] = _BAD
        template = values.get("template")
        if isinstance(template, str) and template:
            from fleetctl.matrix.messages import FIELDS
            from fleetctl.prompt import check_template

            problem = check_template(template, FIELDS)
            if problem:
                self.problem(("matrix", "template"), f"invalid template: {problem}")
                values["template"] = _BAD

    def section(self, raw: dict, name: str) -> dict:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            self.problem((name,), f"expected a table ([{name}]), got {_toml_type(table)}")
            return {}
        values = self.table(table, (name,), _SCHEMA[name], secrets=SECRET_KEYS.get(name, ()))
        for key in SECRET_KEYS.get(name, ()):
            self.secret(table, values, (name,), key)
        return values

    def table(self, table: dict, where: KeyPath, schema: dict[str, _Key], secrets=()) -> dict:
        """Check the keys of one table against ``schema``; returns the valid values by key."""
        allowed = [*schema, *(f"{k}_file" for k in secrets)]
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key in schema:
                values[key] = self.value(where + (key,), schema[key], value)
            elif key in _RENAMED:
                self.problem(where + (key,), f"unknown key: {_RENAMED[key]}")
            elif key not in allowed:
                self.problem(where + (key,), "unknown key" + _did_you_mean(key, allowed))
        for key, spec in schema.items():
            if spec.required and key not in table:
                self.problem(where, f"missing required key '{key}'")
        return values

    def secret(self, table: dict, values: dict, where: KeyPath, key: str) -> None:
        """``key`` from ``<key>_file`` (wins; a ``SecretFile``, read when first needed) or the inline value;
        the environment comes later (``_apply_env``)."""
        inline = values.get(key)
        if inline and inline is not _BAD:
            self.inline_secrets.append(dotted(where + (key,)))
        file_key = f"{key}_file"
        if file_key not in table:
            return
        kp = where + (file_key,)
        raw = self.value(kp, _Key("optstr"), table[file_key])
        if raw is _BAD or raw is None:
            return
        if inline:
            self.warnings.append(f"{self.where(kp)}: both {key} and {file_key} are set; {file_key} wins")
        expanded, unset = _expand_vars(raw, self.env)
        if unset:
            problem = (f"{file_key} = {raw!r} names ${unset}, which is not set in this process"
                       + (" (systemd sets it only inside a unit with LoadCredential=; run the command in such a "
                          f"unit, or give the secret as {SECRET_ENV_OF[(where[0], key)]})"
                          if unset == "CREDENTIALS_DIRECTORY" else ""))  # fmt: skip
            values[key] = SecretFile(self.where(kp), raw, None, problem)
        else:
            values[key] = SecretFile(self.where(kp), raw, self.resolve(expanded))

    def template(self, text: str) -> None:
        """A prompt template must be one ``render_prompt`` can fill (``fleetctl.prompt.check_template``)."""
        from fleetctl.prompt import check_template  # only when a template is configured

        problem = check_template(text)
        if problem is not None:
            self.problem(("orchestrator", "prompt_template"), f"invalid template: {problem}")

    def resolve(self, value: str) -> Path:
        """A path from the file: ``~`` expanded, relative ones against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).absolute()

    # -- hosts and agent types --------------------------------------------------------------------

    def agent_types(self, raw: Any) -> dict[str, AgentTypeConfig]:
        types = {EXAMPLE_AGENT_TYPE: _example_agent_type()}
        if not isinstance(raw, dict):
            self.problem(("agent_types",), f"expected a table of [agent_types.NAME], got {_toml_type(raw)}")
            return types
        for name, table in raw.items():
            kp = ("agent_types", name)
            if not ID_RE.match(name):
                self.problem(kp, "invalid agent type name: use A-Z a-z 0-9 . _ -, starting with a letter/digit")
            if not isinstance(table, dict):
                self.problem(kp, f"expected a table, got {_toml_type(table)}")
                continue
            values = self.table(table, kp, _AGENT_TYPE_KEYS)
            if any(v is _BAD for v in values.values()) or "command" not in values:
                continue
            command = tuple(arg.replace(PYTHON_PLACEHOLDER, sys.executable) for arg in values["command"])
            types[name] = AgentTypeConfig(
                name=name,
                command=command,
                prompt=values.get("prompt", "stdin"),
                env=values.get("env", {}),
                timeout_secs=values.get("timeout_secs"),
            )
        return types

    def hosts(self, raw: Any, agent_types: set[str]) -> tuple[HostConfig, ...]:
        if not isinstance(raw, list) or not all(isinstance(h, dict) for h in raw):
            self.problem(("hosts",), f"expected an array of tables ([[hosts]]), got {_toml_type(raw)}")
            return ()
        hosts, seen_hosts, seen_agents = [], {}, {}
        for i, table in enumerate(raw):
            kp: KeyPath = ("hosts", i)
            values = self.table(table, kp, _HOST_KEYS)
            host_id = values.get("host_id")
            if isinstance(host_id, str):
                if host_id in seen_hosts:
                    self.problem(kp + ("host_id",), f"duplicate host id '{host_id}' (also {seen_hosts[host_id]})")
                seen_hosts.setdefault(host_id, dotted(kp))
            agents = []
            raw_agents = values.pop("agents", None)
            for j, agent in enumerate(raw_agents if isinstance(raw_agents, list) else []):
                spec = self.agent(kp + ("agents", j), agent, host_id, agent_types, seen_agents)
                if spec is not None:
                    agents.append(spec)
            for key in ("ssh_key_path", "known_hosts"):
                if isinstance(values.get(key), str):
                    values[key] = str(self.resolve(values[key]))
            if host_id == "local":  # the id alone makes a host local (HostConfig.is_local); say so explicitly
                if values.get("local") is False:
                    self.problem(kp + ("local",), "host_id 'local' always runs by subprocess; remove local = false "
                                 "or give this host another host_id")  # fmt: skip
                else:
                    values["local"] = True
            if values.get("local") is True and isinstance(values.get("work_dir"), str):
                values["work_dir"] = str(self.resolve(values["work_dir"]))
            if isinstance(host_id, str) and not any(v is _BAD for v in values.values()):
                hosts.append(HostConfig(**values, agents=tuple(agents)))
        return tuple(hosts)

    def agent(self, kp: KeyPath, table: Any, host_id, agent_types, seen: dict) -> AgentSpec | None:
        values = self.table(table, kp, _AGENT_KEYS)
        agent_type = values.get("agent_type")
        if not isinstance(agent_type, str) or not isinstance(host_id, str):
            return None
        if agent_type not in agent_types:
            hint = _did_you_mean(agent_type, sorted(agent_types))
            self.problem(kp + ("agent_type",), f"no [agent_types.{agent_type}] section{hint}")
        agent_id = values.get("agent_id") or f"{host_id}.{agent_type}"
        id_key = kp + (("agent_id",) if values.get("agent_id") else ("agent_type",))
        if agent_id is _BAD:
            return None
        if not ID_RE.match(agent_id):
            self.problem(id_key, f"agent id '{agent_id}' is not a valid id; set agent_id explicitly")
        elif agent_id in seen:
            self.problem(
                id_key, f"duplicate agent id '{agent_id}' (also {seen[agent_id]}); give one an explicit agent_id"
            )
        seen.setdefault(agent_id, dotted(kp))
        if any(v is _BAD for v in values.values()):
            return None
        return AgentSpec(
            agent_type=agent_type,
            agent_id=agent_id,
            max_concurrency=values.get("max_concurrency", 1),
            capabilities=tuple(values.get("capabilities", ())),
        )

    # -- values -----------------------------------------------------------------------------------

    def value(self, kp: KeyPath, spec: _Key, value: Any) -> Any:
        """Check one value against its ``_Key``; report and return ``_BAD`` when it does not fit."""
        error = _check_value(spec, value)
        if error:
            self.problem(kp, error)
            return _BAD
        if spec.kind in ("optstr", "secret", "url", "optid") and value == "":
            return None
        if spec.kind == "secs" and isinstance(value, str):
            return parse_duration(value)
        if spec.kind in ("strs", "repos", "events", "argv"):
            return tuple(value)
        if spec.kind == "strmap":
            return dict(value)
        return value


def _check_value(spec: _Key, value: Any) -> str | None:
    """The problem with ``value`` for ``spec`` as a message, or None when it is fine."""
    kind = spec.kind
    if kind == "bool":
        return None if isinstance(value, bool) else f"expected a boolean (true/false), got {_toml_type(value)}"
    if kind == "secret":
        # never shown, whatever its type: `admin_token = 314159265358979` must not echo the number
        return None if isinstance(value, str) else f"expected a string, got {_toml_kind(value)} (value not shown)"
    if kind == "secs" and isinstance(value, str):
        secs = parse_duration(value)
        if secs is None:
            return f"expected {DURATION_HINT}, got {_toml_type(value)}"
        return _check_value(_Key("num", gt=spec.gt, ge=spec.ge, le=spec.le), secs)
    if kind in ("int", "num", "secs"):
        ok = isinstance(value, int) or (kind != "int" and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            want = {"int": "an integer", "num": "a number"}.get(kind, DURATION_HINT)
            return f"expected {want}, got {_toml_type(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {value}"
        if spec.gt is not None and not value > spec.gt:
            return f"must be > {spec.gt:g}, got {value}"
        if spec.ge is not None and value < spec.ge:
            return f"must be >= {spec.ge:g}, got {value}"
        if spec.le is not None and value > spec.le:
            return f"must be <= {spec.le:g}, got {value}"
        return None
    if kind in ("strs", "repos", "events", "argv"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return f"expected an array of non-empty strings, got {_toml_type(value)}"
        if kind == "argv" and not value:
            return "empty command: give at least the program to run"
        if kind == "repos":
            bad = [v for v in value if not REPO_RE.match(v) or ".." in v]
            return f"expected repositories as owner/name, got {bad[0]!r}" if bad else None
        if kind == "events":
            bad = [v for v in value if not _EVENT_RE.match(v)]
            return f"expected event kinds like 'task.failed', got {bad[0]!r}" if bad else None
        return None
    if kind == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            return f"expected a table of strings, got {_toml_type(value)}"
        return None
    if kind == "repotables":
        if not isinstance(value, dict):
            return f'expected tables [section.repository."owner/name"], got {_toml_type(value)}'
        return None
    if kind == "tables":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            return f"expected an array of tables, got {_toml_type(value)}"
        return None
    if not isinstance(value, str):
        return f"expected a string, got {_toml_type(value)}"
    if kind in ("str", "path", "id") and value == "":
        return "must not be empty"
    if kind in ("id", "optid") and value and not ID_RE.match(value):
        return f"invalid id {value!r}: use 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
    if kind == "url" and value and not _URL_RE.match(value):
        return f"expected an http:// or https:// URL, got {value!r}"
    if kind == "choice" and value not in spec.choices:
        return f"expected one of {', '.join(spec.choices)}, got {value!r}" + _did_you_mean(value, list(spec.choices))
    return None


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _loose_mode(path: Path) -> bool:
    try:
        return bool(_mode(path) & 0o044)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- locations

_HEADER_RE = re.compile(r"^[ \t]*(\[\[?)[ \t]*([^\[\]\n#]+?)[ \t]*\]\]?[ \t]*(?:#.*)?$", re.M)
_KEY_TOKEN_RE = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def _split_dotted(text: str) -> tuple[str, ...] | None:
    """Split a TOML dotted key (``a."b.c".d``) into its parts; None when it is not one."""
    parts, pos = [], 0
    while True:
        m = _KEY_TOKEN_RE.match(text, pos)
        if not m:
            return None
        parts.append(m.group(1) if m.group(1) is not None else (m.group(2) or m.group(3) or ""))
        pos = m.end()
        if pos == len(text):
            return tuple(parts)
        if text[pos] != ".":
            return None
        pos += 1


def _headers(text: str) -> list[tuple[KeyPath, tuple[str, ...], int, int]]:
    """Table headers as (address, segments, start offset, end offset); ``[[x]]`` gets its index."""
    found, counts = [], {}
    for m in _HEADER_RE.finditer(text):
        segs = _split_dotted(m.group(2))
        if segs is None:
            continue
        addr: KeyPath = segs
        if m.group(1) == "[[":
            addr = segs + (counts.get(segs, 0),)
            counts[segs] = counts.get(segs, 0) + 1
        found.append((addr, segs, m.start(2), m.end()))
    return found


def _locate(text: str, keypath: KeyPath) -> tuple[int, int] | None:
    """Best-effort (line, column) of ``keypath`` in ``text``, or of its nearest located parent."""
    headers = _headers(text)
    for cut in range(len(keypath), 0, -1):
        pos = _find(text, headers, keypath[:cut])
        if pos is not None:
            line = text.count("\n", 0, pos) + 1
            return line, pos - (text.rfind("\n", 0, pos) + 1) + 1
    return None


def _find(text: str, headers, kp: KeyPath) -> int | None:
    for addr, _segs, start, _end in headers:
        if addr[: len(kp)] == kp:
            return start
    best = None
    for i, (addr, *_rest) in enumerate(headers):
        if len(addr) < len(kp) and kp[: len(addr)] == addr and (best is None or len(addr) > len(headers[best][0])):
            best = i
    if best is None:
        return _search_keys(text, 0, headers[0][2] if headers else len(text), kp)
    addr, segs, _start, end = headers[best]
    stop = next(
        (h[2] for h in headers[best + 1 :] if h[1][: len(segs)] != segs or h[1] == segs),
        len(text),
    )
    return _search_keys(text, end, stop, kp[len(addr) :])


def _search_keys(text: str, start: int, stop: int, rest: KeyPath) -> int | None:
    """Find the keys of ``rest`` one after another in text[start:stop]; an int picks the n-th next one."""
    pos, found = start, None
    for seg in rest:
        if isinstance(seg, int):  # the n-th inline table of the array that starts at pos
            braces = re.compile(r"\{").finditer(text, pos, stop)
            m = next((m for n, m in enumerate(braces) if n == seg), None)
        else:
            name = re.escape(seg)
            pattern = re.compile(rf"""(?:^[ \t]*|[{{,][ \t]*|\.)("{name}"|'{name}'|{name})[ \t]*[=.]""", re.M)
            m = pattern.search(text, pos, stop)
        if m is None:
            return None
        pos = found = m.start(1) if m.groups() else m.start()
    return found


def _syntax_message(path: Path, text: str, message: str) -> str:
    m = re.search(r"\(at line (\d+), column (\d+)\)$", message)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        reason = message[: m.start()].strip()
    else:
        line, col = text.count("\n") + 1, 1
        reason = re.sub(r"\s*\(at end of document\)$", "", message) + " at end of file"
    key = _key_at_line(text, line)
    if re.split(r"[.\"' ]+", key.strip("\"' "))[-1] in _SECRET_NAMES:
        reason = re.sub(r"'[^']*'|\"[^\"]*\"", "(not shown)", reason)  # a quoted character of a secret
    return f"{path}:{line}:{col}: {key + ': ' if key else ''}invalid TOML: {reason}"


def _key_at_line(text: str, line: int) -> str:
    """The dotted key written on ``line`` (1-based), with its table header; best effort."""
    lines = text.split("\n")
    section = ""
    for header in _HEADER_RE.finditer("\n".join(lines[:line])):
        section = header.group(2).strip()
    m = re.match(r"^[ \t]*([A-Za-z0-9_.\"'-]+?)[ \t]*=", lines[line - 1] if line <= len(lines) else "")
    if not m:
        return section
    return f"{section}.{m.group(1)}" if section else m.group(1)


# ----------------------------------------------------------------------------------- checks and output


def check_config(cfg: Config, serving_webhooks: bool = False, *, check_files: bool = False) -> list[str]:
    """Checks that need the whole picture; raises ConfigError for errors, returns warnings.

    ``serving_webhooks``: whether a webhook listener will run (``serves_webhooks``: ``fleetctl serve`` with
    Forgejo configured); an empty ``forgejo.webhook_secret`` is then an error: webhooks cannot be verified.
    ``check_files``: also read every ``*_file`` secret (``secret_file_problems``) and check each SSH host's
    key and known_hosts files (``ssh_host_problems``); ``fleetctl config check`` and ``doctor`` do, a command
    reads only the secrets it needs, when it needs them.

    Example:
        >>> for warning in check_config(load_config(), serving_webhooks=True): print(warning)  # doctest: +SKIP
    """
    where = str(cfg.path) if cfg.path else "embedded default"
    errors, warnings = [], list(cfg.warnings)
    if serving_webhooks and not _webhook_secret(cfg, errors, reported_elsewhere=check_files):
        errors.append(
            f"{where}: forgejo.webhook_secret: webhook listener with an empty secret (set webhook_secret, "
            "webhook_secret_file or FLEET_WEBHOOK_SECRET)"
        )
    warnings.extend(not_used_yet(cfg))
    if check_files:
        problems, notes = secret_file_problems(cfg)
        errors += problems
        warnings += notes
    if cfg.matrix.homeserver and not cfg.matrix.room_id:
        errors.append(f"{where}: matrix.room_id: must be set when matrix.homeserver is set")
    elif cfg.matrix.homeserver and not secret_source(cfg.matrix, "access_token"):
        # not an error: a unit without the Matrix credential (dispatch) queues messages for one that has it
        warnings.append(f"{where}: matrix.access_token: not set here: Matrix messages wait in the outbox for a "
                        "process that has it (set access_token, access_token_file or FLEET_MATRIX_TOKEN)")  # fmt: skip
    for host in cfg.hosts:
        if not host.agents:
            warnings.append(f"{where}: hosts.{host.host_id}: has no agents")
        if check_files and not host.is_local:
            problems, notes = ssh_host_problems(host)
            errors += [f"{where}: hosts.{host.host_id}.{p}" for p in problems]
            warnings += [f"{where}: hosts.{host.host_id}.{n}" for n in notes]
    if errors:
        msg = errors[0] if len(errors) == 1 else f"{len(errors)} configuration errors:\n  " + "\n  ".join(errors)
        raise ConfigError(msg, details={"errors": errors})
    return warnings


def _webhook_secret(cfg: Config, errors: list[str], *, reported_elsewhere: bool) -> bool:
    """Whether the webhook secret is there (an empty file is not): read now. A file that cannot be read is an
    error, added here unless ``reported_elsewhere`` (``secret_file_problems`` reports it), where a file outside
    its unit (``$CREDENTIALS_DIRECTORY`` unset) also counts as there: it is a warning of that function."""
    raw = secret_source(cfg.forgejo, "webhook_secret")
    if reported_elsewhere and isinstance(raw, SecretFile) and raw.path is None:
        return True
    try:
        return bool(cfg.forgejo.webhook_secret)
    except ConfigError as exc:
        if not reported_elsewhere:
            errors.append(str(exc))
        return True


def secret_file_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """Every ``*_file`` secret read now (errors, warnings): a file that cannot be read is an error; one that
    others may read, or a name with a variable this process lacks (``$CREDENTIALS_DIRECTORY`` outside the
    systemd unit that loads the credential), is a warning."""
    errors, warnings = [], []
    for name, keys in SECRET_KEYS.items():
        section = getattr(cfg, name)
        for key in keys:
            raw = secret_source(section, key)
            if not isinstance(raw, SecretFile):
                continue
            if raw.path is None:
                warnings.append(f"{raw.where}: {raw.problem}")
                continue
            try:
                SecretFile(raw.where, raw.name, raw.path).read()
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            if _loose_mode(raw.path):
                warnings.append(f"{raw.where}: secret file {raw.path} is readable by group/others "
                                f"(mode {_mode(raw.path):04o}); chmod 600 it")  # fmt: skip
    return errors, warnings


def ssh_host_problems(host: HostConfig) -> tuple[list[str], list[str]]:
    """What is wrong with an SSH host's files, as ``key: problem`` (errors, warnings): the key file must be
    given, a regular file and readable (a warning if others may read it); ``known_hosts`` must be readable,
    unless ``host_key_policy = "accept-new"`` may create it. Checked by ``config check``, not by every load: a key given as a systemd credential exists only inside the units that load it."""
    errors, warnings = [], []
    if not host.ssh_key_path:
        errors.append("ssh_key_path: an SSH host needs a private key file (only that key is offered)")
    else:
        key = Path(host.ssh_key_path)
        try:
            st = key.stat()
            if not stat.S_ISREG(st.st_mode):
                errors.append(f"ssh_key_path: {key} is not a regular file")
            elif not os.access(key, os.R_OK):
                errors.append(f"ssh_key_path: {key} is not readable by this user")
            elif st.st_mode & 0o077:
                warnings.append(f"ssh_key_path: {key} is readable by group/others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")  # fmt: skip
        except OSError as exc:
            errors.append(f"ssh_key_path: cannot read {key}: {exc.strerror or exc}")
    known = Path(host.known_hosts or "~/.ssh/known_hosts").expanduser()
    if not known.exists():
        if not host.accept_new_host_keys:
            errors.append(f"known_hosts: {known} does not exist: with host_key_policy = \"strict\" every host key "
                          "must be in it (ssh-keyscan, see docs/ssh-hosts.md)")  # fmt: skip
    elif not os.access(known, os.R_OK):
        errors.append(f"known_hosts: {known} is not readable by this user")
    return errors, warnings


def not_used_yet(cfg: Config) -> list[str]:
    """Warnings for configured settings that nothing uses: Forgejo settings that need ``forgejo.url`` (sync,
    receipt checks, write-back), Matrix settings that need ``matrix.homeserver``."""
    where = str(cfg.path) if cfg.path else "embedded default"
    out = []
    if not cfg.forgejo.url:
        unused = [k for k, v in (("token", secret_source(cfg.forgejo, "token")),
                                 ("repositories", cfg.forgejo.repositories)) if v]  # fmt: skip
        if unused:
            keys = ", ".join(f"forgejo.{k}" for k in unused)
            out.append(f"{where}: {keys}: set but forgejo.url is not: sync, receipt checks and write-back need it")
    elif not secret_source(cfg.forgejo, "token"):
        out.append(f"{where}: forgejo.token: not set: receipts cannot be checked against pull requests, and "
                   "sync and write-back cannot run (set token, token_file or FLEET_FORGEJO_TOKEN)")  # fmt: skip
    if not cfg.matrix.homeserver:
        unused = [k for k in ("room_id", "template") if getattr(cfg.matrix, k)]
        if unused:
            keys = ", ".join(f"matrix.{k}" for k in unused)
            out.append(f"{where}: {keys}: set but matrix.homeserver is not: no notifications are sent")
    return out


def serves_webhooks(cfg: Config) -> bool:
    """Whether ``fleetctl serve`` runs the Forgejo webhook route: when Forgejo is configured (a URL or a
    webhook secret). It then needs a secret: ``check_config(serving_webhooks=True)`` refuses an empty one."""
    return bool(cfg.forgejo.url or cfg.forgejo.webhook_secret)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _mask_url(url: str | None) -> str | None:
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", rf"\g<1>{MASK}@", url) if url else url


def mask(cfg: Config) -> dict:
    """The effective configuration as plain data, every secret replaced by ``***`` when set.

    Also masked: credentials inside URLs and every agent type ``env`` value (they often hold API keys).

    Example:
        >>> mask(load_config())["server"]["admin_token"]  # doctest: +SKIP
        '***'
    """
    out: dict[str, Any] = {}
    for name in ("server", "forgejo", "orchestrator", "matrix", "budgets"):
        section = getattr(cfg, name)
        values = {}
        for f in fields(section):
            if f.name not in SECRET_KEYS.get(name, ()):
                values[f.name] = _plain(getattr(section, f.name))
                continue
            raw = secret_source(section, f.name)  # never read here: it may be readable only in another unit
            values[f.name] = MASK if raw else None
            if isinstance(raw, SecretFile):
                values[f"{f.name}_file"] = raw.name
        out[name] = values
    out["forgejo"]["url"] = _mask_url(cfg.forgejo.url)
    out["matrix"]["homeserver"] = _mask_url(cfg.matrix.homeserver)
    out["hosts"] = [
        {f.name: _plain(getattr(h, f.name)) for f in fields(h) if f.name != "agents"}
        | {"agents": [{f.name: _plain(getattr(a, f.name)) for f in fields(a)} for a in h.agents]}
        for h in cfg.hosts
    ]
    out["agent_types"] = {
        name: {"command": list(t.command), "prompt": t.prompt, "env": {k: MASK for k in t.env}}
        for name, t in cfg.agent_types.items()
    }
    return {k: out[k] for k in ("server", "forgejo", "orchestrator", "hosts", "agent_types", "matrix", "budgets")}


def render_toml(doc: dict) -> str:
    """Plain data as TOML (keys with None values left out, since TOML has no null)."""
    import tomlkit

    def drop_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    return tomlkit.dumps(drop_none(doc))


# ------------------------------------------------------------------------------------------- writing


def example_text() -> str:
    """The commented example configuration shipped inside the package (what ``fleetctl init`` writes)."""
    return (Path(__file__).parent / "config.example.toml").read_text(encoding="utf-8")


def init_config(path: str | Path, *, force: bool = False, env: Mapping[str, str] | None = None) -> Config:
    """Write the example configuration to ``path`` (mode 0600) and return it loaded.

    Raises Conflict (exit 4) when the file exists and ``force`` is false.

    Example:
        >>> cfg = init_config("config.toml")  # doctest: +SKIP
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not force:
        raise Conflict(f"{target} already exists; pass --force to overwrite it", code="config_exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, example_text(), 0o600)
    return load_config(target, env=env)


def parse_value(raw: str) -> Any:
    """A command-line value: a TOML value when it parses as one (``60``, ``true``, ``["a"]``), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_key(key: str) -> KeyPath:
    """``hosts[0].agents.1.max_concurrency`` or ``agent_types."my.type".prompt`` → its segments."""
    segments: list[str | int] = []
    for part in re.findall(r"""\[\d+\]|"(?:[^"\\]|\\.)*"|'[^']*'|[^.\[\]"']+""", key):
        if part.startswith("["):
            segments.append(int(part[1:-1]))
        elif part[0] in "\"'":
            segments.append(part[1:-1])
        else:
            segments.append(int(part) if part.isdigit() else part)
    if not segments or not key.strip() or ".." in key or key.startswith(".") or key.endswith("."):
        raise ConfigError(f"invalid key {key!r}: expected a dotted key such as orchestrator.task_timeout_secs")
    return tuple(segments)


def set_value(path: str | Path, key: str, raw_value: str, *, env: Mapping[str, str] | None = None) -> Config:
    """Set ``key`` to ``raw_value`` in the file at ``path``, keeping its comments and order.

    The edited document is validated first; an invalid result raises ConfigError and leaves the file
    untouched. The write is atomic (temporary file + rename) and keeps the file's mode. In ``[[hosts]]``
    and ``agents`` arrays a segment may be an index, an id or an agent type (``hosts.gpu1.work_dir``).

    Example:
        >>> set_value("config.toml", "orchestrator.task_timeout_secs", "3600")  # doctest: +SKIP
    """
    import tomlkit

    target = Path(os.path.realpath(Path(path).expanduser()))
    segments = parse_key(key)
    text = _read_text(target)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("not changed: " + _syntax_message(target, text, str(exc))) from None
    doc = tomlkit.parse(text)
    container: Any = doc
    try:
        for i, seg in enumerate(segments[:-1]):
            container = _descend(container, seg, segments[: i + 1], key)
        last = segments[-1]
        if isinstance(last, int) or not hasattr(container, "keys"):
            raise ConfigError(f"invalid key {key!r}: {dotted(segments[:-1])} is not a table")
        container[last] = parse_value(raw_value)
        new_text = doc.as_string()
    except (ValueError, TypeError, KeyError) as exc:  # tomlkit refuses some structural edits
        raise ConfigError(f"not changed: cannot set {key!r} here: {exc}") from None
    try:
        cfg = load_config_text(new_text, target, env=env)
    except ConfigError as exc:
        raise ConfigError(f"not changed: {exc.message}", details=exc.details) from None
    _atomic_write(target, new_text, _mode(target))
    return cfg


def _descend(container: Any, seg: str | int, so_far: KeyPath, key: str) -> Any:
    """One step into a tomlkit document for ``set_value``, creating missing tables."""
    import tomlkit

    if isinstance(container, list):
        if isinstance(seg, int):
            if seg >= len(container):
                raise ConfigError(f"invalid key {key!r}: {dotted(so_far)} is out of range ({len(container)} items)")
            return container[seg]
        for item in container:
            if seg in (item.get("host_id"), item.get("agent_id"), item.get("agent_type")):
                return item
        raise ConfigError(f"invalid key {key!r}: no item with id {seg!r} in {dotted(so_far[:-1])}")
    if isinstance(seg, int) or not hasattr(container, "keys"):
        raise ConfigError(f"invalid key {key!r}: {dotted(so_far[:-1])} is not an array of tables")
    if seg not in container:
        container[seg] = tomlkit.table()
    return container[seg]


def _atomic_write(path: Path, text: str, mode: int) -> None:
    """Write via a temporary file in the same directory and rename over ``path``; keep owner if we can."""
    import tempfile

    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if old is not None and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file becomes ours, as any editor would leave it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
