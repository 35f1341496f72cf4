"""``fleetctl doctor`` against a working fleet — a live ``fleetctl serve``, the fake Forgejo, a real sshd and a
real Synapse — and against each broken part in turn: that part fails with its hint and the documented exit
code, and nothing else does. Secrets come in as systemd credentials do (``${CREDENTIALS_DIRECTORY}/NAME``).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import SSH_TIMEOUT, LiveServer, other_key, stop_cleanly
from synapse_server import free_port

from fleetctl import doctor
from fleetctl.config import render_toml

REPO = "acme/widgets"
SECRET = "doctor-webhook-secret"


class Fleet:
    """Everything a working fleet has, and the config that names it (``write(**changes)`` for a broken one)."""

    def __init__(self, tmp: Path, forgejo, sshd, room) -> None:
        self.tmp, self.forgejo, self.sshd, self.room = tmp, forgejo, sshd, room
        self.creds = tmp / "credentials"
        self.creds.mkdir()
        for name, value in (("forgejo-token", forgejo.bot_token), ("webhook-secret", SECRET),
                            ("matrix-token", room.bot), ("admin-token", "doctor-admin-token-0123456789")):  # fmt: skip
            (self.creds / name).write_text(value + "\n")
            (self.creds / name).chmod(0o600)
        self.port = free_port()
        self.db = tmp / "state" / "fleet.db"
        self.bin = tmp / "bin"  # a systemctl that says the sync timer is active
        self.bin.mkdir()
        (self.bin / "systemctl").write_text('#!/bin/sh\n[ "$1 $2" = "is-active fleetctl-sync.timer" ] && echo active\n')
        (self.bin / "systemctl").chmod(0o755)
        self.doc = {
            "server": {"bind": "127.0.0.1", "port": self.port, "public_url": f"http://127.0.0.1:{self.port}",
                       "admin_token_file": "${CREDENTIALS_DIRECTORY}/admin-token"},
            "forgejo": {"url": forgejo.url, "token_file": "${CREDENTIALS_DIRECTORY}/forgejo-token",
                        "webhook_secret_file": "${CREDENTIALS_DIRECTORY}/webhook-secret", "repositories": [REPO]},
            "orchestrator": {"db_path": str(self.db)},
            "hosts": [{"host_id": "box-1", "hostname": sshd.host, "ssh_user": sshd.user, "ssh_port": sshd.port,
                       "ssh_key_path": sshd.key_path, "known_hosts": sshd.known_hosts,
                       "connect_timeout_secs": SSH_TIMEOUT, "work_dir": str(tmp / "remote-work"),
                       "agents": [{"agent_type": "shell", "max_concurrency": 1}]}],
            "agent_types": {"shell": {"command": ["sh", "-c", "cat"], "prompt": "stdin"}},
            "matrix": {"homeserver": room.synapse.url, "access_token_file": "${CREDENTIALS_DIRECTORY}/matrix-token",
                       "room_id": room.id},
        }  # fmt: skip
        self.config = self.write()

    def write(self, name: str = "config.toml", **sections) -> Path:
        doc = json.loads(json.dumps(self.doc))
        for section, changes in sections.items():
            if section == "hosts":
                doc["hosts"][0].update(changes)
            elif section == "agent_types":
                doc["agent_types"]["shell"].update(changes)
            else:
                doc[section].update(changes)
        path = self.tmp / name
        path.write_text(render_toml(doc))
        path.chmod(0o600)
        return path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CREDENTIALS_DIRECTORY": str(self.creds), "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def run(self, config: Path | None = None, **kwargs) -> doctor.Report:
        return doctor.run(config or self.config, env=self.env, **kwargs)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, sshd, synapse):
    from fakes.forgejo import FakeForgejo
    from test_matrix import make_room

    tmp = tmp_path_factory.mktemp("doctor")
    fake = FakeForgejo().start()
    fake.add_repo(REPO)
    fake.set_permission(REPO, "fleet-bot", "admin")  # may list the repository's webhooks
    fleet = Fleet(tmp, fake, sshd, make_room(synapse))
    fake.add_hook(REPO, f"http://127.0.0.1:{fleet.port}/api/v1/webhooks/forgejo")
    server = LiveServer(tmp, config=fleet.config)
    os.environ["CREDENTIALS_DIRECTORY"] = str(fleet.creds)  # the serve child's credentials, as its unit has
    try:
        server.start(port=fleet.port)
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    try:
        yield fleet
    finally:
        stop_cleanly(server)
        fake.stop()


def by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


def failing(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks if c.status == doctor.FAIL}


def test_a_working_fleet_is_all_ok(fleet):
    report = fleet.run(deep=True)
    assert report.status == doctor.OK, [c for c in report.checks if c.status != doctor.OK]
    names = set(by_name(report))
    assert {"config", "database", "database.permissions", "database.disk", "database.check", "serve", "forgejo",
            "forgejo.token", "clock:forgejo", f"forgejo.repo:{REPO}", f"forgejo.webhook:{REPO}",
            "forgejo.sync_timer", "ssh:box-1", "ssh:box-1.work_dir", "ssh:box-1.commands", "ssh:box-1.disk",
            "clock:ssh:box-1", "matrix", "matrix.room"} <= names  # fmt: skip
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 0


def test_the_cli_prints_a_line_per_check_and_json(fleet):
    base = [sys.executable, "-m", "fleetctl", "doctor", "--config", str(fleet.config)]
    done = subprocess.run(base, capture_output=True, text=True, env=fleet.env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("ok    ") for line in lines), done.stdout
    done = subprocess.run([*base, "--json"], capture_output=True, text=True, env=fleet.env, timeout=60)
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and done.returncode == 0
    assert all(set(c) == {"name", "status", "detail", "hint"} for c in doc["checks"])


def only_failure(report: doctor.Report, name: str, *, exit_code: int, says: str, hint: str) -> doctor.Check:
    """``name`` is the one failing check, its detail says ``says``, its hint ``hint``; the exit code is right."""
    fails = failing(report)
    assert set(fails) == {name}, {n: c.detail for n, c in fails.items()}
    check = fails[name]
    assert says in check.detail, check
    assert hint in check.hint, check
    assert report.exit_code() == exit_code
    return check


def test_wrong_forgejo_token(fleet):
    (fleet.creds / "wrong").write_text("0123456789abcdef\n")
    config = fleet.write("wrong-token.toml", forgejo={"token_file": "${CREDENTIALS_DIRECTORY}/wrong"})
    only_failure(fleet.run(config), "forgejo.token", exit_code=5, says="refused the token (401)",
                 hint="create a new token")  # fmt: skip


def test_secrets_outside_their_unit_are_named_with_the_way_to_get_them(fleet):
    """An operator's shell has no $CREDENTIALS_DIRECTORY: the config is fine (a warning), the parts that need
    a secret fail and say how to run doctor with the unit's credentials."""
    env = {k: v for k, v in fleet.env.items() if k != "CREDENTIALS_DIRECTORY"}
    report = doctor.run(fleet.config, env=env)
    checks = by_name(report)
    assert checks["config"].status == doctor.WARN and "CREDENTIALS_DIRECTORY" in checks["config"].detail
    assert set(failing(report)) == {"forgejo.token", "matrix"}
    for name in ("forgejo.token", "matrix"):
        assert "$CREDENTIALS_DIRECTORY, which is not set" in checks[name].detail
        assert "LoadCredential" in checks[name].hint or "FLEET_" in checks[name].hint
    assert report.exit_code() == 5


def test_a_credential_file_that_is_missing_is_a_config_error(fleet):
    config = fleet.write("no-token.toml", forgejo={"token_file": "${CREDENTIALS_DIRECTORY}/missing-token"})
    report = fleet.run(config)
    assert set(failing(report)) == {"config", "forgejo.token"}
    assert "missing-token: No such file" in by_name(report)["forgejo.token"].detail
    assert report.exit_code() == 2


def test_forgejo_down(fleet):
    fleet.forgejo.down()
    try:
        report = fleet.run()
    finally:
        fleet.forgejo.up()
    only_failure(report, "forgejo", exit_code=5, says="cannot reach Forgejo", hint="is Forgejo up")


def test_repository_missing(fleet):
    config = fleet.write("missing-repo.toml", forgejo={"repositories": [REPO, "acme/nope"]})
    report = fleet.run(config)
    only_failure(report, "forgejo.repo:acme/nope", exit_code=5, says="does not exist or fleet-bot cannot see it",
                 hint="forgejo.repositories")  # fmt: skip
    assert by_name(report)[f"forgejo.repo:{REPO}"].status == doctor.OK


def test_no_webhook_points_at_serve(fleet):
    config = fleet.write("elsewhere.toml", server={"public_url": "https://fleet.example.org"})
    report = fleet.run(config)
    fails = failing(report)  # serve is not at that URL either
    assert fails[f"forgejo.webhook:{REPO}"].detail.startswith(f"no active webhook of {REPO} points at "
                                                             "https://fleet.example.org/api/v1/webhooks/forgejo")  # fmt: skip
    assert "docs/forgejo.md" in fails[f"forgejo.webhook:{REPO}"].hint


def test_sshd_stopped(fleet):
    closed = free_port()  # nothing listens there: what a stopped sshd looks like
    config = fleet.write("sshd-stopped.toml", hosts={"ssh_port": closed})
    only_failure(fleet.run(config), "ssh:box-1", exit_code=5, says="cannot connect", hint="is sshd running")


def test_wrong_key(fleet, tmp_path):
    config = fleet.write("wrong-key.toml", hosts={"ssh_key_path": other_key(tmp_path, "stranger")})
    only_failure(fleet.run(config), "ssh:box-1", exit_code=5, says="authentication failed",
                 hint="authorized_keys")  # fmt: skip


def test_unknown_host_key(fleet, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = fleet.write("unknown-host.toml", hosts={"known_hosts": str(empty)})
    only_failure(fleet.run(config), "ssh:box-1", exit_code=5, says="host key is not in", hint="ssh-keyscan")


def test_agent_command_missing_on_the_host(fleet):
    config = fleet.write("no-agent.toml", agent_types={"command": ["no-such-agent-cli", "exec"]})
    only_failure(fleet.run(config), "ssh:box-1.commands", exit_code=5, says="no-such-agent-cli",
                 hint="install the agent CLI")  # fmt: skip


def test_matrix_token_wrong(fleet):
    (fleet.creds / "wrong-matrix").write_text("syt_not_a_real_token\n")
    config = fleet.write("wrong-matrix.toml", matrix={"access_token_file": "${CREDENTIALS_DIRECTORY}/wrong-matrix"})
    only_failure(fleet.run(config), "matrix", exit_code=5, says="401", hint="access token")


def test_bot_not_in_the_room(fleet):
    from test_matrix import make_room

    outside = make_room(fleet.room.synapse, join=False)  # invited, never joined
    (fleet.creds / "outsider").write_text(outside.bot + "\n")
    config = fleet.write("not-joined.toml", matrix={"access_token_file": "${CREDENTIALS_DIRECTORY}/outsider",
                                                    "room_id": outside.id})  # fmt: skip
    only_failure(fleet.run(config), "matrix.room", exit_code=5, says="has not joined", hint="join as the bot")


def copy_db(fleet, tmp_path: Path) -> Path:
    target = tmp_path / "copy" / "fleet.db"
    target.parent.mkdir(mode=0o700)
    src = sqlite3.connect(fleet.db)
    dst = sqlite3.connect(target)
    src.backup(dst)
    src.close()
    dst.close()
    target.chmod(0o600)
    return target


def test_database_read_only(fleet, tmp_path):
    db = copy_db(fleet, tmp_path)
    db.chmod(0o400)
    config = fleet.write("read-only.toml", orchestrator={"db_path": str(db)})
    only_failure(fleet.run(config), "database.permissions", exit_code=1, says="read-only", hint="chmod u+w")


def test_schema_newer_than_the_program(fleet, tmp_path):
    db = copy_db(fleet, tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "VALUES ('fleetctl', 'm999_from_the_future', '2030-01-01')")  # fmt: skip
    config = fleet.write("newer.toml", orchestrator={"db_path": str(db)})
    only_failure(fleet.run(config), "database", exit_code=1, says="newer schema", hint="pip install -U fleetctl")


def test_a_config_error_exits_2(fleet, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(fleet.config.read_text() + "\n[orchestratr]\nx = 1\n")
    done = subprocess.run([sys.executable, "-m", "fleetctl", "doctor", "--config", str(bad), "--json"],
                          capture_output=True, text=True, env=fleet.env, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    (check,) = json.loads(done.stdout)["checks"]
    assert check["name"] == "config" and check["status"] == "fail" and "did you mean 'orchestrator'" in check["detail"]


def test_strict_turns_a_warning_into_exit_1(fleet):
    config = fleet.write("warns.toml")
    env = {**fleet.env, "PATH": os.environ["PATH"]}  # no systemctl stub: the sync timer cannot be seen
    report = doctor.run(config, env=env)
    if by_name(report)["forgejo.sync_timer"].status == doctor.OK:  # a machine whose systemd runs the timer
        pytest.skip("this machine really runs fleetctl-sync.timer")
    assert report.status == doctor.WARN and report.exit_code() == 0 and report.exit_code(strict=True) == 1


def test_a_part_that_hangs_is_reported_within_the_bound(fleet, monkeypatch):
    """A Forgejo that accepts connections and never answers: the part fails as unanswered once the run's
    bound has passed, and the other parts are still reported."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(doctor, "TOTAL_SECS", 1.0)
    monkeypatch.setattr(doctor, "CALL_SECS", 30.0)  # the call itself would wait far longer than the bound
    try:
        config = fleet.write("hangs.toml", forgejo={"url": f"http://127.0.0.1:{listener.getsockname()[1]}"})
        report = fleet.run(config)
    finally:
        stop.set()
        thread.join(5)
        for s in held:
            s.close()
        listener.close()
    check = by_name(report)["forgejo"]
    assert check.status == doctor.FAIL and check.detail == "no answer within 1s" and check.hint
    assert by_name(report)["config"].status == doctor.OK and "database" in by_name(report)
    assert report.exit_code() == 5


def test_database_problems_found_without_the_rest_of_a_fleet(tmp_path):
    """The database part alone: a directory where the file should be, a shared directory, a loose file."""
    config = tmp_path / "c.toml"
    config.write_text(f'[orchestrator]\ndb_path = "{tmp_path}"\n')
    config.chmod(0o600)
    check = by_name(doctor.run(config, env={}))["database"]
    assert check.status == doctor.FAIL and "is a directory" in check.detail and "db_path" in check.hint
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    db = shared / "fleet.db"
    config.write_text(f'[orchestrator]\ndb_path = "{db}"\n')
    assert subprocess.run([sys.executable, "-m", "fleetctl", "db", "migrate", "--config", str(config)],
                          capture_output=True, timeout=60).returncode == 0  # fmt: skip
    assert by_name(doctor.run(config, env={}))["database.permissions"].status == doctor.OK
    shared.chmod(0o1777)  # like /tmp
    check = by_name(doctor.run(config, env={}))["database.permissions"]
    assert check.status == doctor.WARN and "directory of its own" in check.hint and "chmod" not in check.hint
    shared.chmod(0o700)
    db.chmod(0o644)
    check = by_name(doctor.run(config, env={}))["database.permissions"]
    assert check.status == doctor.WARN and check.hint == f"chmod 600 {db} (and its -wal and -shm files)"
