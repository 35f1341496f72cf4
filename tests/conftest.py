"""Shared fixtures. Every test runs in its own directory with its own fleetctl home (STYLE.md §10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

_FLEET_ENV = (
    "FLEET_CONFIG",
    "FLEET_DB_PATH",
    "FLEET_API_URL",
    "FLEET_API_TOKEN",
    "FLEET_FORGEJO_TOKEN",
    "FLEET_WEBHOOK_SECRET",
    "FLEET_MATRIX_TOKEN",
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """FLEETCTL_HOME and the cwd in tmp_path; no FLEET_* settings and no user config leak in."""
    monkeypatch.setenv("FLEETCTL_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for name in _FLEET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    # processes a test starts (python -m fleetctl, the fleetctl script in a run) import this checkout's
    # package, whatever an editable install on the machine points at
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


# ------------------------------------------------------------------------------------------------------
# CLI and local-dispatch harness (tests/test_cli.py, test_exit_codes.py, test_ids.py, test_dispatch.py)

import json  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

#: A local run that hands in a success receipt with the real console script (FLEET_* come from the run).
COMPLETE_SCRIPT = (
    "import os, subprocess, sys; "
    "sys.exit(subprocess.run(['fleetctl', 'task', 'complete', os.environ['FLEET_TASK_ID'], '--summary', 'ok'])"
    ".returncode)"
)
DEFAULT_AGENT_TYPES = {"ok": {"command": ["{python}", "-c", COMPLETE_SCRIPT], "prompt": "file"}}
DEFAULT_ORCHESTRATOR = {
    "db_path": "fleet.db",
    "task_timeout_secs": 60,
    "retry_backoff_secs": 0.2,
    "retry_backoff_max_secs": 1,
    "default_max_retries": 1,
    "lease_secs": 60,
}


@pytest.fixture(autouse=True)
def _no_run_env(monkeypatch):
    """Nothing named FLEET_* leaks in — not even FLEET_TASK_ID/FLEET_ATTEMPT when an agent runs the suite."""
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def runner():
    """typer's CliRunner with colour off and a wide terminal, so tables never fold."""
    from typer.testing import CliRunner

    return CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200"})


def make_config(
    directory: Path,
    *,
    orchestrator: dict | None = None,
    agents: list[dict] | None = None,
    agent_types: dict[str, dict] | None = None,
    forgejo: dict | None = None,
    server: dict | None = None,
    hosts: list[dict] | None = None,
    work_dir: str = "ws",
    name: str = "config.toml",
) -> Path:
    """Write a SPEC §4 config: one local host (work_dir under ``directory``), its agents, their types; then
    the ``[[hosts]]`` tables in ``hosts`` (SSH hosts: ``ssh_host_table``).

    Defaults: agent ``local-ok`` (type ``ok``, max_concurrency 2, no capabilities) whose command hands in
    a success receipt at once; small retry backoff (0.2 s), one retry, db ``fleet.db`` beside the file.
    """
    import tomlkit

    doc: dict[str, Any] = {"orchestrator": {**DEFAULT_ORCHESTRATOR, **(orchestrator or {})}}
    if server is not None:
        doc["server"] = server
    if forgejo is not None:
        doc["forgejo"] = forgejo
    doc["hosts"] = [
        {
            "host_id": "local",
            "local": True,
            "work_dir": work_dir,
            "agents": agents
            if agents is not None
            else [{"agent_type": "ok", "agent_id": "local-ok", "max_concurrency": 2, "capabilities": []}],
        },
        *(hosts or []),
    ]
    doc["agent_types"] = agent_types if agent_types is not None else DEFAULT_AGENT_TYPES
    path = directory / name
    path.write_text(tomlkit.dumps(doc))
    return path


def reap_runs(directory: Path) -> None:
    """Kill (by process group) every run under ``directory`` that has not written its exit status."""
    for pidfile in directory.rglob("pid"):
        if pidfile.parent.name != ".fleet" or (pidfile.parent / "exit_status").exists():
            continue
        try:
            os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)


class Fleet:
    """A configured fleet in ``tmp_path``: real ``fleetctl`` subprocesses plus direct reads of its database."""

    wait_for = staticmethod(wait_for)
    pid_alive = staticmethod(pid_alive)

    def __init__(self, directory: Path):
        self.dir = directory
        self.config: Path | None = None
        self.db = directory / DEFAULT_ORCHESTRATOR["db_path"]
        self.procs: list[subprocess.Popen] = []

    def configure(self, **overrides: Any) -> Path:
        """``make_config`` in this fleet's directory (found as ./config.toml: the cwd is the directory)."""
        self.config = make_config(self.dir, **overrides)
        db = (overrides.get("orchestrator") or {}).get("db_path")
        if db:
            self.db = self.dir / db
        return self.config

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **extra}

    def run(self, *args: str, env: dict | None = None, input: str | None = None, timeout: float = 60):
        """Run ``fleetctl ARGS`` to completion; a CompletedProcess with text stdout/stderr."""
        return subprocess.run(["fleetctl", *args], capture_output=True, text=True, input=input,
                              env=self.env(**(env or {})), cwd=self.dir, timeout=timeout)  # fmt: skip

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``fleetctl ARGS`` in the background; stopped by pid at teardown if still running."""
        proc = subprocess.Popen(["fleetctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(**(env or {})), cwd=self.dir)  # fmt: skip
        self.procs.append(proc)
        return proc

    def create(self, *args: str) -> str:
        """``fleetctl task create ARGS``; the new task id."""
        done = self.run("task", "create", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        conn = sqlite3.connect(self.db, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()
        for row in rows:
            for col in ("labels", "requirements", "pull_request", "capabilities", "receipt", "data"):
                if isinstance(row.get(col), str):
                    row[col] = json.loads(row[col])
        return rows

    def task(self, task_id: str) -> dict:
        rows = self.query("SELECT * FROM tasks WHERE task_id=?", (task_id,))
        assert rows, f"no task {task_id}"
        return rows[0]

    def events(self, task_id: str | None = None) -> list[dict]:
        if task_id is None:
            return self.query("SELECT * FROM events ORDER BY id")
        return self.query("SELECT * FROM events WHERE task_id=? ORDER BY id", (task_id,))

    def attempts(self, task_id: str) -> list[dict]:
        return self.query("SELECT * FROM attempts WHERE task_id=? ORDER BY attempt", (task_id,))

    def wait_state(self, task_id: str, *states: str, timeout: float = 20.0) -> dict:
        """Poll the database until the task is in one of ``states``; the task row."""
        return wait_for(lambda: (t := self.task(task_id))["state"] in states and t, timeout,
                        what=f"task {task_id} to reach {'/'.join(states)}")  # fmt: skip

    def claim(self, task_id: str, agent_id: str, capabilities: tuple[str, ...] = ()) -> dict:
        """What a pull agent's dequeue does (the conditional claim; the CLI has no dequeue): the task row."""
        from fleetctl.store import Store

        with Store.open(self.db) as store:
            row = store.claim(agent_id=agent_id, capabilities=capabilities, max_concurrency=10, lease_secs=60,
                              ts=time.time(), task_id=task_id)  # fmt: skip
        assert row is not None and row["state"] == "assigned", f"{agent_id} could not claim {task_id}"
        return row

    def check_db(self) -> None:
        done = self.run("db", "check")
        assert done.returncode == 0, done.stdout + done.stderr

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        reap_runs(self.dir)


@pytest.fixture
def fleet(tmp_path):
    """A ``Fleet`` in tmp_path; its background processes and detached runs are stopped at teardown."""
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def write_config(tmp_path):
    """``write_config(**overrides)`` writes tmp_path/config.toml (see ``make_config``); runs are reaped after."""
    try:
        yield lambda **overrides: make_config(tmp_path, **overrides)
    finally:
        reap_runs(tmp_path)


# ------------------------------------------------------------------------------------------------------
# Store and services (tests/test_store.py, test_services.py, test_property.py, test_concurrency.py)


@pytest.fixture
def orch(tmp_path):
    """Default orchestrator settings with the database at tmp_path/fleet.db."""
    from fleetctl.config import OrchestratorConfig

    return OrchestratorConfig(db_path=tmp_path / "fleet.db")


@pytest.fixture
def store(orch):
    """A real, migrated database file at ``orch.db_path``; closed at teardown."""
    from fleetctl.store import Store

    s = Store.open(orch.db_path)
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------------
# A live `fleetctl serve` (tests/test_server.py and the other HTTP tests)

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
REGISTRATION_TOKEN = "registration-token-for-tests-0123"


class LiveServer:
    """``fleetctl serve`` as a real subprocess on a free loopback port, over a database in ``directory``."""

    def __init__(self, directory, config: Path | None = None, **orchestrator):
        """Serve ``config`` (a fleet's own config file, e.g. ``Fleet.config``) if given; else write
        ``directory/server.toml`` with the test tokens and these orchestrator settings."""
        import os

        self.dir = directory
        self.db_path = directory / "fleet.db"
        self.config_path = config or directory / "server.toml"
        if config is None:
            forgejo = orchestrator.pop("forgejo", None)  # a [forgejo] table, e.g. {"webhook_secret": "…"}
            settings = {"lease_secs": 30, "heartbeat_interval_secs": 60, **orchestrator}
            lines = ["[server]", f'admin_token = "{ADMIN_TOKEN}"', "[orchestrator]", f'db_path = "{self.db_path}"',
                     f'http_pull_token = "{REGISTRATION_TOKEN}"']  # fmt: skip
            lines += [f"{k} = {v!r}" for k, v in settings.items()]
            if forgejo:
                lines += ["[forgejo]"] + [f"{k} = {json.dumps(v)}" for k, v in forgejo.items()]
            self.config_path.write_text("\n".join(lines) + "\n")
            os.chmod(self.config_path, 0o600)
        self.proc = None
        self.port = 0
        self.stderr_path = directory / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0, extra: tuple[str, ...] = ()) -> LiveServer:
        """Start it (``extra``: more options of ``serve``, e.g. ``("--workers", "2")``); once it listens."""
        import re
        import subprocess
        import sys
        import time

        log = open(self.stderr_path, "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetctl", "serve", "--config", str(self.config_path), "--port", str(port),
             *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.stderr_path.read_text()
            found = re.findall(r"action=serve.listening bind=\S+ port=(\d+)", text)
            if found and self.proc.poll() is None and len(found) > getattr(self, "_starts", 0):
                self._starts = len(found)
                self.port = int(found[-1])
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"fleetctl serve exited {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        raise AssertionError(f"fleetctl serve did not start: {self.stderr_path.read_text()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def client(self, token: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=40)

    def register(self, agent_id: str, capabilities=(), max_concurrency: int = 1, agent_type: str = "test") -> str:
        """Register a pull agent; its token."""
        with self.client(REGISTRATION_TOKEN) as c:
            r = c.post("/api/v1/agents/register", json={"agent_id": agent_id, "agent_type": agent_type,
                                                         "capabilities": list(capabilities),
                                                         "max_concurrency": max_concurrency})  # fmt: skip
            assert r.status_code in (200, 201), r.text
            return r.json()["token"]


@pytest.fixture
def live_server(tmp_path):
    """A started ``LiveServer`` (lease 30 s); stopped by PID at teardown."""
    server = LiveServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_server(tmp_path):
    """``make_server(**orchestrator_settings)`` → an unstarted ``LiveServer``; stopped at teardown."""
    servers = []

    def make(**settings):
        server = LiveServer(tmp_path, **settings)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for s in servers:
            s.stop()


def stop_cleanly(server: LiveServer) -> str:
    """Stop ``server`` with SIGTERM; assert that it exited 0 and logged no internal error. Its log."""
    code = server.stop()
    log = server.stderr_path.read_text()
    assert code == 0, f"fleetctl serve exited {code}: {log[-2000:]}"
    assert "internal_error" not in log and "Traceback" not in log, log[-4000:]
    return log


def config_of(orch, **forgejo) -> Any:
    """A whole ``Config`` around orchestrator settings (services that decide policy take the whole config)."""
    from fleetctl.config import Config, ForgejoConfig, MatrixConfig, ServerConfig

    return Config(server=ServerConfig(), forgejo=ForgejoConfig(**forgejo), orchestrator=orch, hosts=(),
                  agent_types={}, matrix=MatrixConfig())  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# A fake Forgejo (tests/fakes/forgejo.py; tests/test_forgejo_client.py)


@pytest.fixture
def forgejo():
    """A started ``FakeForgejo`` with the repository ``acme/widgets`` (branch ``main``); stopped at teardown.

    Its bot user ``fleet-bot`` has the token ``forgejo.bot_token``; ``alice`` is the human who files issues.
    """
    from fakes.forgejo import FakeForgejo

    fake = FakeForgejo().start()
    fake.add_repo("acme/widgets", default_branch="main")
    try:
        yield fake
    finally:
        fake.stop()


# ------------------------------------------------------------------------------------------------------
# A real sshd on 127.0.0.1 (tests/sshd.py; the SSH executor in tests/test_executor_contract.py and
# tests/test_ssh_executor.py)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A started ``tests.sshd.Sshd`` (one for the session); stopped by its pid at the end.

    Without ``/usr/sbin/sshd`` it is installed in CI (as root); elsewhere the tests skip with the command to
    install it. In CI a failure to install or start sshd fails the tests, never skips them.
    """
    from sshd import Sshd, ensure_installed

    try:
        missing = ensure_installed()
    except RuntimeError as exc:
        pytest.fail(f"cannot install sshd: {exc}")
    if missing:
        pytest.skip(missing)
    try:
        server = Sshd.start(tmp_path_factory.mktemp("sshd"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot start sshd: {exc}")
    try:
        yield server
    finally:
        server.stop()


SSH_TIMEOUT = 1.5
"""``connect_timeout_secs`` of the hosts ``host_for`` builds: small, so a host that never answers fails fast."""


def host_for(sshd, tmp_path: Path, **overrides) -> Any:
    """A ``HostConfig`` ``box-1`` that reaches ``sshd`` (its key, its known_hosts), work_dir ``tmp_path``."""
    from fleetctl.config import HostConfig

    fields = dict(host_id="box-1", hostname=sshd.host, ssh_user=sshd.user, ssh_port=sshd.port,
                  ssh_key_path=sshd.key_path, known_hosts=sshd.known_hosts, connect_timeout_secs=SSH_TIMEOUT,
                  work_dir=str(tmp_path))  # fmt: skip
    return HostConfig(**{**fields, **overrides})


def ssh_host_table(host: Any) -> dict:
    """A ``HostConfig`` as the ``[[hosts]]`` table that configures it (for ``make_config(hosts=…)``)."""
    import dataclasses

    table = {k: v for k, v in dataclasses.asdict(host).items() if v is not None}
    table["agents"] = [{**a, "capabilities": list(a["capabilities"])} for a in table["agents"]]
    return table


def other_key(tmp_path: Path, name: str) -> str:
    """A fresh ed25519 key pair at ``tmp_path/name`` (and ``.pub``) that no sshd here trusts; its path."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return str(path)


# ------------------------------------------------------------------------------------------------------
# A real Synapse homeserver on 127.0.0.1 (tests/synapse_server.py; the Matrix tests)


def _launch_synapse(directory: Path, **kwargs: Any) -> Any:
    """A started ``tests.synapse.Synapse``. Its venv is made when missing; when that or the start fails,
    the test fails in CI and skips elsewhere, with what to install."""
    from synapse_server import Synapse, install_hint

    try:
        return Synapse.launch(directory, **kwargs)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot start Synapse: {exc}")
        pytest.skip(f"{install_hint()} ({exc})")


@pytest.fixture(scope="session")
def synapse(tmp_path_factory):
    """One Synapse for the session, with high rate limits; stopped by its pid at the end."""
    server = _launch_synapse(tmp_path_factory.mktemp("synapse"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def synapse_strict(tmp_path_factory):
    """A Synapse with Synapse's default message rate limit (0.2/s, bursts of 10)."""
    server = _launch_synapse(tmp_path_factory.mktemp("synapse-strict"), default_rate_limits=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_synapse(tmp_path):
    """``make_synapse(**kwargs)``: a Synapse of the test's own (to stop and start); stopped at teardown."""
    started = []

    def make(**kwargs: Any) -> Any:
        server = _launch_synapse(tmp_path / f"synapse-{len(started)}", **kwargs)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()
