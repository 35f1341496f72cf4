"""A real Synapse homeserver on 127.0.0.1 for the Matrix tests (the ``synapse*`` fixtures in conftest.py).

``ensure_venv()`` makes (once, under a file lock) a virtualenv with PyPI ``matrix-synapse`` at
``~/.cache/fleetctl-tests/synapse-venv`` (``FLEETCTL_SYNAPSE_VENV`` overrides the place): Synapse is
AGPL and pins its own dependencies, so it never enters fleetctl's environment. ``Synapse.launch(dir)``
writes a hand-written ``homeserver.yaml`` — SQLite, one client listener on a free loopback port, no
federation, ``trusted_key_servers: []``, ``report_stats: false``, a ``registration_shared_secret`` and,
unless ``default_rate_limits``, high ``rc_*`` limits — starts it and waits for ``/_matrix/client/versions``.
Users are registered through the shared-secret admin API. ``stop`` ends that one process, by its pid.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

SYNAPSE_VERSION = "1.163.2"
INSTALL_TIMEOUT_SECS = 600
START_TIMEOUT_SECS = 60


def venv_dir() -> Path:
    return Path(os.environ.get("FLEETCTL_SYNAPSE_VENV") or Path.home() / ".cache" / "fleetctl-tests" / "synapse-venv")


def install_hint() -> str:
    return (f"Synapse is not installed and could not be: create its venv with `python3 -m venv {venv_dir()} && "
            f"{venv_dir()}/bin/pip install matrix-synapse=={SYNAPSE_VERSION}` to run the Matrix tests")  # fmt: skip


def ensure_venv() -> Path:
    """The venv's python, after creating the venv if needed (``RuntimeError`` when that fails)."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions: one installs, the others wait for it
        if _works(python):
            return python
        deadline = time.monotonic() + INSTALL_TIMEOUT_SECS
        for argv in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                     [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      f"matrix-synapse=={SYNAPSE_VERSION}"]):  # fmt: skip
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=max(1.0, deadline - time.monotonic()))  # fmt: skip
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{' '.join(argv)} did not finish within {INSTALL_TIMEOUT_SECS}s") from None
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
        if not _works(python):
            raise RuntimeError(f"matrix-synapse was installed in {venv} but does not import")
        return python


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    # -I: no current directory on sys.path (the tests directory holds helpers of its own) and no
    # PYTHON* variables of the test run
    done = subprocess.run([str(python), "-I", "-c", "import synapse.app.homeserver"], capture_output=True,
                          timeout=120, cwd=python.parent)  # fmt: skip
    return done.returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HIGH = {"per_second": 10000, "burst_count": 10000}
CONFIG = """\
server_name: "{server_name}"
pid_file: "{dir}/homeserver.pid"
public_baseurl: "http://127.0.0.1:{port}/"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{dir}/homeserver.db"
log_config: "{dir}/log.yaml"
media_store_path: "{dir}/media"
signing_key_path: "{dir}/signing.key"
registration_shared_secret: "{secret}"
macaroon_secret_key: "{macaroon}"
form_secret: "{form}"
report_stats: false
trusted_key_servers: []
federation_domain_whitelist: []
enable_registration: false
suppress_key_server_warning: true
presence:
  enabled: false
url_preview_enabled: false
enable_metrics: false
{limits}
"""
LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: "{dir}/homeserver.log"
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


def _limits(default_rate_limits: bool) -> str:
    high = "{per_second: 10000, burst_count: 10000}"
    keys = ["rc_registration", "rc_login:\n  address: {0}\n  account: {0}\n  failed_attempts: {0}",
            "rc_joins:\n  local: {0}\n  remote: {0}", "rc_invites:\n  per_room: {0}\n  per_user: {0}\n  per_issuer: {0}",
            "rc_admin_redaction", "rc_3pid_validation", "rc_room_creation", "rc_presence:\n  per_user: {0}"]  # fmt: skip
    if not default_rate_limits:
        keys.insert(0, "rc_message")
    return "\n".join(k.format(high) if "{0}" in k else f"{k}: {high}" for k in keys)


class Synapse:
    """One Synapse process we started (its data in ``directory``); ``url`` is its client API base URL."""

    def __init__(self, directory: Path, python: Path, port: int):
        self.dir, self.python, self.port = directory, python, port
        self.server_name = "localhost"
        self.url = f"http://127.0.0.1:{port}"
        self.secret = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @classmethod
    def launch(cls, directory: Path, *, default_rate_limits: bool = False) -> Synapse:
        """Write the config, generate the signing key, start Synapse and wait until it answers."""
        python = ensure_venv()
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(directory, python, free_port())
        (directory / "log.yaml").write_text(LOG_CONFIG.format(dir=directory))
        (directory / "homeserver.yaml").write_text(CONFIG.format(
            server_name=server.server_name, dir=directory, port=server.port, secret=server.secret,
            macaroon=secrets.token_hex(16), form=secrets.token_hex(16), limits=_limits(default_rate_limits)))  # fmt: skip
        done = subprocess.run([str(python), "-I", "-m", "synapse.app.homeserver", "-c", str(directory / "homeserver.yaml"),
                               "--generate-keys"], capture_output=True, text=True, timeout=120, cwd=directory)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"synapse --generate-keys exited {done.returncode}: {done.stderr[-2000:]}")
        server.start()
        return server

    def start(self) -> Synapse:
        """Start (or restart after ``stop``) on the same port with the same data; wait until it answers."""
        log = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen([str(self.python), "-I", "-m", "synapse.app.homeserver", "-c",
                                      str(self.dir / "homeserver.yaml")], cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"synapse exited {self.proc.returncode} at start: {self._log_tail()}")
            try:
                if httpx.get(self.url + "/_matrix/client/versions", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"synapse did not answer within {START_TIMEOUT_SECS}s: {self._log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process we started (SIGKILL after ``timeout``), and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def _log_tail(self) -> str:
        text = ""
        for name in ("stdout.log", "homeserver.log"):
            p = self.dir / name
            if p.exists():
                text += p.read_text(errors="replace")[-1500:]
        return text

    # ------------------------------------------------------------------ the client-server API, for tests

    def call(self, method: str, path: str, token: str | None = None, json: Any = None, **params: Any) -> dict:
        """One request; its JSON (``AssertionError`` with the answer on a non-2xx status)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.request(method, self.url + path, headers=headers, json=json, params=params or None, timeout=30)
        assert 200 <= r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def register(self, localpart: str, admin: bool = False) -> tuple[str, str]:
        """Register a user through the shared-secret admin API: ``(user_id, access_token)``."""
        nonce = self.call("GET", "/_synapse/admin/v1/register")["nonce"]
        password = secrets.token_hex(12)
        doc = self.call("POST", "/_synapse/admin/v1/register", json={
            "nonce": nonce, "username": localpart, "password": password, "admin": admin,
            "mac": _mac(self.secret, nonce, localpart, password, admin)})  # fmt: skip
        return doc["user_id"], doc["access_token"]

    def create_room(self, token: str, invite: list[str] | tuple[str, ...] = (), preset: str = "private_chat",
                    alias: str | None = None) -> str:  # fmt: skip
        body: dict[str, Any] = {"preset": preset, "invite": list(invite)}
        if alias:
            body["room_alias_name"] = alias
        return self.call("POST", "/_matrix/client/v3/createRoom", token, json=body)["room_id"]

    def join(self, token: str, room: str) -> str:
        return self.call("POST", f"/_matrix/client/v3/join/{quote(room, safe='')}", token, json={})["room_id"]

    def set_alias(self, token: str, alias: str, room_id: str) -> None:
        self.call("PUT", f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}", token, json={"room_id": room_id})

    def messages(self, token: str, room_id: str) -> list[dict]:
        """Every ``m.room.message`` event of the room, oldest first."""
        out, start = [], None
        for _ in range(100):  # bounded: 100 pages of 100
            params = {"dir": "f", "limit": 100, **({"from": start} if start else {})}
            page = self.call("GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages", token, **params)
            out += [e for e in page.get("chunk", []) if e.get("type") == "m.room.message"]
            start = page.get("end")
            if not start or not page.get("chunk"):
                return out
        return out


def _mac(secret: str, nonce: str, user: str, password: str, admin: bool) -> str:
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join(p.encode() for p in (nonce, user, password, "admin" if admin else "notadmin")))
    return mac.hexdigest()
