"""A real OpenSSH server on 127.0.0.1 for the SSH executor's tests (the ``sshd`` fixture in conftest.py).

``Sshd.start(directory)`` generates a host key and a client key with ``ssh-keygen``, writes an
``sshd_config`` that accepts only that client key, runs ``/usr/sbin/sshd -D -e`` on a free loopback port
(its log goes to ``directory/sshd.log``), waits until the port accepts and writes a ``known_hosts`` line
for ``[127.0.0.1]:PORT``. ``stop`` ends that one process, by its pid.

``ensure_installed`` installs Debian's ``openssh-server`` when ``/usr/sbin/sshd`` is missing, and only in
CI as root; elsewhere the fixture skips with the command to run.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
INSTALL_TIMEOUT_SECS = 600
INSTALL_COMMANDS = (
    ["apt-get", "update", "-qq"],
    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
)


def install_hint() -> str:
    return f"{SSHD} is missing: install it with `apt-get install openssh-server` to run the SSH tests"


def ensure_installed() -> str | None:
    """None when sshd is there (installing it in CI as root if needed); else why it is not (skip locally).

    In CI an install that fails raises ``RuntimeError``: the caller turns that into a test failure.
    """
    if os.path.exists(SSHD):
        return None
    if not os.environ.get("CI") or os.geteuid() != 0 or not shutil.which("apt-get"):
        if os.environ.get("CI"):
            raise RuntimeError(f"{SSHD} is missing and cannot be installed here (not root, or no apt-get)")
        return install_hint()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_TIMEOUT_SECS
    for argv in INSTALL_COMMANDS:
        left = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=left)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(argv)} did not finish within {INSTALL_TIMEOUT_SECS}s") from None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    if not os.path.exists(SSHD):
        raise RuntimeError(f"openssh-server was installed but {SSHD} is still missing")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetctl-tests", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


@dataclass
class Sshd:
    """A running sshd: connect to ``host``:``port`` as ``user`` with ``key_path``, checking ``known_hosts``."""

    dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen | None = None

    @property
    def key_path(self) -> str:
        return str(self.dir / "client_key")

    @property
    def known_hosts(self) -> str:
        return str(self.dir / "known_hosts")

    @property
    def host_key_path(self) -> str:
        return str(self.dir / "host_key")

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def accepted_logins(self) -> int:
        """How many connections authenticated so far (sshd logs one ``Accepted publickey`` line each)."""
        return self.log().count("Accepted publickey")

    def known_hosts_line(self, public_key_file: str | None = None) -> str:
        """A known_hosts line for this server, with its own host key or the one in ``public_key_file``."""
        kind, blob = Path(public_key_file or self.host_key_path + ".pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {kind} {blob}\n"

    @classmethod
    def start(cls, directory: Path, timeout: float = 20.0) -> Sshd:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self = cls(directory)
        keygen(Path(self.host_key_path))
        keygen(Path(self.key_path))
        shutil.copyfile(self.key_path + ".pub", directory / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        self.port = free_port()
        config = directory / "sshd_config"
        config.write_text(
            "\n".join([
                f"Port {self.port}",
                f"ListenAddress {self.host}",
                f"HostKey {self.host_key_path}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PubkeyAuthentication yes",
                "StrictModes no",
                f"PidFile {directory / 'sshd.pid'}",
                "Subsystem sftp internal-sftp",
                "PermitRootLogin yes",
                "LogLevel VERBOSE",
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "",
            ])
        )  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not accept on port {self.port}: {self.log()[-2000:]}") from None
                time.sleep(0.05)
        Path(self.known_hosts).write_text(self.known_hosts_line())
        return self

    def stop(self) -> None:
        """Terminate this sshd (by its pid) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
