"""The SSH executor: runs attempts on a ``[[hosts]]`` entry over SSH (SPEC §8), behind the same interface
and contract suite as the local executor, with the very same workspace scripts.

One fabric ``Connection`` per executor, opened at the first call and reused for every launch, probe, kill
and remove until ``close`` (a pass makes one executor per host, so a pass logs in once per host). A
connection that broke is dropped and opened afresh by the next call.

``launch`` mirrors ``LocalExecutor.launch``: it refuses a workspace whose run still lives and clears a
finished run's bookkeeping, creates ``.fleet/`` (mode 700) and uploads ``prompt.md`` and ``run.sh`` over SFTP
(mode 600) plus ``env``, the run's environment as ``export NAME='value'`` lines, which the remote side
sources and removes: nothing of the environment (the task token) ever appears on a command line. Then
it starts the wrapper with ``env -i`` and only the login's HOME, USER, LOGNAME, SHELL, PATH and LANG
(``LOGIN_ENV``: nothing else of sshd's session, and nothing of the orchestrator's own environment — the
caller builds ``spec.env`` from the FLEET_* variables and the agent type's env alone),
``setsid -f`` and stdin, stdout and stderr on ``/dev/null``, so the SSH channel returns at once, and polls
``.fleet/pid`` (bounded) for the wrapper's confirmation.

Every remote command is argv joined with ``shlex.quote``; paths and ids are arguments, never script text.

Security: host keys are checked against ``host.known_hosts`` (``~/.ssh/known_hosts`` when unset) with
``RejectPolicy``: an unknown host is refused, a changed key always is; only with ``host_key_policy =
"accept-new"`` is an unknown host's key accepted and recorded in that file. Only ``ssh_key_path`` is offered (no agent, no ``~/.ssh`` keys, no
``ssh_config``). The connect, banner and auth timeouts are ``connect_timeout_secs``. Every failure is a
``RemoteError`` naming the host; paramiko's own logging is silenced (our error says what happened).

Speed: a launch costs one exec (each exec starts a shell on the host, by far the dearest round trip) and a
handful of SFTP requests; the socket sends each packet at once (``TCP_NODELAY``).

fabric and paramiko are imported inside functions only (ruff TID253; tests/test_layers.py).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import shlex
import stat
import time
from collections.abc import Mapping
from typing import Any

from fleetctl.config import HostConfig
from fleetctl.errors import HostUnreachable, RemoteError
from fleetctl.executors.base import DEFAULT_KILL_GRACE_SECS, LaunchSpec, RunStatus
from fleetctl.executors.workspace import (
    META,
    REMOVE_TIMEOUT_SECS,
    STALE_FILES,
    kill_argv,
    launch_problem,
    meta_files,
    parse_kill,
    parse_probe,
    parse_remove,
    probe_argv,
    remove_argv,
    wrapper_argv,
)

DEFAULT_START_TIMEOUT_SECS = 10.0
"""How long ``launch`` waits for the wrapper to record its pid."""

_SCRIPT_TIMEOUT_SECS = 30.0
"""Bound on one remote command (no output for this long fails it); a kill gets its grace period on top."""

_CANNOT_CONNECT = "cannot connect"
"""What every failure to reach or log in to the host says (a ``HostUnreachable``)."""

ENV_FILE = "env"
"""``.fleet/env``: the run's environment, sourced (then removed) by the remote launcher."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Run on the host in the workspace by ``env -i sh -c LAUNCHER fleetctl-launch WRAPPER_ARGV...``: load the
#: run's environment, forget the file, start the wrapper detached with nothing tied to the SSH channel.
LAUNCHER = '. ./.fleet/env || exit 98; rm -f ./.fleet/env; exec "$@" < /dev/null > /dev/null 2>&1'

#: Run by the login shell on the host as ``sh -c LOGIN_ENV LAUNCHER fleetctl-launch WRAPPER_ARGV...``: a fresh
#: environment holding only the login's own HOME, USER, LOGNAME, SHELL, PATH and LANG (the agent CLI's
#: login and tools live there, not in the orchestrator's environment), then ``LAUNCHER``. The uploaded
#: ``.fleet/env`` (the agent type's env and the FLEET_* variables) is sourced on top of it.
LOGIN_ENV = ('exec env -i HOME="$HOME" USER="${USER:-$LOGNAME}" LOGNAME="${LOGNAME:-$USER}" SHELL="${SHELL:-/bin/sh}" '
             'PATH="${PATH:-/usr/bin:/bin}" LANG="${LANG:-C.UTF-8}" sh -c "$0" "$@"')  # fmt: skip


def _quiet_paramiko() -> None:
    # paramiko logs every failed handshake at ERROR with a traceback; our RemoteError says it once
    # (and fabric's invoke logs its configuration merges at DEBUG)
    for name, level in (("paramiko", logging.CRITICAL), ("invoke", logging.WARNING)):
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)


def _no_delay(conn: Any) -> None:
    """Send each SSH packet at once (TCP_NODELAY). An exec or SFTP request is a small write answered by the
    host: with Nagle's algorithm on, such a write may wait for the ACK of the previous one, which the host
    delays (up to 40 ms on Linux) — every launch would pay that several times."""
    import socket

    try:
        conn.client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a proxy command): nothing to tune
        pass


def env_file(env: Mapping[str, str]) -> bytes:
    """``env`` as ``export NAME='value'`` lines for a POSIX shell (names checked, values quoted)."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"the environment variable name {name!r} cannot be passed to a shell")
        if "\0" in value:
            raise ValueError(f"a NUL character in the value of {name}")
        lines.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


#: ``fleetctl doctor``'s one command on a host: ``sh -c DIAGNOSE fleetctl-doctor WORK_DIR COMMAND...``. Reads only.
DIAGNOSE = r"""wd=$1; shift
if [ -d "$wd" ]; then [ -w "$wd" ] && [ -x "$wd" ] && echo 'writable 1' || echo 'writable 0'; p=$wd
else p=$(dirname -- "$wd"); while [ ! -d "$p" ]; do p=$(dirname -- "$p"); done
  [ -w "$p" ] && [ -x "$p" ] && echo 'writable 1' || echo 'writable 0'; fi
echo "free_kb $(df -Pk -- "$p" 2>/dev/null | awk 'NR==2 {print $4}')"
echo "time $(date +%s)"
for c in "$@"; do command -v -- "$c" >/dev/null 2>&1 || echo "missing $c"; done
"""


class SshExecutor:
    """Runs attempts on one SSH host, over one reused connection; see the module docstring."""

    def __init__(self, host: HostConfig, start_timeout_secs: float = DEFAULT_START_TIMEOUT_SECS):
        self.host = host
        self.start_timeout_secs = start_timeout_secs
        self.timeout = float(host.connect_timeout_secs)
        self._conn: Any = None
        self._sftp: Any = None
        self.connects = 0
        """How many times this executor logged in (1 while the connection holds)."""
        self.closed = False

    # -- naming ----------------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        user = f"{self.host.ssh_user}@" if self.host.ssh_user else ""
        return f"{user}{self.host.hostname}:{self.host.ssh_port}"

    def _error(self, what: str, problem: str, code: str) -> RemoteError:
        cls = HostUnreachable if what == _CANNOT_CONNECT else RemoteError
        return cls(f"ssh {self.where} (host {self.host.host_id}): {what}: {problem}", code=code)

    # -- the connection --------------------------------------------------------------------------------

    def _connection(self, code: str) -> Any:
        """The open connection (opening it if needed); ``RemoteError`` with ``code`` if it cannot be."""
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        self._drop()
        import fabric
        import paramiko

        _quiet_paramiko()
        host = self.host
        client = paramiko.SSHClient()
        known_hosts = os.path.expanduser(host.known_hosts or "~/.ssh/known_hosts")
        if os.path.exists(known_hosts):
            try:
                client.load_host_keys(known_hosts)
            except (OSError, paramiko.SSHException) as exc:
                raise self._error(_CANNOT_CONNECT, f"cannot read known_hosts {known_hosts}: {exc}", code) from None
        if host.accept_new_host_keys:  # host_key_policy = "accept-new"
            client.set_missing_host_key_policy(_accept_new_policy(paramiko, known_hosts))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        connect_kwargs: dict[str, Any] = {
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": self.timeout,
            "auth_timeout": self.timeout,
            "channel_timeout": self.timeout,
        }
        if host.ssh_key_path:
            key = os.path.expanduser(host.ssh_key_path)
            if not os.access(key, os.R_OK):  # paramiko would say only "No such file or directory"
                problem = "does not exist" if not os.path.exists(key) else "is not readable by this user"
                raise self._error(_CANNOT_CONNECT, f"the key file {key} (ssh_key_path) {problem}", code)
            connect_kwargs["key_filename"] = key
        config = fabric.Config(lazy=True, ssh_config=paramiko.SSHConfig())  # no ~/.ssh/config, no /etc/fabric.yml
        conn = fabric.Connection(host.hostname, user=host.ssh_user, port=host.ssh_port, config=config,
                                 connect_timeout=self.timeout, connect_kwargs=connect_kwargs)  # fmt: skip
        conn.client = client  # ours: host keys from known_hosts only, and our policy (fabric's auto-adds)
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise self._error(_CANNOT_CONNECT, f"the host key ({exc.key.get_name()}) does not match the one in "
                              f"{known_hosts}: the host key changed, refusing to connect", code) from None  # fmt: skip
        except paramiko.AuthenticationException as exc:
            conn.close()
            raise self._error(_CANNOT_CONNECT, f"authentication failed with the key {host.ssh_key_path or '(none)'}"
                              f" for user {host.ssh_user or '(default)'}: {exc}", code) from None  # fmt: skip
        except TimeoutError:
            conn.close()
            raise self._error(_CANNOT_CONNECT, f"timed out after {self.timeout:g}s", code) from None
        except paramiko.SSHException as exc:
            conn.close()
            text = str(exc)
            if "not found in known_hosts" in text:
                text = f'its host key is not in {known_hosts} (and host_key_policy is "strict")'
            elif "no existing session" in text.lower():  # TCP accepted, the SSH handshake never finished
                text = f"the host accepted the connection but completed no SSH handshake within {self.timeout:g}s"
            elif "banner" in text.lower():
                text = f"no SSH banner within {self.timeout:g}s ({exc})"
            raise self._error(_CANNOT_CONNECT, text, code) from None
        except (OSError, EOFError) as exc:
            conn.close()
            # paramiko's NoValidConnectionsError wraps the socket errors of every address it tried
            exc = next(iter((getattr(exc, "errors", None) or {}).values()), exc)
            raise self._error(_CANNOT_CONNECT, getattr(exc, "strerror", None) or str(exc) or repr(exc),
                              code) from None  # fmt: skip
        _no_delay(conn)
        self._conn = conn
        self.connects += 1
        return conn

    def _drop(self) -> None:
        """Forget the connection (closing what is left of it)."""
        sftp, conn = self._sftp, self._conn
        self._sftp = self._conn = None
        for thing in (sftp, conn):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not fail
                    pass

    def _sftp_client(self, code: str) -> Any:
        conn = self._connection(code)
        if self._sftp is None:
            try:
                self._sftp = conn.client.open_sftp()
                self._sftp.get_channel().settimeout(self.timeout + _SCRIPT_TIMEOUT_SECS)
            except Exception as exc:  # noqa: BLE001 - paramiko raises SSHException, OSError, EOFError
                self._drop()
                raise self._error("cannot open SFTP", str(exc) or repr(exc), code) from None
        return self._sftp

    def _exec(self, argv: list[str], timeout: float, what: str, code: str, *, cwd: str | None = None) -> bytes:
        """Run ``argv`` (each element shlex-quoted) on the host; its stdout, or ``RemoteError`` with ``code``."""
        command = shlex.join(argv)
        if cwd is not None:
            command = f"cd -- {shlex.quote(cwd)} && {command}"
        conn = self._connection(code)
        try:
            chan = conn.client.get_transport().open_session(timeout=self.timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
            chan.shutdown_write()
            out = bytearray()
            while chunk := chan.recv(65536):
                out += chunk
            err = bytearray()
            while chunk := chan.recv_stderr(65536):
                err += chunk
            status = chan.recv_exit_status()
            chan.close()
        except TimeoutError:
            self._drop()  # a half-read channel: start afresh next time
            raise self._error(what, f"no answer within {timeout:g}s", code) from None
        except Exception as exc:  # noqa: BLE001 - paramiko raises SSHException, OSError, EOFError
            self._drop()
            raise self._error(what, str(exc) or repr(exc), code) from None
        if status != 0:
            error = bytes(err).decode("utf-8", "replace").strip()[-300:]
            raise self._error(what, f"exited {status}: {error}", code)
        return bytes(out)

    # -- the Executor interface ------------------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> int:
        """Start the run detached on the host; its pid once the wrapper has recorded it (else ``RemoteError``)."""
        ws = spec.workspace
        meta = f"{ws}/{META}"
        problem = launch_problem(spec)
        if not problem:
            try:
                env_bytes = env_file(spec.env)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            raise RemoteError(f"cannot start a run in {ws} on {self.where}: {problem}", code="launch_failed")
        code = "launch_failed"
        if self._exists(f"{meta}/pid", code):
            self._clear_previous_run(ws)
        self._make_meta_dir(meta, code)
        for name, data in {**meta_files(spec), ENV_FILE: env_bytes}.items():
            self._upload(f"{meta}/{name}", data, code)
        self._exec(["sh", "-c", LOGIN_ENV, LAUNCHER, "fleetctl-launch", *wrapper_argv(spec)],
                   self.start_timeout_secs, f"cannot start {shlex.join(spec.command)} in {ws}", code, cwd=ws)  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_secs
        delay = 0.005
        while True:
            pid = self._read_int(f"{meta}/pid", code)
            if pid is not None:
                return pid
            if time.monotonic() > deadline:
                raise self._error(f"cannot start a run in {ws}",
                                  f"the run wrapper did not start within {self.start_timeout_secs:g}s", code)  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _upload(self, path: str, data: bytes, code: str) -> None:
        """Write ``path`` (mode 600, created empty and restricted before anything is written into it)."""
        sftp = self._sftp_client(code)
        try:
            with sftp.open(path, "wb"):
                pass
            sftp.chmod(path, 0o600)
            sftp.putfo(io.BytesIO(data), path, confirm=True)  # a full disk truncates silently otherwise
        except TimeoutError:
            self._drop()
            raise self._error(f"cannot write {path}", "timed out", code) from None
        except OSError as exc:
            raise self._error(f"cannot write {path}", exc.strerror or str(exc), code) from None
        except Exception as exc:  # noqa: BLE001 - paramiko's SSHException, EOFError
            self._drop()
            raise self._error(f"cannot write {path}", str(exc) or repr(exc), code) from None

    def _make_meta_dir(self, meta: str, code: str) -> None:
        """``mkdir -p META && chmod 700 META`` over SFTP (a few SFTP round trips; an exec would start a shell)."""
        sftp = self._sftp_client(code)
        missing, path = [], meta
        try:
            while path not in ("", "/", "."):
                try:
                    if not stat.S_ISDIR(sftp.stat(path).st_mode):
                        raise self._error(f"cannot create workspace {meta.rsplit('/', 1)[0]}",
                                          f"{path} exists and is not a directory", code)  # fmt: skip
                    break
                except FileNotFoundError:
                    missing.append(path)
                    path = posixpath.dirname(path)
            for directory in reversed(missing):
                try:
                    sftp.mkdir(directory)  # mode 0777 less the server's umask, as mkdir -p
                except OSError:
                    if not stat.S_ISDIR(sftp.stat(directory).st_mode):  # made meanwhile by someone else: fine
                        raise
            sftp.chmod(meta, 0o700)
        except TimeoutError:
            self._drop()
            raise self._error(f"cannot create workspace {meta.rsplit('/', 1)[0]}", "timed out", code) from None
        except OSError as exc:
            raise self._error(f"cannot create workspace {meta.rsplit('/', 1)[0]}", exc.strerror or str(exc),
                              code) from None  # fmt: skip
        except RemoteError:
            raise
        except Exception as exc:  # noqa: BLE001 - paramiko's SSHException, EOFError
            self._drop()
            raise self._error(
                f"cannot create workspace {meta.rsplit('/', 1)[0]}", str(exc) or repr(exc), code
            ) from None

    def _exists(self, path: str, code: str) -> bool:
        sftp = self._sftp_client(code)
        try:
            sftp.stat(path)
            return True
        except OSError:
            return False
        except Exception as exc:  # noqa: BLE001 - paramiko's SSHException, EOFError
            self._drop()
            raise self._error(f"cannot look at {path}", str(exc) or repr(exc), code) from None

    def _read_int(self, path: str, code: str) -> int | None:
        sftp = self._sftp_client(code)
        try:
            with sftp.open(path, "rb") as fh:
                return int(fh.read().decode("ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        except Exception as exc:  # noqa: BLE001 - paramiko's SSHException, EOFError
            self._drop()
            raise self._error(f"cannot read {path}", str(exc) or repr(exc), code) from None

    def _clear_previous_run(self, ws: str) -> None:
        """As ``LocalExecutor``: refuse a workspace whose run still lives, else drop the old run's bookkeeping."""
        try:
            previous = self.probe(ws)
        except RemoteError as exc:
            raise RemoteError(exc.message, code="launch_failed") from None
        if previous.alive:
            raise RemoteError(f"the workspace {ws} on {self.where} already has a live run (pid {previous.pid})",
                              code="launch_failed")  # fmt: skip
        self._exec(["rm", "-f", "--", *(f"{ws}/{META}/{name}" for name in STALE_FILES)], _SCRIPT_TIMEOUT_SECS,
                   f"cannot reuse workspace {ws}", "launch_failed")  # fmt: skip

    def probe(self, workspace: str) -> RunStatus:
        """Run ``PROBE_SCRIPT`` on the host and parse its answer."""
        out = self._exec(["env", "LC_ALL=C", *probe_argv(workspace)], _SCRIPT_TIMEOUT_SECS, f"cannot probe {workspace}",
                         "probe_failed")  # fmt: skip
        try:
            return parse_probe(out)
        except ValueError as exc:
            raise self._error(f"cannot probe {workspace}", str(exc), "probe_failed") from None

    def kill(self, workspace: str, grace_secs: float = DEFAULT_KILL_GRACE_SECS) -> bool:
        """Run ``KILL_SCRIPT`` on the host (TERM the group, KILL it after ``grace_secs``); True if it stopped a run."""
        out = self._exec(["env", "LC_ALL=C", *kill_argv(workspace, grace_secs)], _SCRIPT_TIMEOUT_SECS + grace_secs,
                         f"cannot kill the run in {workspace}", "kill_failed")  # fmt: skip
        try:
            return parse_kill(out)[0]
        except ValueError as exc:
            raise self._error(f"cannot kill the run in {workspace}", str(exc), "kill_failed") from None

    def remove(self, workspace: str) -> bool:
        """Run ``REMOVE_SCRIPT`` on the host: True if the workspace is gone, False if its run still lives (kept)."""
        out = self._exec(["env", "LC_ALL=C", *remove_argv(workspace)], REMOVE_TIMEOUT_SECS,
                         f"cannot remove {workspace}", "remove_failed")  # fmt: skip
        try:
            return parse_remove(out)
        except ValueError as exc:
            raise self._error(f"cannot remove {workspace}", str(exc), "remove_failed") from None

    def check(self) -> None:
        """Log in (or reuse the connection) and run ``true``: ``HostUnreachable`` / ``RemoteError`` if not."""
        self._exec(["true"], self.timeout, "cannot run a command", "probe_failed")

    def diagnose(self, work_dir: str, commands: list[str]) -> dict[str, Any]:
        """What ``fleetctl doctor`` asks of the host, in one exec after the login (which raises
        ``HostUnreachable`` with the reason): ``{"writable": bool, "free_bytes": int | None, "time": float,
        "missing": [command, ...], "login_secs": float}``. Changes nothing on the host: work_dir counts as
        writable if it is a writable directory, or does not exist yet under a writable parent."""
        started = time.monotonic()
        self._connection("doctor")
        login_secs = time.monotonic() - started
        argv = ["sh", "-c", DIAGNOSE, "fleetctl-doctor", work_dir, *commands]
        out = self._exec(argv, self.timeout, "cannot run the checks", "doctor").decode("utf-8", "replace")
        now = time.time()
        found: dict[str, Any] = {"writable": False, "free_bytes": None, "time": None, "missing": [],
                                 "login_secs": login_secs, "local_time": now}  # fmt: skip
        for line in out.splitlines():
            key, _, rest = line.partition(" ")
            if key == "writable":
                found["writable"] = rest == "1"
            elif key == "free_kb" and rest.isdigit():
                found["free_bytes"] = int(rest) * 1024
            elif key == "time" and rest.isdigit():
                found["time"] = float(rest)
            elif key == "missing" and rest:
                found["missing"].append(rest)
        return found

    def close(self) -> None:
        """Close the connection (if one is open); idempotent."""
        self._drop()
        self.closed = True


def _accept_new_policy(paramiko: Any, known_hosts: str) -> Any:
    """A policy that accepts a host not yet in ``known_hosts`` and appends its key there (0600).

    Only unknown hosts reach a policy: a known host with another key is ``BadHostKeyException`` first.
    """

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            directory = os.path.dirname(known_hosts)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    return AcceptNew()
