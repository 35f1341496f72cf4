"""What only the SSH executor has: connecting, host keys, one reused connection, quoting over the wire.

Everything else it shares with the local executor is in tests/test_executor_contract.py. The server is a
real sshd on 127.0.0.1 (the ``sshd`` fixture); the hosts that refuse or never answer are sockets of ours.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from conftest import SSH_TIMEOUT as TIMEOUT
from conftest import host_for, other_key, reap_runs, wait_for
from test_executor_contract import GATED, spec

from fleetctl.config import HostConfig
from fleetctl.errors import RemoteError
from fleetctl.executors.ssh import SshExecutor


@pytest.fixture(autouse=True)
def _reaped(tmp_path):
    try:
        yield
    finally:
        reap_runs(tmp_path)


def failure(host: HostConfig, tmp_path: Path, what: str = "launch") -> tuple[RemoteError, float]:
    """The ``RemoteError`` a launch (or probe) on ``host`` raises, and how long it took."""
    ex = SshExecutor(host)
    started = time.monotonic()
    try:
        with pytest.raises(RemoteError) as caught:
            if what == "launch":
                ex.launch(spec(tmp_path))
            else:
                ex.probe(str(tmp_path / "ws"))
    finally:
        ex.close()
    return caught.value, time.monotonic() - started


def test_a_refused_connection_is_a_remote_error_naming_the_host(sshd, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error, took = failure(host_for(sshd, tmp_path, ssh_port=port), tmp_path)
    assert error.code == "launch_failed" and f"127.0.0.1:{port}" in error.message and "box-1" in error.message
    assert "refused" in error.message.lower()
    assert took < TIMEOUT + 3
    error, _ = failure(host_for(sshd, tmp_path, ssh_port=port), tmp_path, "probe")
    assert error.code == "probe_failed" and f"127.0.0.1:{port}" in error.message
    assert not [r for r in caplog.records if r.name.startswith("paramiko")], "paramiko's logging is not silenced"


def test_a_host_that_accepts_and_never_answers_fails_within_the_timeout(sshd, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody accepts, nothing is ever sent
        port = silent.getsockname()[1]
        error, took = failure(host_for(sshd, tmp_path, ssh_port=port), tmp_path)
    assert error.code == "launch_failed" and f"127.0.0.1:{port}" in error.message and "box-1" in error.message
    assert "no SSH banner" in error.message or "completed no SSH handshake" in error.message, error.message
    assert TIMEOUT * 0.5 < took < TIMEOUT + 3, took
    assert not [r for r in caplog.records if r.name.startswith("paramiko")]
    assert not Path(spec(tmp_path).workspace).exists()


def test_a_wrong_key_is_a_clear_authentication_error(sshd, tmp_path):
    error, took = failure(host_for(sshd, tmp_path, ssh_key_path=other_key(tmp_path, "stranger")), tmp_path)
    assert error.code == "launch_failed" and "authentication failed" in error.message
    assert f"{sshd.user}@127.0.0.1:{sshd.port}" in error.message and "stranger" in error.message
    assert took < TIMEOUT + 3


@pytest.mark.parametrize("accept_new", [False, True])
def test_a_changed_host_key_is_refused_and_never_accepted(sshd, tmp_path, accept_new):
    impostor = other_key(tmp_path, "impostor_host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line(impostor + ".pub"))
    before = known_hosts.read_bytes()
    host = host_for(
        sshd, tmp_path, known_hosts=str(known_hosts), host_key_policy="accept-new" if accept_new else "strict"
    )
    error, _ = failure(host, tmp_path)
    assert error.code == "launch_failed" and f"127.0.0.1:{sshd.port}" in error.message
    assert "host key changed" in error.message and str(known_hosts) in error.message
    assert known_hosts.read_bytes() == before
    assert not Path(spec(tmp_path).workspace).exists()


def test_an_unknown_host_is_refused_unless_the_policy_is_accept_new_and_then_its_key_is_recorded(sshd, tmp_path):
    known_hosts = tmp_path / "kh" / "known_hosts"
    error, _ = failure(host_for(sshd, tmp_path, known_hosts=str(known_hosts)), tmp_path, "probe")
    assert "is not in" in error.message and "host_key_policy" in error.message
    assert not known_hosts.exists()

    ex = SshExecutor(host_for(sshd, tmp_path, known_hosts=str(known_hosts), host_key_policy="accept-new"))
    try:
        assert not ex.probe(str(tmp_path / "nothing")).exists
    finally:
        ex.close()
    assert known_hosts.read_text() == sshd.known_hosts_line()
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    # from now on the host is known: a strict executor connects
    ex = SshExecutor(host_for(sshd, tmp_path, known_hosts=str(known_hosts)))
    try:
        assert not ex.probe(str(tmp_path / "nothing")).exists
    finally:
        ex.close()


def test_one_connection_serves_every_launch_probe_and_kill(sshd, tmp_path):
    ex = SshExecutor(host_for(sshd, tmp_path))
    before = sshd.accepted_logins()
    try:
        specs = [spec(tmp_path, task_id=f"t-{i}") for i in range(5)]
        pids = [ex.launch(s) for s in specs]
        assert all(ex.probe(s.workspace).alive for s in specs)
        assert ex.kill(specs[0].workspace, grace_secs=0.5) is True
        for s in specs[1:]:
            Path(s.workspace, "go").touch()
            wait_for(lambda s=s: ex.probe(s.workspace).ended, what="the run to end")
        assert len(set(pids)) == 5
        assert ex.connects == 1
        wait_for(lambda: sshd.accepted_logins() > before, what="sshd to log the login")
        assert sshd.accepted_logins() - before == 1
    finally:
        ex.close()
    ex.close()
    assert ex._conn is None


def test_the_workspace_is_made_over_sftp_private_and_the_socket_sends_at_once(sshd, tmp_path):
    ex = SshExecutor(host_for(sshd, tmp_path))
    try:
        s = spec(tmp_path, ("true",), workspace=str(tmp_path / "deep" / "er" / "t-1" / "1"))
        ex.launch(s)
        meta = Path(s.workspace, ".fleet")
        assert stat.S_IMODE(meta.stat().st_mode) == 0o700 and (meta / "run.sh").exists()
        sock = ex._conn.client.get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        ex.launch(spec(tmp_path, ("true",), task_id="t-2"))  # a workspace beside it: its parents exist
        blocked = tmp_path / "file"
        blocked.write_text("not a directory")
        with pytest.raises(RemoteError) as caught:
            ex.launch(spec(tmp_path, ("true",), workspace=str(blocked / "t-3" / "1")))
        assert (
            caught.value.code == "launch_failed" and f"{blocked} exists and is not a directory" in caught.value.message
        )
        assert ex.connects == 1
    finally:
        ex.close()


def test_a_broken_connection_is_opened_afresh_by_the_next_call(sshd, tmp_path):
    ex = SshExecutor(host_for(sshd, tmp_path))
    try:
        assert not ex.probe(str(tmp_path / "nothing")).exists
        ex._conn.client.get_transport().close()  # what a network blip does
        assert not ex.probe(str(tmp_path / "nothing")).exists
        assert ex.connects == 2
    finally:
        ex.close()


HOSTILE = "$(touch pwned) `touch pwned` '; rm -rf ~ ;' \"; touch pwned\" \\ $HOME\nline two\n"


def test_hostile_prompts_and_env_values_arrive_byte_for_byte_and_never_on_a_command_line(sshd, tmp_path):
    ex = SshExecutor(host_for(sshd, tmp_path))
    commands: list[list[str]] = []
    real_exec = ex._exec

    def recording_exec(argv, *args, **kwargs):
        commands.append(list(argv))
        return real_exec(argv, *args, **kwargs)

    ex._exec = recording_exec
    secret = "per-attempt-token-" + HOSTILE
    command = ("sh", "-c", 'cat > got; printf %s "$FLEET_TASK_TOKEN" > token; printf %s "$ODD" > odd')
    s = spec(tmp_path, command, prompt=HOSTILE, extra_env={"FLEET_TASK_TOKEN": secret, "ODD": HOSTILE})
    try:
        ex.launch(s)
        assert not Path(s.workspace, ".fleet", "env").exists(), "the environment file outlived the start"
        status = wait_for(lambda: (st := ex.probe(s.workspace)).ended and st, what="the run to end")
        assert status.exit_code == 0, status.stderr_tail
    finally:
        ex.close()
    assert Path(s.workspace, "got").read_bytes() == HOSTILE.encode()
    assert Path(s.workspace, "token").read_bytes() == secret.encode()
    assert Path(s.workspace, "odd").read_bytes() == HOSTILE.encode()
    assert not list(tmp_path.rglob("pwned")) and not os.path.exists(os.path.expanduser("~/pwned"))
    assert commands and not any("per-attempt-token" in part for argv in commands for part in argv)
    meta = Path(s.workspace, ".fleet")
    assert stat.S_IMODE(meta.stat().st_mode) == 0o700
    for name in ("prompt.md", "run.sh"):
        assert stat.S_IMODE((meta / name).stat().st_mode) == 0o600


def test_an_environment_variable_name_a_shell_cannot_take_is_launch_failed(sshd, tmp_path):
    ex = SshExecutor(host_for(sshd, tmp_path))
    try:
        bad = spec(tmp_path, GATED, extra_env={"NOT-A-NAME": "x"})
        with pytest.raises(RemoteError) as caught:
            ex.launch(bad)
        assert caught.value.code == "launch_failed" and "NOT-A-NAME" in caught.value.message
        assert not Path(bad.workspace).exists()
    finally:
        ex.close()


def test_a_run_gets_the_login_basics_of_the_host_and_nothing_of_the_orchestrator(sshd, tmp_path, monkeypatch):
    """dispatch builds an SSH run's env from the FLEET_* variables and the agent type's env alone; HOME,
    USER, PATH… are the host login's (where the agent CLI keeps its login), never the orchestrator's."""
    import pwd

    from fleetctl.executors import LaunchSpec, run_env

    monkeypatch.setenv("HOME", "/nonexistent/orchestrator-home")
    monkeypatch.setenv("USER", "orchestrator")
    monkeypatch.setenv("FORGEJO_ADMIN_TOKEN", "s3cret")
    ws = str(tmp_path / "ws" / "t-1" / "1")
    env = run_env({}, {"FLEET_TASK_ID": "t-1", "FLEET_ATTEMPT": "1", "AGENT_SETTING": "a b $(x)"})
    s = LaunchSpec(task_id="t-1", attempt=1, workspace=ws, command=("sh", "-c", "env > env.txt"), prompt="p",
                   prompt_mode="stdin", env=env)  # fmt: skip
    ex = SshExecutor(host_for(sshd, tmp_path))
    try:
        ex.launch(s)
        wait_for(lambda: ex.probe(ws).ended, what="the run to end")
    finally:
        ex.close()
    got = dict(line.split("=", 1) for line in Path(ws, "env.txt").read_text().splitlines() if "=" in line)
    login = pwd.getpwnam(sshd.user)
    assert got["HOME"] == login.pw_dir and got["USER"] == got["LOGNAME"] == sshd.user
    assert got["PATH"] and got["SHELL"] and got["AGENT_SETTING"] == "a b $(x)" and got["FLEET_TASK_ID"] == "t-1"
    assert "s3cret" not in Path(ws, "env.txt").read_text() and "orchestrator" not in Path(ws, "env.txt").read_text()
    unexpected = (
        set(got) - set(env) - {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "PWD", "OLDPWD", "SHLVL", "_"}
    )
    assert not unexpected, unexpected
