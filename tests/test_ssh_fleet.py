"""SSH hosts end to end (SPEC §2, §8, §12; issue 8): real ``fleetctl dispatch`` / ``sweep-timeouts`` /
``serve`` processes against a real sshd on 127.0.0.1 (the ``sshd`` fixture; a second one where two hosts
are needed), real detached runs on the host, real files in tmp_path.

The runs are small Python scripts configured as agent types. They reach the fleet as runs on a remote host
do: without a database, through the ``fleetctl serve`` named by ``server.public_url`` (their
``FLEET_API_URL``) with their per-attempt token, using this checkout's CLI (``PYTHONPATH`` comes from the
agent type's ``env``). Every loop is bounded in count and time; only processes started here are signalled,
by pid (the ``fleet`` fixture kills any run still alive at teardown, by its process group).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, REPO_ROOT, LiveServer, host_for, other_key, ssh_host_table, wait_for
from sshd import free_port
from test_dispatch import HANG, dispatch, script, types
from test_ssh_executor import HOSTILE

from fleetctl.config import AgentSpec, HostConfig

#: Records what it got in its workspace (``run.json``: argv, environment, pid, process group, start time),
#: waits for the gate file (argv[1], ``-`` for none), works for argv[2] seconds, records its end, then hands
#: in its receipt with the CLI in remote mode. Its exit status is the CLI's.
AGENT = """\
import json, os, subprocess, sys, time
gate, work = sys.argv[1], float(sys.argv[2])
record = {"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid(), "pgid": os.getpgid(0),
          "started": time.time()}
def save():
    with open("run.json.tmp", "w") as fh:
        json.dump(record, fh)
    os.rename("run.json.tmp", "run.json")
save()
deadline = time.monotonic() + 30
while gate != "-" and not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(work)
record["ended"] = time.time()
save()
done = subprocess.run([sys.executable, "-m", "fleetctl", "task", "complete", os.environ["FLEET_TASK_ID"],
                       "--summary", "done on " + os.environ["FLEET_AGENT_ID"]])
sys.exit(done.returncode)
"""


class Api:
    """A ``fleetctl serve`` over the fleet's own config: configure the fleet with ``server=api.server`` (its
    ``public_url`` becomes the runs' ``FLEET_API_URL``), then ``start()``; stopped by its pid at teardown."""

    def __init__(self, fleet):
        self.port = free_port()
        self.server = {"port": self.port, "public_url": f"http://127.0.0.1:{self.port}", "admin_token": ADMIN_TOKEN}
        self.live = LiveServer(fleet.dir, config=fleet.dir / "config.toml")

    def start(self) -> Api:
        self.live.start(self.port)
        return self


@pytest.fixture
def api(fleet):
    """An ``Api`` for the fleet (not started: configure first)."""
    server = Api(fleet)
    try:
        yield server
    finally:
        server.live.stop()


def box(sshd, tmp_path: Path, host_id: str = "box-1", *, agent_type: str = "agent", concurrency: int = 1,
        capabilities: tuple[str, ...] = (), **overrides) -> HostConfig:  # fmt: skip
    """A host on ``sshd`` (work_dir ``tmp_path/host_id``) with one agent ``{host_id}.{agent_type}`` (or ``agents``)."""
    agents = overrides.pop("agents", None) or (
        AgentSpec(agent_type, f"{host_id}.{agent_type}", concurrency, capabilities),
    )
    return host_for(sshd, tmp_path / host_id, host_id=host_id, agents=agents, **overrides)


def agent_type(*command: str, prompt: str = "stdin", env: dict | None = None, **settings) -> dict:
    """An ``[agent_types.NAME]`` table whose runs import this checkout's fleetctl."""
    return {"command": list(command), "prompt": prompt, "env": {"PYTHONPATH": str(REPO_ROOT), **(env or {})},
            **settings}  # fmt: skip


def the_agent(tmp_path: Path, gate: str | Path = "-", work: float = 0, *prefix: str) -> dict:
    """``agent_types`` with one type, ``agent``, running ``AGENT`` (after the argv ``prefix``, if any)."""
    command = [*prefix, "{python}", script(tmp_path, "agent.py", AGENT), str(gate), str(work)]
    return {"agent": agent_type(*command)}


def configure(fleet, hosts: list[HostConfig], agent_types: dict, api: Api | None = None, **overrides) -> Path:
    """The fleet's config (``make_config``): these SSH hosts and a local host without agents, the API if any."""
    return fleet.configure(agents=[], hosts=[ssh_host_table(h) for h in hosts], agent_types=agent_types,
                           server=api.server if api else None, **overrides)  # fmt: skip


def run_record(workspace: Path, timeout: float = 20.0) -> dict:
    """The ``run.json`` the agent wrote in ``workspace`` (waiting for it)."""
    path = workspace / "run.json"
    return json.loads(wait_for(lambda: path.exists() and path.read_text(), timeout, what=f"{path}"))


def sweep(fleet) -> list[dict]:
    done = fleet.run("sweep-timeouts", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["actions"]


# ---------------------------------------------------------------------------------------------- 1. runs


def test_a_detached_run_on_an_ssh_host_hands_in_its_receipt_through_the_api(fleet, sshd, api, tmp_path):
    gate = tmp_path / "gate"
    host = box(sshd, tmp_path)
    configure(fleet, [host], the_agent(tmp_path, gate), api)
    api.start()
    task_id = fleet.create("--title", "detached on box-1")
    report = dispatch(fleet, FLEET_FORGEJO_TOKEN="env-forgejo-secret", FLEET_MATRIX_TOKEN="matrix-secret")
    # the dispatch process has exited; the run it started on the host lives on in its own session and
    # cannot end before the gate exists
    (launched,) = report["launched"]
    ws = tmp_path / "box-1" / task_id / "1"
    assert (launched["task_id"], launched["host_id"], launched["workspace"]) == (task_id, "box-1", str(ws))
    pid = launched["pid"]
    assert fleet.pid_alive(pid) and os.getsid(pid) == pid
    assert fleet.task(task_id)["state"] == "running"
    seen = run_record(ws)
    assert seen["pgid"] == pid and fleet.pid_alive(seen["pid"])
    env = seen["env"]
    assert (env["FLEET_TASK_ID"], env["FLEET_ATTEMPT"], env["FLEET_AGENT_ID"]) == (task_id, "1", "box-1.agent")
    assert env["FLEET_API_URL"] == api.server["public_url"] and env["FLEET_TASK_TOKEN"]
    assert env["FLEET_BRANCH"] == f"fleet/{task_id}" and env["FLEET_WORKSPACE"] == str(ws)
    assert env["PYTHONPATH"] == str(REPO_ROOT)
    assert not {"FLEET_DB_PATH", "FLEET_CONFIG", "FLEET_PYTHON"} & set(env), "a remote run got local-only settings"
    for secret in (ADMIN_TOKEN, "env-forgejo-secret", "matrix-secret"):
        assert secret not in json.dumps(seen), "an orchestrator secret reached a run"
    assert not (ws / ".fleet" / "env").exists(), "the environment file outlived the start"

    gate.touch()
    task = fleet.wait_state(task_id, "completed")
    assert (task["attempt"], task["agent_id"]) == (1, "box-1.agent")
    (attempt,) = fleet.attempts(task_id)
    assert attempt["outcome"] == "completed" and attempt["receipt"]["summary"] == "done on box-1.agent"
    assert (attempt["host_id"], attempt["workspace"]) == ("box-1", str(ws))
    assert types(fleet.events(task_id)) == ["task.created", "task.assigned", "task.started", "task.completed"]
    wait_for(lambda: (ws / ".fleet" / "exit_status").exists(), what="the wrapper to record the exit status")
    assert (ws / ".fleet" / "exit_status").read_text().strip() == "0"
    assert sweep(fleet) == []  # settled once: the sweep finds nothing to do
    fleet.check_db()


def test_a_run_that_exits_non_zero_is_settled_by_the_sweep_retried_with_backoff_then_failed(fleet, sshd, tmp_path):
    configure(fleet, [box(sshd, tmp_path)], {"agent": agent_type("sh", "-c", "echo broken >&2; exit 3")},
              orchestrator={"retry_backoff_secs": 0.5, "retry_backoff_max_secs": 1})  # fmt: skip
    task_id = fleet.create("--title", "always crashes")  # default_max_retries 1: two attempts
    actions, reports = [], []
    deadline = time.monotonic() + 40
    for _ in range(200):  # sweep and dispatch, as the timers do, until the task has failed for good
        if fleet.task(task_id)["state"] == "failed" or time.monotonic() > deadline:
            break
        actions += sweep(fleet)
        reports.append(dispatch(fleet))
        time.sleep(0.1)
    task = fleet.task(task_id)
    assert (task["state"], task["attempt"], task["failure_reason"]) == ("failed", 2, "agent_error"), task
    ended = [a for a in actions if a["action"] == "task.run_ended"]
    assert [(a["attempt"], a["exit_code"], a["state"]) for a in ended] == [(1, 3, "queued"), (2, 3, "failed")]
    assert [p["attempt"] for r in reports for p in r["launched"]] == [1, 2]
    assert all(p["host_id"] == "box-1" for r in reports for p in r["launched"])
    events = [e for e in fleet.events(task_id) if e["type"] != "task.started"]
    assert types(events) == ["task.created", "task.assigned", "task.requeued", "task.assigned", "task.failed"]
    requeued = events[2]
    detail = requeued["data"]["detail"]
    assert requeued["data"]["reason"] == "agent_error"
    assert detail.startswith("the run exited with status 3") and "broken" in detail  # with the tail of its stderr
    not_before = requeued["data"]["not_before"]
    assert requeued["ts"] < not_before <= requeued["ts"] + 0.5  # the backoff (0.5 s, with jitter) …
    assert events[3]["ts"] >= not_before  # … was waited for
    assert "no attempts left" in events[-1]["data"]["why"]
    assert [(a["outcome"], a["failure_reason"]) for a in fleet.attempts(task_id)] == [("failed", "agent_error")] * 2
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- 2. timeout


def test_sweep_kills_a_remote_run_over_its_agent_types_timeout_with_its_whole_process_group(fleet, sshd, tmp_path):
    pids_file = tmp_path / "pids"
    hang = agent_type("{python}", script(tmp_path, "hang.py", HANG), str(pids_file), timeout_secs=1)
    configure(fleet, [box(sshd, tmp_path, agent_type="hang")], {"hang": hang})
    task_id = fleet.create("--title", "hangs", "--label", "retries:0")
    (launched,) = dispatch(fleet)["launched"]
    own, child = map(int, wait_for(lambda: pids_file.exists() and pids_file.read_text(), what="the run's pids").split())
    group = [launched["pid"], own, child]
    assert all(fleet.pid_alive(p) for p in group) and {os.getpgid(p) for p in group} == {launched["pid"]}

    actions: list[dict] = []
    deadline = time.monotonic() + 20
    for _ in range(100):  # sweep until the 1 s timeout has passed
        if fleet.task(task_id)["state"] != "running" or time.monotonic() > deadline:
            break
        actions += sweep(fleet)
        time.sleep(0.2)
    assert [(a["action"], a.get("killed")) for a in actions] == [("task.timeout", True)]
    assert not any(fleet.pid_alive(p) for p in group), "the run's process group survived the timeout"
    task = fleet.task(task_id)
    assert (task["state"], task["failure_reason"]) == ("failed", "timeout")
    assert task["failure_detail"] == "over the 1s timeout; run killed"
    assert [(a["outcome"], a["failure_reason"]) for a in fleet.attempts(task_id)] == [("failed", "timeout")]
    assert sweep(fleet) == []  # settled once
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- 3. capacity


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end and a start at the same instant do not overlap)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_three_dispatch_passes_at_once_never_overfill_an_ssh_agent_nor_launch_a_task_twice(fleet, sshd, api, tmp_path):
    from sshd import Sshd

    from fleetctl import services
    from fleetctl.config import load_config
    from fleetctl.store import Store

    gate = tmp_path / "gate"
    second = Sshd.start(tmp_path / "sshd2")
    try:
        hosts = [box(sshd, tmp_path, "box-1", concurrency=2), box(second, tmp_path, "box-2", concurrency=2)]
        configure(fleet, hosts, the_agent(tmp_path, gate, 0.2), api)
        api.start()
        cfg = load_config(fleet.config)
        with Store.open(fleet.db) as store:
            ids = [services.create_task(store, cfg.orchestrator, title=f"task {i}")["task_id"] for i in range(10)]

        samples: list[dict[str, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rows = fleet.query("SELECT agent_id, count(*) AS n FROM tasks WHERE state IN ('assigned','running') "
                                   "GROUP BY agent_id")  # fmt: skip
                samples.append({r["agent_id"]: r["n"] for r in rows})
                time.sleep(0.01)

        def three_at_once() -> list[dict]:
            procs = [fleet.popen("dispatch", "--json") for _ in range(3)]
            outs = [proc.communicate(timeout=60) for proc in procs]
            assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
            return [json.loads(out) for out, _ in outs]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # the first runs wait for the gate: both agents full, and passes meanwhile launch nothing more
            reports = three_at_once()
            wait_for(lambda: len(list(tmp_path.glob("box-*/*/*/run.json"))) == 4, what="four runs to start")
            reports += three_at_once()
            assert sum(len(r["launched"]) for r in reports) == 4
            gate.touch()
            deadline = time.monotonic() + 60
            for _ in range(100):  # then rounds until every task is launched
                if sum(len(r["launched"]) for r in reports) >= len(ids) or time.monotonic() > deadline:
                    break
                reports += three_at_once()
            for task_id in ids:
                fleet.wait_state(task_id, "completed", timeout=30)
        finally:
            stop.set()
            sampler.join()
    finally:
        second.stop()

    assert samples and max(n for s in samples for n in s.values()) == 2, "more than max_concurrency=2 in flight"
    launched = [(p["task_id"], p["attempt"]) for r in reports for p in r["launched"]]
    assert sorted(launched) == sorted((t, 1) for t in ids) and all(not r["failed"] for r in reports)
    # what the runs themselves recorded on the hosts: each attempt ran once, never more than two at a time
    # on an agent (and two at a time while the first ones waited for the gate)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("box-*/*/*/run.json"))]
    ran = sorted((r["env"]["FLEET_TASK_ID"], int(r["env"]["FLEET_ATTEMPT"])) for r in records)
    assert ran == sorted(launched), "an attempt ran twice, or not at all"
    for host in ("box-1", "box-2"):
        mine = [r for r in records if r["env"]["FLEET_WORKSPACE"].startswith(str(tmp_path / host) + "/")]
        assert mine and {r["env"]["FLEET_AGENT_ID"] for r in mine} == {f"{host}.agent"}
        peak = peak_overlap([(r["started"], r["ended"]) for r in mine])
        assert peak == 2, f"{host}: {peak} runs at once (max_concurrency 2; two waited for the gate)"
    for task_id in ids:
        events = fleet.events(task_id)
        assert types(events) == ["task.created", "task.assigned", "task.started", "task.completed"], task_id
        assert events[1]["attempt"] == 1
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- 4. kill -9


class SilentHost:
    """A port on 127.0.0.1 that accepts TCP connections and never sends a byte (an SSH server hung before
    its banner). ``conns`` are the connections it accepted; all closed, with the port, on exit."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def __enter__(self) -> SilentHost:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in [*self.conns, self.sock]:
            conn.close()


def test_kill_9_of_dispatch_while_it_connects_loses_nothing_the_sweep_fails_the_launch_after_the_lease(
    fleet, sshd, api, tmp_path
):
    agent = the_agent(tmp_path)
    lease = {"lease_secs": 1}
    with SilentHost() as silent:
        configure(fleet, [box(sshd, tmp_path, ssh_port=silent.port, connect_timeout_secs=2)], agent, api,
                  orchestrator=lease)  # fmt: skip
        api.start()
        task_id = fleet.create("--title", "claimed, never launched")
        proc = fleet.popen("dispatch", "--json")
        # the task is claimed and dispatch waits for the host's banner: kill it there
        wait_for(lambda: silent.conns and fleet.task(task_id)["state"] == "assigned", what="dispatch to connect")
        proc.kill()
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        task = fleet.task(task_id)
        assert (task["state"], task["attempt"], task["agent_id"]) == ("assigned", 1, "box-1.agent")
        # a sweep while the host still does not answer: the host is marked down (within its connect
        # timeout), the attempt waits for it and is not lost
        assert [a["action"] for a in sweep(fleet)] == ["host.down"]
        assert fleet.task(task_id)["state"] == "assigned"
    # the host answers again: the next sweep marks it up, finds no run in the attempt's workspace and, once
    # the lease has expired, fails the attempt launch_failed; the retry runs (once) as attempt 2
    configure(fleet, [box(sshd, tmp_path)], agent, api, orchestrator=lease)
    time.sleep(max(0.0, task["lease_expires_at"] - time.time()) + 0.01)
    actions = sweep(fleet)
    assert [a["action"] for a in actions] == ["host.up", "task.launch_failed"]
    task = fleet.task(task_id)
    assert (task["state"], task["attempt"], task["failure_reason"]) == ("queued", 1, "launch_failed")
    assert task["failure_detail"] == "assigned but never started"
    assert not (tmp_path / "box-1" / task_id / "1").exists()
    launched = dispatch_until_launched(fleet, task)
    assert [(p["task_id"], p["attempt"]) for p in launched] == [(task_id, 2)]
    fleet.wait_state(task_id, "completed")
    assert [(a["attempt"], a["outcome"], a["failure_reason"]) for a in fleet.attempts(task_id)] == [
        (1, "failed", "launch_failed"),
        (2, "completed", None),
    ]
    assert [p.parent.name for p in (tmp_path / "box-1").glob("*/*/run.json")] == ["2"]
    assert [e["attempt"] for e in fleet.events(task_id) if e["type"] == "task.assigned"] == [1, 2]
    fleet.check_db()


#: Waits (bounded) for the file naming the dispatch process that launched it, ``kill -9``s that process,
#: then runs the rest of its argv: dispatch dies right after the wrapper started, before it records the start.
KILL_DISPATCH = (
    'i=0; while [ ! -s "$1" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done; '
    'kill -9 "$(cat "$1")" || exit 99; shift; exec "$@"'
)


def test_kill_9_of_dispatch_between_the_launch_and_its_record_the_sweep_records_the_start(fleet, sshd, api, tmp_path):
    gate, dispatch_pid = tmp_path / "gate", tmp_path / "dispatch.pid"
    killer = the_agent(tmp_path, gate, 0, "sh", "-c", KILL_DISPATCH, "kill-dispatch", str(dispatch_pid))
    configure(fleet, [box(sshd, tmp_path)], killer, api, orchestrator={"lease_secs": 1})
    api.start()
    task_id = fleet.create("--title", "launched, never recorded")
    proc = fleet.popen("dispatch", "--json")
    (tmp_path / "dispatch.pid.tmp").write_text(str(proc.pid))
    os.rename(tmp_path / "dispatch.pid.tmp", dispatch_pid)
    # from the claim on, this test holds the database's write lock: dispatch can launch the run (the host
    # needs no database) but cannot record its start before the run kills it
    wait_for(lambda: fleet.task(task_id)["state"] == "assigned", interval=0.005, what="the claim")
    lock = sqlite3.connect(fleet.db, timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        assert lock.execute("SELECT state FROM tasks WHERE task_id=?", (task_id,)).fetchone() == ("assigned",)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the run did not kill its dispatch"
    finally:
        lock.rollback()
        lock.close()
    ws = tmp_path / "box-1" / task_id / "1"
    record = run_record(ws)
    assert fleet.pid_alive(record["pid"]), "the run died with its dispatch"
    assert fleet.task(task_id)["state"] == "assigned" and not fleet.attempts(task_id)[0]["workspace"]

    actions = sweep(fleet)  # the run is alive in the attempt's workspace: started → running
    assert [(a["action"], a["task"], a["attempt"]) for a in actions] == [("task.started", task_id, 1)]
    assert fleet.task(task_id)["state"] == "running"
    lease_end = fleet.task(task_id)["lease_expires_at"]
    time.sleep(max(0.0, (lease_end or 0) - time.time()) + 0.01)  # a started run on a configured host ignores it
    assert sweep(fleet) == []
    report = dispatch(fleet)  # the pass lock died with the killed pass; nothing is launched again
    assert report["skipped"] is None and report["launched"] == [] and report["failed"] == []
    gate.touch()
    task = fleet.wait_state(task_id, "completed")
    assert task["attempt"] == 1
    (attempt,) = fleet.attempts(task_id)
    assert attempt["outcome"] == "completed" and attempt["workspace"] == str(ws)
    assert types(fleet.events(task_id)) == ["task.created", "task.assigned", "task.started", "task.completed"]
    assert [p.parent for p in (tmp_path / "box-1").glob("*/*/run.json")] == [ws]
    fleet.check_db()


def dispatch_until_launched(fleet, task: dict, timeout: float = 20.0) -> list[dict]:
    """Dispatch passes (after the task's backoff) until one launches something; what it launched."""
    time.sleep(max(0.0, (task["not_before"] or 0) - time.time()) + 0.01)
    deadline = time.monotonic() + timeout
    for _ in range(50):
        report = dispatch(fleet)
        if report["launched"] or time.monotonic() > deadline:
            return report["launched"]
        time.sleep(0.1)
    return []


# ---------------------------------------------------------------------------------------------- 5. broken hosts


def _refused(sshd, tmp_path: Path, stack: ExitStack) -> dict:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return {"ssh_port": s.getsockname()[1]}


def _wrong_key(sshd, tmp_path: Path, stack: ExitStack) -> dict:
    return {"ssh_key_path": other_key(tmp_path, "stranger")}


def _changed_host_key(sshd, tmp_path: Path, stack: ExitStack) -> dict:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line(other_key(tmp_path, "impostor_host_key") + ".pub"))
    return {"known_hosts": str(known_hosts)}


def _silent(sshd, tmp_path: Path, stack: ExitStack) -> dict:
    return {"ssh_port": stack.enter_context(SilentHost()).port}


BROKEN = {
    "refused": (_refused, ("connection refused",)),
    "wrong key": (_wrong_key, ("authentication failed with the key",)),
    "changed host key": (_changed_host_key, ("the host key changed, refusing to connect",)),
    "silent": (_silent, ("completed no ssh handshake within 2s", "no ssh banner within 2s")),
}
"""How to break the host, and what the attempt's failure_detail says (one of these, lower-cased)."""


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_host_that_cannot_be_reached_fails_the_launch_is_marked_down_skipped_and_used_again_once_fixed(
    fleet, sshd, api, tmp_path, case
):
    breaks, reasons = BROKEN[case]
    agent = the_agent(tmp_path)
    with ExitStack() as stack:
        configure(fleet, [box(sshd, tmp_path, connect_timeout_secs=2, **breaks(sshd, tmp_path, stack))], agent, api)
        api.start()
        task_id = fleet.create("--title", f"for a host that is broken: {case}")
        done = fleet.run("dispatch", "--json", timeout=60)  # a bound against hanging, not a timing
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        (failed,) = report["failed"]
        assert (failed["task_id"], failed["host_id"], failed["host_down"]) == (task_id, "box-1", True)
        assert report["launched"] == []
        assert "action=host.down host=box-1" in done.stderr and "Traceback" not in done.stderr
        task = fleet.task(task_id)
        assert (task["state"], task["attempt"], task["failure_reason"]) == ("queued", 1, "launch_failed")
        detail = task["failure_detail"]
        assert "(host box-1)" in detail and "127.0.0.1" in detail and any(r in detail.lower() for r in reasons), detail
        assert failed["error"] == detail
        downs = [e for e in fleet.events() if e["type"] == "host.down"]
        assert [e["data"]["host_id"] for e in downs] == ["box-1"] and downs[0]["data"]["error"] == detail
        # the next pass does not try it again, even with the backoff over
        time.sleep(max(0.0, task["not_before"] - time.time()) + 0.01)
        done = fleet.run("dispatch", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        assert "action=host.skipped host=box-1" in done.stderr
        assert json.loads(done.stdout)["planned"] == [] and fleet.task(task_id)["attempt"] == 1
    # fixed (the right port, key or host key): the sweep marks it up and the task runs there
    configure(fleet, [box(sshd, tmp_path, connect_timeout_secs=2)], agent, api)
    assert [(a["action"], a["host"]) for a in sweep(fleet)] == [("host.up", "box-1")]
    launched = dispatch_until_launched(fleet, fleet.task(task_id))
    assert [(p["task_id"], p["attempt"], p["host_id"]) for p in launched] == [(task_id, 2, "box-1")]
    fleet.wait_state(task_id, "completed")
    assert run_record(tmp_path / "box-1" / task_id / "2")["env"]["FLEET_ATTEMPT"] == "2"
    assert [e["type"] for e in fleet.events() if e["type"].startswith("host.")] == ["host.down", "host.up"]
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- 6. quoting

#: Writes what it got into its workspace, byte for byte: the prompt as its last argument (prompt = "arg")
#: and as the file FLEET_PROMPT_FILE names, the env value ODD and its branch; then hands in its receipt.
ECHO = """\
import os, subprocess, sys
got = {"arg": os.fsencode(sys.argv[-1]), "file": open(os.environ["FLEET_PROMPT_FILE"], "rb").read(),
       "odd": os.environb[b"ODD"], "branch": os.environb[b"FLEET_BRANCH"]}
for name, data in got.items():
    with open("got." + name, "wb") as fh:
        fh.write(data)
sys.exit(subprocess.run([sys.executable, "-m", "fleetctl", "task", "complete", os.environ["FLEET_TASK_ID"],
                         "--summary", "echoed"]).returncode)
"""


def test_hostile_ids_prompts_and_env_values_reach_the_host_byte_for_byte_and_never_a_shell(fleet, sshd, api, tmp_path):
    from fleetctl.prompt import render_prompt

    odd = "$(touch pwned2) `touch pwned2` '; rm -rf ~ ;' \"; touch pwned2\" \\ $HOME\nline two"
    echo = agent_type("{python}", script(tmp_path, "echo.py", ECHO), prompt="arg", env={"ODD": odd})
    configure(fleet, [box(sshd, tmp_path)], {"agent": echo}, api)
    api.start()
    refused = fleet.run("task", "create", "--title", "x", "--id", "x$(touch pwned);y")
    assert refused.returncode == 2 and "invalid task id" in refused.stderr
    title = "$(touch pwned) '; rm -rf ~ ;' `touch pwned` \"; touch pwned\""
    task_id = fleet.create("--id", "odd.id_-x1", "--title", title, "--body", HOSTILE)
    (launched,) = dispatch(fleet)["launched"]
    assert launched["task_id"] == task_id
    fleet.wait_state(task_id, "completed")
    ws = tmp_path / "box-1" / task_id / "1"
    prompt = render_prompt(fleet.task(task_id), 1).encode()
    assert title.encode() in prompt and HOSTILE.encode() in prompt
    assert (ws / "got.arg").read_bytes() == prompt
    assert (ws / "got.file").read_bytes() == prompt
    assert (ws / "got.odd").read_bytes() == odd.encode()
    assert (ws / "got.branch").read_bytes() == b"fleet/odd.id_-x1"
    assert [t["task_id"] for t in fleet.query("SELECT task_id FROM tasks")] == [task_id]
    home = Path(os.path.expanduser("~"))
    assert not list(tmp_path.rglob("pwned*")), "a shell ran a command from the prompt or the env"
    assert not any((where / name).exists() for where in (home, Path("/")) for name in ("pwned", "pwned2"))
    fleet.check_db()


# ---------------------------------------------------------------------------------------------- 7. config


@pytest.mark.parametrize("removed", ["agent", "host"])
def test_an_agent_removed_from_the_config_gets_no_more_work_and_its_running_task_finishes(
    fleet, sshd, api, tmp_path, removed
):
    gate = tmp_path / "gate"
    leaving, staying = AgentSpec("agent", "box-1.leaving", 1, ("special",)), AgentSpec("agent", "box-1.staying")
    agent = the_agent(tmp_path, gate)
    configure(fleet, [box(sshd, tmp_path, agents=(leaving, staying))], agent, api, orchestrator={"lease_secs": 1})
    api.start()
    first = fleet.create("--title", "special work", "--label", "agent:special")
    (launched,) = dispatch(fleet)["launched"]
    assert (launched["task_id"], launched["agent_id"]) == (first, "box-1.leaving")
    ws = tmp_path / "box-1" / first / "1"
    run_record(ws)

    # the operator removes the agent (or its whole host) from the configuration while its run goes on
    configure(fleet, [box(sshd, tmp_path, agents=(staying,))] if removed == "agent" else [], agent, api,
              orchestrator={"lease_secs": 1})  # fmt: skip
    second = fleet.create("--title", "more special work", "--label", "agent:special")
    report = dispatch(fleet)
    assert report["planned"] == [] and report["launched"] == []
    agents = {a["agent_id"]: a for a in json.loads(fleet.run("agent", "list", "--json").stdout)["items"]}
    assert agents["box-1.leaving"]["status"] == "offline"
    offline = {e["agent_id"]: e["data"]["reason"] for e in fleet.events() if e["type"] == "agent.offline"}
    gone = ["box-1.leaving"] if removed == "agent" else ["box-1.leaving", "box-1.staying"]
    assert offline == dict.fromkeys(gone, "removed from the configuration")
    lease_end = fleet.task(first)["lease_expires_at"]
    time.sleep(max(0.0, (lease_end or 0) - time.time()) + 0.01)
    assert sweep(fleet) == []  # past the lease: a run that is not heard from is not lost for it
    assert fleet.task(first)["state"] == "running"

    gate.touch()
    task = fleet.wait_state(first, "completed", "failed", "queued")
    assert (task["state"], task["attempt"], task["agent_id"]) == ("completed", 1, "box-1.leaving")
    (attempt,) = fleet.attempts(first)
    assert attempt["outcome"] == "completed" and attempt["receipt"]["summary"] == "done on box-1.leaving"
    assert not [e for e in fleet.events() if e["type"] in ("task.failed", "task.requeued")]
    assert sweep(fleet) == [] and dispatch(fleet)["launched"] == []
    assert (fleet.task(second)["state"], fleet.task(second)["attempt"]) == ("queued", 0)
    fleet.check_db()
