"""The contract every executor keeps (fleetctl/executors/base.py), run against each implementation.

``TestExecutorContract`` is one suite parametrised over executor factories: the local executor and the
SSH executor (against a real sshd on 127.0.0.1, the ``sshd`` fixture; skipped locally without sshd). Runs are small ``sh``/python commands that wait for
a gate file, never for a fixed time; every run a test starts is reaped by process group at teardown
(``reap_runs``), and nothing is stopped but processes the test started, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, pid_alive, reap_runs, wait_for

from fleetctl.errors import RemoteError
from fleetctl.executors import INHERITED_ENV, Executor, LaunchSpec, LocalExecutor, RunStatus, run_env

#: Deliberately awkward: quotes, a command substitution, backslashes, non-ASCII, trailing newlines.
PROMPT = (
    "Fix the parser.\n'single' \"double\" $(touch PWNED) `touch PWNED` $HOME \\n \\\\ ;|&\nnon-ASCII: é ü 日本 🚀\n\n\n"
)

#: Waits (bounded) for the file "go" in its workspace, then exits with the status given as $1 (default 0).
GATED = ("sh", "-c", 'n=0; while [ ! -e go ] && [ "$n" -lt 600 ]; do sleep 0.05; n=$((n+1)); done; exit "${1:-0}"',
         "gated")  # fmt: skip


@dataclass
class Factory:
    """How the contract suite gets an executor.

    What the interface cannot show (a file in the workspace, a pid) the suite checks on this machine:
    an executor's host must share its filesystem and pid namespace (the SSH executor is tested against
    an sshd on localhost).
    """

    name: str
    make: Callable[[], Executor]
    #: Python source of an expression that makes an equivalent executor in another process.
    source: str


def ssh_factory(sshd, work_dir: Path) -> Factory:
    """An ``SshExecutor`` logging in to the test sshd on 127.0.0.1 (same filesystem and pids as the test)."""
    from fleetctl.config import HostConfig
    from fleetctl.executors.ssh import SshExecutor

    fields = dict(host_id="test-sshd", hostname=sshd.host, ssh_user=sshd.user, ssh_port=sshd.port,
                  ssh_key_path=sshd.key_path, known_hosts=sshd.known_hosts, connect_timeout_secs=10.0,
                  work_dir=str(work_dir))  # fmt: skip
    source = (f"__import__('fleetctl.executors.ssh', fromlist=['x']).SshExecutor("
              f"__import__('fleetctl.config', fromlist=['x']).HostConfig(**{fields!r}))")  # fmt: skip
    return Factory("ssh", lambda: SshExecutor(HostConfig(**fields)), source)


#: The SSH factory is a placeholder here: the ``factory`` fixture builds it around the ``sshd`` fixture.
FACTORIES = [
    Factory("local", LocalExecutor, "__import__('fleetctl.executors', fromlist=['x']).LocalExecutor()"),
    Factory("ssh", lambda: None, ""),
]


@pytest.fixture(params=FACTORIES, ids=lambda f: f.name)
def factory(request, tmp_path):
    try:
        if request.param.name == "ssh":
            yield ssh_factory(request.getfixturevalue("sshd"), tmp_path)
        else:
            yield request.param
    finally:
        reap_runs(tmp_path)


@pytest.fixture
def executor(factory):
    ex = factory.make()
    try:
        yield ex
    finally:
        ex.close()


def spec(tmp_path: Path, command: tuple[str, ...] = GATED, *, task_id: str = "t-1", attempt: int = 1,
         prompt: str = PROMPT, mode: str = "stdin", cap: int = 1048576, extra_env: dict | None = None,
         workspace: str | None = None) -> LaunchSpec:  # fmt: skip
    ws = workspace or str(tmp_path / "ws" / task_id / str(attempt))
    env = run_env(os.environ, {"FLEET_TASK_ID": task_id, "FLEET_ATTEMPT": str(attempt), **(extra_env or {})})
    return LaunchSpec(task_id=task_id, attempt=attempt, workspace=ws, command=command, prompt=prompt,
                      prompt_mode=mode, env=env, output_cap_bytes=cap)  # fmt: skip


def ended(executor: Executor, ws: str) -> RunStatus:
    """Probe until the run has recorded its exit status."""
    return wait_for(lambda: (s := executor.probe(ws)).ended and s, what=f"the run in {ws} to end")


def gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


class TestExecutorContract:
    """What dispatch, sweep and the pull agent rely on, for every executor."""

    def test_launch_returns_the_pid_of_a_started_run_and_the_exit_status_is_recorded(self, executor, tmp_path):
        s = spec(tmp_path, (*GATED, "7"))
        pid = executor.launch(s)
        assert isinstance(pid, int) and pid > 0
        status = executor.probe(s.workspace)
        assert (status.exists, status.pid, status.alive, status.ended, status.vanished) == (True, pid, True, False,
                                                                                            False)  # fmt: skip
        Path(f"{s.workspace}/go").touch()
        status = ended(executor, s.workspace)
        assert (status.exit_code, status.alive, status.vanished, status.pid) == (7, False, False, pid)

    def test_the_run_survives_the_process_that_launched_it(self, factory, tmp_path):
        s = spec(tmp_path)
        code = textwrap.dedent(f"""
            import json, sys
            from fleetctl.executors import LaunchSpec
            ex = {factory.source}
            spec = LaunchSpec(**json.loads(sys.argv[1]))
            print(ex.launch(spec)); ex.close()
        """)
        args = {**s.__dict__, "env": dict(s.env), "command": list(s.command)}
        done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
        assert done.returncode == 0, done.stderr
        pid = int(done.stdout)
        executor = factory.make()  # a fresh executor (for SSH: a new connection) picks the run up by its workspace
        try:
            status = executor.probe(s.workspace)
            assert status.alive and status.pid == pid, status
            Path(f"{s.workspace}/go").touch()
            assert ended(executor, s.workspace).exit_code == 0
        finally:
            executor.close()

    def test_output_is_capped_and_a_command_printing_far_more_still_exits_normally(self, executor, tmp_path):
        # 64 KiB per line, 40 lines on each stream: 2.5 MiB each, against a 10,000-byte cap
        loud = ("sh", "-c", 'line=$(head -c 65536 /dev/zero | tr "\\0" x); i=0; '
                'while [ $i -lt 40 ]; do echo "$line"; echo "$line" >&2; i=$((i+1)); done; echo done >&2')  # fmt: skip
        s = spec(tmp_path, loud, cap=10_000)
        executor.launch(s)
        status = ended(executor, s.workspace)
        assert status.exit_code == 0  # not 141: the command never saw SIGPIPE
        out = Path(f"{s.workspace}/.fleet/stdout.log").read_bytes()
        err = Path(f"{s.workspace}/.fleet/stderr.log").read_bytes()
        assert out == b"x" * 10_000 and err == b"x" * 10_000
        assert status.stderr_tail and set(status.stderr_tail) == {"x"}

    @pytest.mark.parametrize(
        "mode,command",
        [
            ("stdin", ("sh", "-c", "cat > got")),
            ("file", ("sh", "-c", 'cat "$1" > got', "sh")),
            ("arg", ("sh", "-c", 'printf %s "$1" > got', "sh")),
        ],
    )
    def test_every_prompt_mode_delivers_the_prompt_byte_exact(self, executor, tmp_path, mode, command):
        s = spec(tmp_path, command, mode=mode)
        executor.launch(s)
        assert ended(executor, s.workspace).exit_code == 0
        assert Path(f"{s.workspace}/got").read_bytes() == PROMPT.encode()  # trailing newlines included
        assert Path(f"{s.workspace}/.fleet/prompt.md").read_bytes() == PROMPT.encode()
        assert not list(tmp_path.rglob("PWNED"))

    def test_only_the_whitelisted_environment_reaches_the_run(self, executor, tmp_path, monkeypatch):
        monkeypatch.setenv("FORGEJO_ADMIN_TOKEN", "s3cret-of-the-orchestrator")
        monkeypatch.setenv("HOME", str(tmp_path))
        s = spec(tmp_path, ("sh", "-c", "env > env.txt"), extra_env={"FLEET_TASK_TOKEN": "per-attempt"})
        assert "FORGEJO_ADMIN_TOKEN" not in s.env
        executor.launch(s)
        assert ended(executor, s.workspace).exit_code == 0
        env = dict(line.split("=", 1) for line in Path(f"{s.workspace}/env.txt").read_bytes().decode().splitlines()
                   if "=" in line)  # fmt: skip
        assert "s3cret-of-the-orchestrator" not in Path(f"{s.workspace}/env.txt").read_bytes().decode()
        assert env["FLEET_TASK_TOKEN"] == "per-attempt" and env["FLEET_TASK_ID"] == "t-1"
        assert env["HOME"] == str(tmp_path)
        # the wrapper's own variables are not exported to the command
        assert not {"cap", "mode", "m", "o", "e", "code", "prompt"} & set(env)
        unexpected = set(env) - set(INHERITED_ENV) - set(s.env) - {"PWD", "OLDPWD", "SHLVL", "_"}
        assert not unexpected

    def test_kill_stops_the_whole_group_even_a_child_that_ignores_sigterm(self, executor, tmp_path):
        stubborn = textwrap.dedent("""
            import os, signal, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open('child.ready', 'w').close(); time.sleep(120)"])
            while not os.path.exists("child.ready"):
                time.sleep(0.02)
            open("pids.tmp", "w").write(f"{os.getpid()} {child.pid}")
            os.rename("pids.tmp", "pids")
            time.sleep(120)
        """)
        s = spec(tmp_path, (sys.executable, "-c", stubborn))
        pid = executor.launch(s)
        pids_file = Path(s.workspace, "pids")
        pids = [pid, *map(int, wait_for(lambda: pids_file.exists() and pids_file.read_text()).split())]
        assert all(pid_alive(p) for p in pids)
        assert executor.kill(s.workspace, grace_secs=0.3) is True
        assert gone(pids), "kill returned while members of the run's group were still alive"
        status = executor.probe(s.workspace)
        assert not status.alive and not status.ended and status.vanished
        assert executor.kill(s.workspace) is False  # nothing left to stop

    def test_kill_of_an_ended_run_or_a_missing_workspace_returns_false(self, executor, tmp_path):
        s = spec(tmp_path, ("true",))
        executor.launch(s)
        ended(executor, s.workspace)
        assert executor.kill(s.workspace) is False
        assert executor.kill(str(tmp_path / "ws" / "never" / "1")) is False

    def test_probe_of_a_missing_workspace(self, executor, tmp_path):
        status = executor.probe(str(tmp_path / "ws" / "nothing-here" / "1"))
        assert status == RunStatus(exists=False)
        assert not status.ended and not status.vanished and not status.alive

    def test_a_run_whose_group_was_killed_from_outside_has_vanished(self, executor, tmp_path):
        s = spec(tmp_path)
        pid = executor.launch(s)
        assert executor.probe(s.workspace).alive
        os.killpg(pid, signal.SIGKILL)  # what an OOM killer or a reboot does
        status = wait_for(lambda: (st := executor.probe(s.workspace)).vanished and st, what="the run to vanish")
        assert (status.pid, status.alive, status.exit_code) == (pid, False, None)
        assert executor.kill(s.workspace) is False

    def test_a_reused_pid_is_not_our_run_and_is_never_signalled(self, executor, tmp_path):
        """The pid file names a live process that is not our wrapper (its cwd is elsewhere)."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        stranger = subprocess.Popen(["sleep", "60"], cwd=elsewhere, start_new_session=True)
        try:
            ws = tmp_path / "ws" / "t-old" / "1"
            (ws / ".fleet").mkdir(parents=True)
            (ws / ".fleet" / "pid").write_text(f"{stranger.pid}\n")
            status = executor.probe(str(ws))
            assert status.pid == stranger.pid and not status.alive and status.vanished
            assert executor.kill(str(ws), grace_secs=0) is False
            assert stranger.poll() is None, "kill signalled a process that is not ours"
        finally:
            stranger.kill()
            stranger.wait()

    @pytest.mark.parametrize("written", ["0", "1", "00", "01", "-1", " 1"])
    def test_a_pid_file_naming_0_or_1_never_signals_a_group(self, executor, tmp_path, written):
        """``kill -- -0`` would signal the caller's own process group and ``kill -- -1`` every process the
        user may signal: a pid file an agent scribbled on must never lead there."""
        ws = tmp_path / "ws" / "t-odd" / "1"
        (ws / ".fleet").mkdir(parents=True)
        (ws / ".fleet" / "pid").write_text(f"{written}\n")
        status = executor.probe(str(ws))
        assert status.pid is None and not status.alive and not status.vanished
        assert executor.kill(str(ws), grace_secs=0) is False  # and this test process is still here to see it
        assert executor.remove(str(ws)) is True and not ws.exists()

    def test_hostile_ids_and_paths_never_reach_a_shell_unquoted(self, executor, tmp_path):
        hostile = "t 'x\" $(touch PWNED) `touch PWNED`; touch PWNED & |*\nz"
        ws = str(tmp_path / "ws" / hostile / "1")
        s = spec(tmp_path, ("sh", "-c", 'cat > got; n=0; while [ ! -e go ] && [ "$n" -lt 600 ]; do sleep 0.05; '
                            'n=$((n+1)); done'), task_id=hostile, workspace=ws)  # fmt: skip
        pid = executor.launch(s)
        assert executor.probe(ws).alive
        assert Path(f"{ws}/.fleet/pid").read_bytes().strip() == str(pid).encode()
        assert executor.kill(ws, grace_secs=1) is True
        assert executor.probe(ws).vanished
        assert Path(f"{ws}/got").read_bytes() == PROMPT.encode()
        assert not list(tmp_path.rglob("PWNED"))

    def test_a_command_that_does_not_exist_is_recorded_as_exit_127(self, executor, tmp_path):
        s = spec(tmp_path, ("/nonexistent/agent-binary", "--yes"))
        executor.launch(s)  # the wrapper started: the launch itself is confirmed
        status = ended(executor, s.workspace)
        assert status.exit_code == 127 and "/nonexistent/agent-binary" in status.stderr_tail

    def test_an_unwritable_work_dir_is_launch_failed(self, executor, tmp_path):
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        s = spec(tmp_path, workspace=str(blocker / "t-1" / "1"))
        with pytest.raises(RemoteError) as caught:
            executor.launch(s)
        assert caught.value.code == "launch_failed" and str(blocker) in caught.value.message

    def test_a_bad_spec_is_launch_failed_before_anything_is_written(self, executor, tmp_path):
        for bad in (spec(tmp_path, mode="carrier-pigeon"), spec(tmp_path, ()), spec(tmp_path, cap=0)):
            with pytest.raises(RemoteError) as caught:
                executor.launch(bad)
            assert caught.value.code == "launch_failed"
            assert not Path(bad.workspace).exists()

    def test_a_workspace_is_reused_only_once_its_run_has_ended(self, executor, tmp_path):
        first = spec(tmp_path, (*GATED, "3"))
        pid = executor.launch(first)
        with pytest.raises(RemoteError) as caught:
            executor.launch(first)
        assert caught.value.code == "launch_failed" and f"already has a live run (pid {pid})" in caught.value.message
        assert executor.probe(first.workspace).pid == pid
        Path(f"{first.workspace}/go").touch()
        assert ended(executor, first.workspace).exit_code == 3
        # the same task id and attempt again (a database started afresh): the old pid and exit status go
        again = spec(tmp_path, ("sh", "-c", "cat > again; exit 5"))
        executor.launch(again)
        assert executor.probe(again.workspace).exit_code in (None, 5)  # never the old run's 3
        assert ended(executor, again.workspace).exit_code == 5
        assert Path(f"{again.workspace}/again").read_bytes() == PROMPT.encode()

    def test_remove_keeps_a_live_run_and_removes_it_once_ended_with_its_empty_task_directory(self, executor, tmp_path):
        s = spec(tmp_path)
        executor.launch(s)
        Path(s.workspace, "worktree", "src").mkdir(parents=True)
        Path(s.workspace, "worktree", "src", "main.py").write_text("print('hi')\n")
        assert executor.remove(s.workspace) is False  # the run lives: nothing removed
        assert executor.probe(s.workspace).alive and Path(s.workspace, "worktree", "src", "main.py").exists()
        Path(s.workspace, "go").touch()
        ended(executor, s.workspace)
        assert executor.remove(s.workspace) is True
        assert not Path(s.workspace).exists() and not Path(s.workspace).parent.exists()  # {work_dir}/{task_id} too
        assert (tmp_path / "ws").is_dir()  # never the work_dir
        assert executor.remove(s.workspace) is True  # already gone is fine

    def test_remove_keeps_a_workspace_while_a_child_of_an_ended_run_lives(self, executor, tmp_path):
        """The command exited (exit_status written) but left a child in the run's process group."""
        child = 'n=0; while [ ! -e go ] && [ "$n" -lt 600 ]; do sleep 0.05; n=$((n+1)); done'
        s = spec(tmp_path, ("sh", "-c", f"({child}) > /dev/null 2>&1 & exit 0"))
        executor.launch(s)
        assert ended(executor, s.workspace).exit_code == 0
        assert executor.remove(s.workspace) is False
        assert Path(s.workspace, ".fleet", "exit_status").exists()
        Path(s.workspace, "go").touch()  # the child ends
        wait_for(lambda: executor.remove(s.workspace), what="the workspace to be removed once the child ended")
        assert not Path(s.workspace).exists()

    def test_remove_keeps_the_other_attempts_of_the_task(self, executor, tmp_path):
        first, second = spec(tmp_path, ("true",)), spec(tmp_path, ("true",), attempt=2)
        for s in (first, second):
            executor.launch(s)
            ended(executor, s.workspace)
        assert executor.remove(first.workspace) is True
        assert not Path(first.workspace).exists() and Path(second.workspace, ".fleet", "pid").exists()

    def test_remove_refuses_what_is_not_a_fleetctl_workspace_and_removes_nothing(self, executor, tmp_path):
        precious = tmp_path / "ws" / "t-1" / "1"  # the layout, but no .fleet/ directory
        precious.mkdir(parents=True)
        (precious / "keep.txt").write_text("mine")
        workspace = spec(tmp_path, ("true",), task_id="t-2")  # a real workspace, reached the wrong ways
        executor.launch(workspace)
        ended(executor, workspace.workspace)
        elsewhere = tmp_path / "elsewhere" / "t-3"
        elsewhere.mkdir(parents=True)
        (elsewhere / "1").symlink_to(workspace.workspace)  # a symlinked workspace
        (tmp_path / "ws" / "t-4").symlink_to(Path(workspace.workspace).parent)  # a symlinked task directory
        afile = tmp_path / "ws" / "t-5" / "1"
        afile.parent.mkdir()
        afile.write_text("not a directory")
        ws = str(tmp_path / "ws")
        for path in (str(precious), str(elsewhere / "1"), f"{ws}/t-4/1", str(afile), f"{ws}/t-2",
                     f"{ws}/t-2/1/", f"{ws}/t-2/../t-2/1", f"{ws}//t-2/1", ws, str(tmp_path), "/", "1"):  # fmt: skip
            with pytest.raises(RemoteError) as caught:
                executor.remove(path)
            assert caught.value.code == "remove_failed" and "not a fleetctl workspace" in caught.value.message, path
        assert (precious / "keep.txt").read_text() == "mine" and afile.read_text() == "not a directory"
        assert Path(workspace.workspace, ".fleet", "exit_status").exists()

    def test_remove_of_a_workspace_it_cannot_see_is_an_error_never_already_gone(self, executor, tmp_path):
        with pytest.raises(RemoteError) as caught:
            executor.remove(str(tmp_path / "no-such-work-dir" / "t-1" / "1"))
        assert caught.value.code == "remove_failed" and "cannot look for" in caught.value.message
        (tmp_path / "ws" / "t-1").mkdir(parents=True)  # the task directory is there, the attempt is not
        assert executor.remove(str(tmp_path / "ws" / "t-1" / "1")) is True
        assert not (tmp_path / "ws" / "t-1").exists()

    def test_remove_takes_read_only_trees_and_hostile_names(self, executor, tmp_path):
        hostile = "t 'x\" $(touch PWNED) `touch PWNED`; touch PWNED & |*\nz"
        s = spec(tmp_path, ("true",), task_id=hostile)
        executor.launch(s)
        ended(executor, s.workspace)
        locked = Path(s.workspace, "pkg", "mod@v1")
        locked.mkdir(parents=True)
        (locked / "go.mod").write_text("module x\n")
        locked.chmod(0o500)  # what Go's module cache does
        locked.parent.chmod(0o500)
        assert executor.remove(s.workspace) is True
        assert not Path(s.workspace).parent.exists() and not list(tmp_path.rglob("PWNED"))

    def test_close_is_idempotent(self, factory):
        ex = factory.make()
        ex.close()
        ex.close()


# ------------------------------------------------------------------------------------------------------
# The passes close every executor they made, one per host, even when the pass fails (fleetctl/passes.py).


class CountingExecutor(LocalExecutor):
    """A local executor that counts its closes; ``fail_launch`` makes launch blow up like a bug would."""

    made: list[CountingExecutor] = []

    def __init__(self, fail_launch: bool = False):
        super().__init__()
        self.closes = 0
        self.fail_launch = fail_launch
        CountingExecutor.made.append(self)

    def launch(self, spec: LaunchSpec) -> int:
        if self.fail_launch:
            raise RuntimeError("a bug in the executor")
        return super().launch(spec)

    def close(self) -> None:
        self.closes += 1
        super().close()


@contextmanager
def reaped(directory: Path) -> Iterator[None]:
    try:
        yield
    finally:
        reap_runs(directory)


def test_dispatch_and_sweep_make_one_executor_per_host_and_close_it_even_when_the_pass_fails(tmp_path):
    from conftest import make_config

    from fleetctl import passes, services
    from fleetctl.config import load_config
    from fleetctl.store import Store

    agents = [{"agent_type": "ok", "agent_id": "local-ok", "max_concurrency": 3}]
    cfg = load_config(make_config(tmp_path, agents=agents, agent_types={"ok": {"command": list(GATED),
                                                                                "prompt": "stdin"}}))  # fmt: skip
    CountingExecutor.made = []
    with Store.open(cfg.orchestrator.db_path) as store, reaped(tmp_path):
        for n in range(2):
            services.create_task(store, cfg.orchestrator, title=f"task {n}")
        report = passes.dispatch(store, cfg, executor_for=lambda host: CountingExecutor())
        assert len(report.launched) == 2
        assert [e.closes for e in CountingExecutor.made] == [1]  # one executor for the host, closed once

        CountingExecutor.made = []
        passes.sweep(store, cfg, executor_for=lambda host: CountingExecutor())
        assert [e.closes for e in CountingExecutor.made] == [1]

        CountingExecutor.made = []
        services.create_task(store, cfg.orchestrator, title="launched by a buggy executor")
        with pytest.raises(RuntimeError):
            passes.dispatch(store, cfg, executor_for=lambda host: CountingExecutor(fail_launch=True))
        assert [e.closes for e in CountingExecutor.made] == [1]


def test_the_wrapper_given_an_unknown_prompt_mode_ends_with_2_instead_of_hanging(tmp_path):
    """Launchers refuse unknown modes first; the wrapper itself must still end (its stdout reader once waited forever)."""
    from fleetctl.executors import META, RUN_WRAPPER

    (tmp_path / META).mkdir()
    (tmp_path / META / "run.sh").write_text(RUN_WRAPPER)
    (tmp_path / META / "prompt.md").write_text("hi")
    done = subprocess.run(["sh", f"{META}/run.sh", "100", "carrier-pigeon", "report", "true"], cwd=tmp_path, timeout=30,
                          stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip
    assert done.returncode == 2
    assert (tmp_path / META / "exit_status").read_text() == "2\n"
    assert b"unknown prompt mode carrier-pigeon" in (tmp_path / META / "stderr.log").read_bytes()
