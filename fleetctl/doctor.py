"""``fleetctl doctor``: every part of a fleet checked at once, each with what to do about it.

A check is ``ok``, ``warn`` or ``fail``, with a one-line ``detail`` and, unless it is ok, a ``hint`` that
says what to do (and where in the docs). Checks belong to a part, which decides the exit code of a failure:
the configuration (2), this machine (the database, disks, local work directories: 1), or a remote part
(serve over HTTP, Forgejo, the SSH hosts, Matrix: 5). ``Report.exit_code`` takes the worst: a config failure
first, then a local one, then a remote one; warnings exit 0, or 1 with ``strict``.

Doctor changes nothing: the database is opened without migrating or creating it, a work directory is
tested with ``[ -w ]`` rather than written, Forgejo and Matrix are only read. Every remote part runs in its
own thread with short network timeouts, and the whole run is bounded by ``TOTAL_SECS``: a part that has
not answered by then is reported as failing, so doctor answers within about ten seconds with everything
down.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleetctl.config import Config, HostConfig, check_config, secret_source, serves_webhooks
from fleetctl.errors import ConfigError, FleetError

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
CONFIG, LOCAL, REMOTE = "config", "local", "remote"

TOTAL_SECS = 9.0
"""The whole run's bound: remote parts still unanswered by then fail."""
CALL_SECS = 3.0
"""One network call's bound (connect and read); SSH logins get it as their connect timeout."""
CLOCK_SKEW_SECS = 5.0
"""More skew than this between this machine and Forgejo or a host is a warning (leases and timeouts use it)."""
MIN_FREE_BYTES = 1 << 30
"""Less free space than this (1 GiB) beside the database or in a work directory is a warning; a twentieth
of it a failure."""
SYNC_TIMER = "fleetctl-sync.timer"
CHECK_NAMES = ("config", "database", "database.permissions", "database.disk", "database.check", "serve", "forgejo",
               "forgejo.token", "forgejo.sync_timer", "clock:forgejo", "matrix", "matrix.room")  # fmt: skip
"""The checks whose name is fixed; the others name their host or repository (``ssh:ID``, ``forgejo.repo:O/N``)."""


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""
    part: str = LOCAL

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    def exit_code(self, strict: bool = False) -> int:
        failed = {c.part for c in self.checks if c.status == FAIL}
        if CONFIG in failed:
            return 2
        if LOCAL in failed:
            return 1
        if REMOTE in failed:
            return 5
        return 1 if strict and self.status == WARN else 0

    def to_json(self) -> dict:
        return {"checks": [c.to_json() for c in self.checks], "status": self.status}


def run(config_path: str | Path | None, *, deep: bool = False, env: dict[str, str] | None = None) -> Report:
    """Run every check that applies to the configuration at ``config_path`` (search order when None)."""
    from fleetctl.config import load_config

    deadline = time.monotonic() + TOTAL_SECS
    env = dict(os.environ) if env is None else env
    try:
        cfg = load_config(config_path, env=env)
    except ConfigError as exc:
        return Report([Check("config", FAIL, str(exc), "fix the file, then: fleetctl config check", CONFIG)])
    report = Report()
    remote = _start_remote(cfg, env)
    report.checks.append(_config(cfg))
    report.checks += _database(cfg, deep)
    for host in cfg.hosts:
        if host.is_local:
            report.checks += _local_host(cfg, host)
    if cfg.forgejo.url:
        report.checks.append(_sync_timer(env))
    for name, thread, results in remote:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            report.checks.append(Check(name, FAIL, f"no answer within {TOTAL_SECS:g}s",
                                       "the network path or the service hangs: check it by hand", REMOTE))  # fmt: skip
        else:
            report.checks += results
    return report


# ------------------------------------------------------------------------------------- local parts


def _config(cfg: Config) -> Check:
    where = str(cfg.path) if cfg.path else "embedded default"
    try:
        warnings = check_config(cfg, serving_webhooks=serves_webhooks(cfg), check_files=True)
    except ConfigError as exc:
        return Check("config", FAIL, str(exc), "fix the file, then: fleetctl config check", CONFIG)
    if warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        return Check("config", WARN, warnings[0] + more, "see every warning with: fleetctl config check", CONFIG)
    return Check("config", OK, where)


def _database(cfg: Config, deep: bool) -> list[Check]:
    from fleetctl.store import Store

    path = cfg.orchestrator.db_path
    disk = _disk("database.disk", _existing(path.parent))
    if not path.exists():
        return [Check("database", FAIL, f"no database at {path}", "create it as the user that runs fleetctl: "
                      "fleetctl db migrate" + (f" --config {cfg.path}" if cfg.path else "")), disk]  # fmt: skip
    if path.is_dir():
        return [Check("database", FAIL, f"the database path {path} is a directory", "point orchestrator.db_path "
                      "(or FLEET_DB_PATH) at a file, e.g. /var/lib/fleetctl/fleet.db"), disk]  # fmt: skip
    permissions = _permissions(path)
    if os.geteuid() == 0 and path.stat().st_uid != 0:  # opening it would leave root-owned -wal/-shm files
        return [Check("database", WARN, f"{path} belongs to uid {path.stat().st_uid}: not opened as root",
                      "run doctor as that user: sudo -u fleetctl fleetctl doctor --config …"), permissions, disk]  # fmt: skip
    try:
        with Store.open(path, migrate=False, create=False) as store:
            pending = store.pending_migrations()
            report = store.check() if deep else None
    except FleetError as exc:
        hint = ("install the fleetctl version that wrote it (or newer): pip install -U fleetctl"
                if exc.code == "schema_too_new" else "see docs/operations.md, Troubleshooting")  # fmt: skip
        return [Check("database", FAIL, str(exc), hint), permissions, disk]
    if pending:
        first = Check("database", WARN, f"{path}: {len(pending)} migration(s) pending: {', '.join(pending)}",
                      "the next command applies them; or now: fleetctl db migrate")  # fmt: skip
    else:
        first = Check("database", OK, f"{path}, schema current")
    checks = [first, permissions, disk]
    if report is not None:
        if report.ok:
            checks.append(Check("database.check", OK, f"{report.events} events replay into the stored projections"))
        else:
            problem = (report.problems + [i for i in report.integrity if i != "ok"])[0]
            checks.append(Check("database.check", FAIL, problem, "details: fleetctl db check; restore a backup if "
                                "it is corruption (docs/operations.md, Backup and restore)"))  # fmt: skip
    return checks


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _permissions(db: Path) -> Check:
    """The database, its WAL and shared-memory files and its directory: writable by their owner, owned by
    this user, and private."""
    me = os.geteuid()
    read_only, foreign, loose_files = [], [], []
    loose_dir = None
    for p in (db.parent, db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        try:
            st = p.stat()
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o200:
            read_only.append(f"{p} (mode {mode:04o})")
        if st.st_uid != me:
            foreign.append(f"{p} (uid {st.st_uid})")
        if p == db.parent:
            loose_dir = f"{p} (mode {mode:04o})" if mode & 0o022 else None
        elif mode & 0o077:
            loose_files.append(f"{p} (mode {mode:04o})")
    if read_only:
        return Check("database.permissions", FAIL, "read-only: " + ", ".join(read_only),
                     "chmod u+w them, as their owner (a file root made: chown it to the user that runs fleetctl)")  # fmt: skip
    if foreign:
        return Check("database.permissions", FAIL if me != 0 else WARN,
                     f"not owned by this user (uid {me}): " + ", ".join(foreign),
                     "run fleetctl as the user that owns the database (sudo -u fleetctl …); a file that root "
                     "created: chown fleetctl:fleetctl it")  # fmt: skip
    if loose_dir:
        return Check("database.permissions", WARN, f"the database's directory is writable by others: {loose_dir}",
                     "keep the database in a directory of its own, mode 0700 (like /var/lib/fleetctl), not a "
                     "shared one such as /tmp")  # fmt: skip
    if loose_files:
        return Check("database.permissions", WARN, "readable by others: " + ", ".join(loose_files),
                     f"chmod 600 {db} (and its -wal and -shm files)")  # fmt: skip
    return Check("database.permissions", OK, f"{db} and its directory are private to uid {me}")


def _disk(name: str, path: Path, part: str = LOCAL) -> Check:
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return Check(name, FAIL, f"cannot stat {path}: {exc.strerror}", f"does {path} exist?", part)
    return _free(name, path, free, part)


def _free(name: str, where: Any, free: int | None, part: str) -> Check:
    if free is None:
        return Check(name, WARN, f"free space in {where} unknown", "check it with: df -h", part)
    text = f"{free / (1 << 30):.1f} GiB free in {where}"
    if free < MIN_FREE_BYTES // 20:
        return Check(name, FAIL, text, "free space there: a full disk stops every write", part)
    if free < MIN_FREE_BYTES:
        return Check(name, WARN, text, "free space there soon (below 1 GiB)", part)
    return Check(name, OK, text, part=part)


def _commands(cfg: Config, host: HostConfig) -> list[str]:
    """The program each of the host's agent types runs (its command's first word)."""
    names = []
    for spec in host.agents:
        agent_type = cfg.agent_types.get(spec.agent_type)
        if agent_type and agent_type.command:
            word = sys.executable if agent_type.command[0] == "{python}" else agent_type.command[0]
            if word not in names:
                names.append(word)
    return names


def _local_host(cfg: Config, host: HostConfig) -> list[Check]:
    name = f"host:{host.host_id}"
    work = Path(host.work_dir)
    base = work if work.is_dir() else _existing(work.parent)
    checks = []
    if os.access(base, os.W_OK | os.X_OK):
        checks.append(
            Check(
                f"{name}.work_dir", OK, f"{work} is writable" + ("" if work.is_dir() else " (created at the first run)")
            )
        )
    else:
        checks.append(Check(f"{name}.work_dir", FAIL, f"{work} is not writable by uid {os.geteuid()}",
                            f"install -d -o USER -m 0700 {work} (the user that runs dispatch)"))  # fmt: skip
    missing = [c for c in _commands(cfg, host) if shutil.which(c) is None]
    if missing:
        checks.append(Check(f"{name}.commands", FAIL, f"not found on PATH: {', '.join(missing)}",
                            "install the agent CLI for the user that runs dispatch, or fix agent_types.*.command"))  # fmt: skip
    else:
        checks.append(Check(f"{name}.commands", OK, "every agent type's command is on PATH"))
    checks.append(_disk(f"{name}.disk", base))
    return checks


# ------------------------------------------------------------------------------------ remote parts


def _start_remote(cfg: Config, env: dict[str, str]) -> list[tuple[str, threading.Thread, list[Check]]]:
    """One daemon thread per remote part; each appends its checks to its own list."""
    parts: list[tuple[str, Callable[[], list[Check]]]] = [("serve", lambda: _serve(cfg))]
    if cfg.forgejo.url:
        parts.append(("forgejo", lambda: _forgejo(cfg)))
    for host in cfg.hosts:
        if not host.is_local:
            parts.append((f"ssh:{host.host_id}", lambda h=host: _ssh(cfg, h)))
    if cfg.matrix.enabled:
        parts.append(("matrix", lambda: _matrix(cfg)))
    started = []
    for name, fn in parts:
        results: list[Check] = []

        def target(fn: Callable[[], list[Check]] = fn, results: list[Check] = results, name: str = name) -> None:
            try:
                results.extend(fn())
            except Exception as exc:  # noqa: BLE001 - a check that breaks is a failing check, never a traceback
                results.append(Check(name, FAIL, f"{type(exc).__name__}: {exc}", "report this as a bug", REMOTE))

        thread = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
        thread.start()
        started.append((name, thread, results))
    return started


def _serve(cfg: Config) -> list[Check]:
    needed = serves_webhooks(cfg) or bool(secret_source(cfg.orchestrator, "http_pull_token"))
    if cfg.server.public_url:
        url = cfg.server.public_url.rstrip("/") + "/healthz"
    else:
        host = cfg.server.bind if cfg.server.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.server.port}/healthz"
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    started = time.monotonic()
    try:
        conn = conn_cls(parts.hostname or "", parts.port, timeout=CALL_SECS)
        conn.request("GET", parts.path or "/healthz", headers={"User-Agent": "fleetctl-doctor"})
        status = conn.getresponse().status
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        hint = ("start it: systemctl start fleetctl-serve (journalctl -u fleetctl-serve says why it stopped)"
                if needed else "only pull agents and Forgejo webhooks need serve; start it when you add them")  # fmt: skip
        return [Check("serve", FAIL if needed else WARN, f"{url}: {why}", hint, REMOTE)]
    ms = (time.monotonic() - started) * 1000
    if status != 200:
        return [Check("serve", FAIL, f"{url} answered {status}", "is something else on that address? check "
                      "server.bind, server.port and the reverse proxy (docs/deployment.md)", REMOTE)]  # fmt: skip
    return [Check("serve", OK, f"{url} answered in {ms:.0f} ms", part=REMOTE)]


def _skew(name: str, remote_time: float | None, local_time: float, what: str) -> Check:
    if remote_time is None:
        return Check(name, WARN, f"{what} sent no time to compare with", "check both clocks by hand (date)", REMOTE)
    skew = local_time - remote_time
    text = f"this machine is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} {what}"
    if abs(skew) > CLOCK_SKEW_SECS:
        return Check(name, WARN, text, "leases, heartbeats and timeouts depend on the clocks: enable NTP on both "
                     "(timedatectl set-ntp true)", REMOTE)  # fmt: skip
    return Check(name, OK, text, part=REMOTE)


def _secret(section: Any, key: str, name: str, credential: str, variable: str) -> tuple[str, Check | None]:
    """The secret, or the failing check that says why this process does not have it and how to give it."""
    hint = (f"a systemd credential is visible only inside its unit: run doctor with it (systemd-run … -p "
            f"LoadCredential={credential}:/etc/fleetctl/credentials/{credential}, docs/operations.md), or set {variable}")  # fmt: skip
    try:
        value = getattr(section, key)
    except ConfigError as exc:
        return "", Check(name, FAIL, str(exc), hint, REMOTE)
    if not value:
        return "", Check(name, FAIL, f"no {key} is set (nor {key}_file, nor {variable})", hint, REMOTE)
    return value, None


def _forgejo(cfg: Config) -> list[Check]:
    from fleetctl.forgejo.client import ForgejoClient, ForgejoError

    fj = cfg.forgejo
    token, problem = _secret(fj, "token", "forgejo.token", "forgejo-token", "FLEET_FORGEJO_TOKEN")
    if problem:
        return [problem]
    checks: list[Check] = []
    with ForgejoClient(fj.url or "", token, timeout=CALL_SECS, connect_timeout=CALL_SECS, retries=0) as client:
        try:
            version = client.version()
            checks.append(Check("forgejo", OK, f"{fj.url}: Forgejo {version}", part=REMOTE))
            sent = time.time()
            me = client.whoami()
        except ForgejoError as exc:
            if exc.status == 401:
                checks.append(Check("forgejo", OK, f"{fj.url} answers", part=REMOTE))
                checks.append(Check("forgejo.token", FAIL, "Forgejo refused the token (401)", "create a new token "
                                    "for the bot (docs/forgejo.md) and write it to the forgejo-token credential", REMOTE))  # fmt: skip
            else:
                checks.append(Check("forgejo", FAIL, str(exc), f"is Forgejo up, and is {fj.url} right? "
                                    "(curl -sS URL/api/v1/version from this machine)", REMOTE))  # fmt: skip
            return checks
        login = me.get("login", "?")
        if fj.bot_login and fj.bot_login.lower() != str(login).lower():
            checks.append(Check("forgejo.token", WARN, f"the token is {login}'s, but forgejo.bot_login is "
                                f"{fj.bot_login}", "set forgejo.bot_login to the token's user (its own comments "
                                "are recognised by it)", REMOTE))  # fmt: skip
        else:
            checks.append(Check("forgejo.token", OK, f"valid, user {login}", part=REMOTE))
        checks.append(_skew("clock:forgejo", _http_date(client.last_date), (sent + time.time()) / 2, "Forgejo"))
        for repo in fj.repositories:
            checks += _forgejo_repo(cfg, client, repo, login)
    return checks


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _forgejo_repo(cfg: Config, client: Any, repo: str, login: str) -> list[Check]:
    from fleetctl.forgejo.client import ForgejoError

    name = f"forgejo.repo:{repo}"
    try:
        doc = client.get_repo(repo)
    except ForgejoError as exc:
        if exc.status == 404:
            return [Check(name, FAIL, f"{repo} does not exist or {login} cannot see it", "check the name in "
                          f"forgejo.repositories, and add {login} as a collaborator (write)", REMOTE)]  # fmt: skip
        if exc.status == 403:
            return [Check(name, FAIL, f"the token may not read {repo}: {exc}", "give the token the repository "
                          "scope (write:repository) in the bot's Settings → Applications", REMOTE)]  # fmt: skip
        return [Check(name, FAIL, str(exc), "retry; if it persists, look at Forgejo's log", REMOTE)]
    checks = []
    permissions = doc.get("permissions")
    if not (isinstance(permissions, dict) and permissions.get("push")):
        checks.append(Check(name, FAIL, f"{login} may read {repo} but not write to it",
                            f"add {login} as a collaborator with write access (labels, comments)", REMOTE))  # fmt: skip
    try:
        next(iter(client.list_issues(repo, limit=1)), None)
    except ForgejoError as exc:
        hint = ("give the token the issue scope (write:issue): comments and labels need it"
                if exc.status == 403 else "retry; if it persists, look at Forgejo's log")  # fmt: skip
        checks.append(Check(name, FAIL, f"cannot list the issues of {repo}: {exc}", hint, REMOTE))
    if not checks:
        checks.append(Check(name, OK, f"visible, writable by {login}; the token reads its issues", part=REMOTE))
    checks.append(_webhook(cfg, client, repo, login))
    return checks


def _webhook(cfg: Config, client: Any, repo: str, login: str) -> Check:
    from fleetctl.forgejo.client import ForgejoError

    name = f"forgejo.webhook:{repo}"
    try:
        hooks = client.list_hooks(repo)
    except ForgejoError as exc:
        if exc.status in (403, 404):
            return Check(name, WARN, f"{login} may not list the webhooks of {repo} (repository admins only)",
                         "check it in the repository's Settings → Webhooks (docs/forgejo.md), or make the bot "
                         "an admin there", REMOTE)  # fmt: skip
        return Check(name, FAIL, str(exc), "retry; if it persists, look at Forgejo's log", REMOTE)
    public = (cfg.server.public_url or "").rstrip("/")
    for hook in hooks:
        config = hook.get("config") if isinstance(hook.get("config"), dict) else {}
        url = str(hook.get("url") or config.get("url") or "")
        if url.rstrip("/").endswith("/api/v1/webhooks/forgejo") and (not public or url.startswith(public)):
            if not hook.get("active", True):
                return Check(name, FAIL, f"the webhook to {url} is inactive", "activate it in the repository's "
                             "Settings → Webhooks", REMOTE)  # fmt: skip
            return Check(name, OK, f"delivers to {url}", part=REMOTE)
    target = f"{public or 'https://YOUR-SERVE'}/api/v1/webhooks/forgejo"
    return Check(name, FAIL, f"no active webhook of {repo} points at {target}", "add one (docs/forgejo.md, "
                 "Webhooks): until then only fleetctl sync finds new issues", REMOTE)  # fmt: skip


def _sync_timer(env: dict[str, str]) -> Check:
    systemctl = shutil.which("systemctl", path=env.get("PATH"))
    hint = "systemctl enable --now fleetctl-sync.timer (or run fleetctl sync from cron every few minutes)"
    if systemctl is None:
        return Check("forgejo.sync_timer", WARN, "no systemctl here: cannot tell whether sync runs", hint, REMOTE)
    try:
        done = subprocess.run([systemctl, "is-active", SYNC_TIMER], capture_output=True, text=True, timeout=CALL_SECS,
                              stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("forgejo.sync_timer", WARN, f"systemctl is-active {SYNC_TIMER}: {exc}", hint, REMOTE)
    state = done.stdout.strip() or done.stderr.strip() or f"exit {done.returncode}"
    if state == "active":
        return Check("forgejo.sync_timer", OK, f"{SYNC_TIMER} is active", part=REMOTE)
    return Check("forgejo.sync_timer", WARN, f"{SYNC_TIMER} is {state}: webhooks that Forgejo failed to deliver "
                 "are never caught up", hint, REMOTE)  # fmt: skip


def _ssh(cfg: Config, host: HostConfig) -> list[Check]:
    from fleetctl.errors import RemoteError
    from fleetctl.executors.ssh import SshExecutor

    name = f"ssh:{host.host_id}"
    ex = SshExecutor(replace(host, connect_timeout_secs=min(float(host.connect_timeout_secs), CALL_SECS)))
    try:
        found = ex.diagnose(host.work_dir, _commands(cfg, host))
    except RemoteError as exc:
        return [Check(name, FAIL, str(exc), _ssh_hint(str(exc), host), REMOTE)]
    finally:
        ex.close()
    checks = [Check(name, OK, f"logged in to {ex.where} in {found['login_secs'] * 1000:.0f} ms", part=REMOTE)]
    if found["writable"]:
        checks.append(Check(f"{name}.work_dir", OK, f"{host.work_dir} is writable", part=REMOTE))
    else:
        checks.append(Check(f"{name}.work_dir", FAIL, f"{host.work_dir} is not writable by {host.ssh_user or 'the login'}",
                            f"on the host: install -d -o {host.ssh_user or 'USER'} -m 0700 {host.work_dir}", REMOTE))  # fmt: skip
    if found["missing"]:
        checks.append(Check(f"{name}.commands", FAIL, f"not found on the login's PATH: {', '.join(found['missing'])}",
                            "install the agent CLI for that user, on sshd's PATH (docs/ssh-hosts.md, step 5)", REMOTE))  # fmt: skip
    else:
        checks.append(Check(f"{name}.commands", OK, "every agent type's command is on the login's PATH", part=REMOTE))
    checks.append(_free(f"{name}.disk", f"{host.host_id}:{host.work_dir}", found["free_bytes"], REMOTE))
    checks.append(_skew(f"clock:ssh:{host.host_id}", found["time"], found["local_time"], f"host {host.host_id}"))
    return checks


def _ssh_hint(message: str, host: HostConfig) -> str:
    known = host.known_hosts or "~/.ssh/known_hosts"
    port = f"-p {host.ssh_port} " if host.ssh_port != 22 else ""
    if "host key" in message and "not in" in message:
        return (f"the host is not in {known}: ssh-keyscan {port}{host.hostname} >> {known}, after checking the "
                "fingerprint (docs/ssh-hosts.md, step 3)")  # fmt: skip
    if "does not match" in message:
        return f"the host key changed: if that was expected, replace its line in {known} (docs/ssh-hosts.md)"
    if "authentication failed" in message or "key file" in message:
        return (f"add the public key of {host.ssh_key_path} to ~{host.ssh_user or 'USER'}/.ssh/authorized_keys on "
                "the host (docs/ssh-hosts.md, step 2)")  # fmt: skip
    return f"is sshd running on {host.hostname}:{host.ssh_port}, and reachable from here? (ssh {port}{host.hostname})"


def _matrix(cfg: Config) -> list[Check]:
    from fleetctl.matrix.client import MatrixClient, MatrixError

    mx = cfg.matrix
    token, problem = _secret(mx, "access_token", "matrix", "matrix-token", "FLEET_MATRIX_TOKEN")
    if problem:
        return [problem]
    checks = []
    with MatrixClient(mx.homeserver or "", token, timeout=CALL_SECS) as client:
        try:
            me = client.whoami().get("user_id", "?")
        except MatrixError as exc:
            hint = ("log the bot in again and write the new access token to the matrix-token credential "
                    "(docs/matrix.md)" if exc.status == 401 else f"is {mx.homeserver} right and up?")  # fmt: skip
            return [Check("matrix", FAIL, str(exc), hint, REMOTE)]
        checks.append(Check("matrix", OK, f"{mx.homeserver}: token valid, user {me}", part=REMOTE))
        try:
            room = client.resolve_room(mx.room_id or "")
            joined = room in client.joined_rooms()
        except MatrixError as exc:
            return [*checks, Check("matrix.room", FAIL, str(exc), "check matrix.room_id", REMOTE)]
    if not joined:
        checks.append(Check("matrix.room", FAIL, f"{me} has not joined {mx.room_id}", "invite the bot, then join "
                            "as the bot (docs/matrix.md, step 3); fleetctl notify test checks it", REMOTE))  # fmt: skip
    else:
        checks.append(Check("matrix.room", OK, f"{me} is in {mx.room_id}", part=REMOTE))
    return checks
