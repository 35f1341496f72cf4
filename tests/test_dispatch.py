"""Local dispatch end to end (SPEC §2, §8, §12): real ``fleetctl`` processes, real detached runs
(``setsid -f``), real files in tmp_path. Each run is a small Python script configured as an agent type;
the harness (``fleet`` in conftest) kills any run still alive at teardown, by its process group."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

#: Records its FLEET_* environment, waits for a gate file the test creates, then hands in its receipt.
GATED = """\
import json, os, subprocess, sys, time
gate, env_out = sys.argv[1], sys.argv[2]
with open(env_out + ".tmp", "w") as fh:
    json.dump(dict(os.environ), fh)
os.rename(env_out + ".tmp", env_out)
deadline = time.monotonic() + 30
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.02)
done = subprocess.run(["fleetctl", "task", "complete", os.environ["FLEET_TASK_ID"], "--summary", "gated run done"])
sys.exit(done.returncode)
"""

#: Starts a child, writes "own-pid child-pid", then hangs (until a sweep kills the process group).
HANG = """\
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "60"])
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

#: Logs "task attempt" on start (O_APPEND), works for a second, then hands in its receipt.
WORK_A_SECOND = """\
import os, subprocess, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, f"{os.environ['FLEET_TASK_ID']} {os.environ['FLEET_ATTEMPT']}\\n".encode())
time.sleep(1)
sys.exit(subprocess.run(["fleetctl", "task", "complete", os.environ["FLEET_TASK_ID"], "--summary", "ok"]).returncode)
"""


def script(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def one_agent(agent_type: str, command: list[str], *, agent_id: str = "worker", concurrency: int = 1,
              prompt: str = "file") -> dict:  # fmt: skip
    """``configure`` overrides for a single local agent running ``command``."""
    return {
        "agents": [{"agent_type": agent_type, "agent_id": agent_id, "max_concurrency": concurrency}],
        "agent_types": {agent_type: {"command": command, "prompt": prompt}},
    }


def dispatch(fleet, **env: str) -> dict:
    done = fleet.run("dispatch", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def test_dispatch_returns_while_the_run_goes_on_and_the_run_hands_in_its_receipt(fleet, tmp_path):
    gate, env_out = tmp_path / "gate", tmp_path / "env.json"
    fleet.configure(
        **one_agent("gated", ["{python}", script(tmp_path, "gated.py", GATED), str(gate), str(env_out)]),
        forgejo={"url": "http://127.0.0.1:9", "token": "forgejo-admin-secret"},
    )
    task_id = fleet.create("--title", "detached")
    report = dispatch(fleet, FLEET_FORGEJO_TOKEN="env-forgejo-secret", FLEET_MATRIX_TOKEN="matrix-secret")
    # the dispatch process has exited; the run it launched is alive, in its own session, and cannot end
    # before the gate exists — so dispatch did not wait for it
    (launched,) = report["launched"]
    pid = launched["pid"]
    ws = tmp_path / "ws" / task_id / "1"
    assert launched["task_id"] == task_id and launched["workspace"] == str(ws)
    assert fleet.pid_alive(pid) and os.getsid(pid) == pid
    assert int((ws / ".fleet" / "pid").read_text()) == pid and not (ws / ".fleet" / "exit_status").exists()
    assert fleet.task(task_id)["state"] == "running"

    seen = json.loads(fleet.wait_for(lambda: env_out.exists() and env_out.read_text(), what="the run's environment"))
    assert (seen["FLEET_TASK_ID"], seen["FLEET_ATTEMPT"], seen["FLEET_AGENT_ID"]) == (task_id, "1", "worker")
    assert seen["FLEET_BRANCH"] == f"fleet/{task_id}" and seen["FLEET_TASK_TOKEN"]
    assert Path(seen["FLEET_PROMPT_FILE"]).read_text().startswith(f"# Task {task_id} (attempt 1 of 2)")
    for secret in ("forgejo-admin-secret", "env-forgejo-secret", "matrix-secret"):
        assert secret not in json.dumps(seen), "an orchestrator secret reached a run"

    gate.touch()
    task = fleet.wait_state(task_id, "completed")
    assert task["attempt"] == 1 and task["agent_id"] == "worker"
    (attempt,) = fleet.attempts(task_id)
    assert attempt["outcome"] == "completed" and attempt["receipt"]["summary"] == "gated run done"
    assert types(fleet.events(task_id)) == ["task.created", "task.assigned", "task.started", "task.completed"]
    fleet.wait_for(lambda: (ws / ".fleet" / "exit_status").exists(), what="the wrapper to record the exit status")
    assert (ws / ".fleet" / "exit_status").read_text().strip() == "0"
    fleet.wait_for(lambda: not fleet.pid_alive(pid), what="the run to end")
    fleet.check_db()


def test_a_failing_run_is_retried_after_its_backoff_then_the_task_fails(fleet):
    fleet.configure(**one_agent("crash", ["{python}", "-c", "import sys; sys.exit(3)"], prompt="stdin"))
    task_id = fleet.create("--title", "always crashes")
    assert len(dispatch(fleet)["launched"]) == 1
    task = fleet.wait_for(lambda: (t := fleet.task(task_id))["state"] == "queued" and t["attempt"] == 1 and t,
                    what="attempt 1 to fail and be requeued")  # fmt: skip
    assert task["failure_reason"] == "agent_error"
    requeued = [e for e in fleet.events(task_id) if e["type"] == "task.requeued"][0]
    assert requeued["data"]["reason"] == "agent_error"
    assert requeued["data"]["detail"] == "the run exited with status 3"
    assert requeued["ts"] < task["not_before"] <= requeued["ts"] + 0.2  # backoff 0.2 s with jitter: in the future

    not_before = task["not_before"]
    time.sleep(max(0.0, not_before - time.time()) + 0.01)
    assert [p["task_id"] for p in dispatch(fleet)["launched"]] == [task_id]
    task = fleet.wait_state(task_id, "failed")
    assert (task["attempt"], task["failure_reason"]) == (2, "agent_error")
    # (task.started may be missing when a run ends before its dispatch has marked it running: it races)
    events = [e for e in fleet.events(task_id) if e["type"] != "task.started"]
    assert types(events) == ["task.created", "task.assigned", "task.requeued", "task.assigned", "task.failed"]
    assert [e["attempt"] for e in events if e["type"] == "task.assigned"] == [1, 2]
    assert events[3]["ts"] >= not_before == requeued["data"]["not_before"]  # attempt 2 waited for its backoff
    assert events[-1]["data"]["reason"] == "agent_error" and "no attempts left" in events[-1]["data"]["why"]
    assert [(a["outcome"], a["failure_reason"]) for a in fleet.attempts(task_id)] == [("failed", "agent_error")] * 2
    fleet.check_db()


def test_sweep_kills_a_run_over_its_timeout_and_its_children(fleet, tmp_path):
    pids_file = tmp_path / "pids"
    fleet.configure(**one_agent("hang", ["{python}", script(tmp_path, "hang.py", HANG), str(pids_file)]))
    task_id = fleet.create("--title", "hangs", "--label", "timeout:1", "--label", "retries:0")
    (launched,) = dispatch(fleet)["launched"]
    own, child = map(int, fleet.wait_for(lambda: pids_file.exists() and pids_file.read_text()).split())
    group = [launched["pid"], own, child]
    assert all(fleet.pid_alive(p) for p in group) and {os.getpgid(p) for p in group} == {launched["pid"]}

    actions: list[dict] = []
    deadline = time.monotonic() + 20
    while fleet.task(task_id)["state"] == "running":  # sweep until the 1 s timeout has passed
        assert time.monotonic() < deadline, "no sweep timed the run out"
        done = fleet.run("sweep-timeouts", "--json")
        assert done.returncode == 0, done.stderr
        actions += json.loads(done.stdout)["actions"]
        if not actions:
            time.sleep(0.2)
    assert [a["action"] for a in actions] == ["task.timeout"] and actions[0]["killed"] is True
    assert not any(fleet.pid_alive(p) for p in group), "the run's process group survived the timeout"
    task = fleet.task(task_id)
    assert (task["state"], task["failure_reason"]) == ("failed", "timeout")
    assert "over the 1s timeout; run killed" in task["failure_detail"]
    assert json.loads(fleet.run("sweep-timeouts", "--json").stdout)["actions"] == []  # settled once
    fleet.check_db()


def test_overlapping_dispatch_passes_never_exceed_max_concurrency(fleet, tmp_path):
    from fleetctl import services
    from fleetctl.config import load_config
    from fleetctl.store import Store

    runs_log = tmp_path / "runs.log"
    fleet.configure(**one_agent("work", ["{python}", script(tmp_path, "work.py", WORK_A_SECOND), str(runs_log)],
                                agent_id="busy", concurrency=2))  # fmt: skip
    cfg = load_config(fleet.config)
    with Store.open(fleet.db) as store:
        ids = [services.create_task(store, cfg.orchestrator, title=f"task {i}")["task_id"] for i in range(30)]

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rows = fleet.query(
                "SELECT count(*) AS n FROM tasks WHERE agent_id='busy' AND state IN ('assigned','running')"
            )
            samples.append(rows[0]["n"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reports = []
    try:
        deadline = time.monotonic() + 30
        while sum(len(r["launched"]) for r in reports) < 10:  # rounds of four passes at once
            assert time.monotonic() < deadline, "dispatch made no progress"
            procs = [fleet.popen("dispatch", "--json") for _ in range(4)]
            for proc in procs:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                reports.append(json.loads(out))
        fleet.wait_for(
            lambda: fleet.query("SELECT count(*) AS n FROM tasks WHERE state IN ('assigned','running')")[0]["n"] == 0,
            what="the runs in flight to finish",
        )
    finally:
        stop.set()
        sampler.join()

    assert samples and max(samples) <= 2, f"more than max_concurrency=2 in flight: {max(samples)}"
    # the same from the event log: replay who held what, event by event
    held: dict[str, str] = {}
    peak = 0
    for ev in fleet.events():
        if ev["task_id"] is None:
            continue
        if ev["type"] == "task.assigned":
            held[ev["task_id"]] = ev["agent_id"]
        elif ev["type"] not in ("task.started", "task.progress"):
            held.pop(ev["task_id"], None)
        peak = max(peak, sum(1 for a in held.values() if a == "busy"))
    assert peak == 2
    launched = [p["task_id"] for r in reports for p in r["launched"]]
    assert len(launched) == len(set(launched)) >= 10 and all(not r["failed"] for r in reports)
    runs = runs_log.read_text().split("\n")[:-1]
    assert len(runs) == len(set(runs)) == len(launched), "an attempt ran twice"
    for task_id in ids:
        events = fleet.events(task_id)
        assigned = [e["attempt"] for e in events if e["type"] == "task.assigned"]
        assert assigned == ([1] if task_id in launched else []), (task_id, types(events))
        if task_id in launched:
            assert types(events) == ["task.created", "task.assigned", "task.started", "task.completed"]
            assert f"{task_id} 1" in runs
    fleet.check_db()


def test_the_example_agent_fails_once_then_succeeds_on_retry(fleet, tmp_path):
    fleet.configure(agents=[{"agent_type": "example", "agent_id": "ex"}], agent_types={})
    task_id = fleet.create("--title", "flaky on purpose", "--body", "Please do the thing.\nfail-attempts: 1\n")
    assert len(dispatch(fleet)["launched"]) == 1
    task = fleet.wait_for(lambda: (t := fleet.task(task_id))["state"] == "queued" and t["attempt"] == 1 and t,
                    what="attempt 1 to fail")  # fmt: skip
    assert task["failure_reason"] == "agent_error" and task["failure_detail"] == "the run exited with status 3"
    time.sleep(max(0.0, task["not_before"] - time.time()) + 0.01)
    assert len(dispatch(fleet)["launched"]) == 1
    task = fleet.wait_state(task_id, "completed")
    first, second = fleet.attempts(task_id)
    assert (first["outcome"], first["failure_reason"]) == ("failed", "agent_error")
    assert second["outcome"] == "completed" and second["receipt"]["summary"].endswith("wrote NOTES.md")
    progress = [e["data"]["message"] for e in fleet.events(task_id) if e["type"] == "task.progress"]
    assert progress == ["example agent working (attempt 1)", "example agent working (attempt 2)"]
    assert (tmp_path / "ws" / task_id / "2" / "NOTES.md").exists()
    assert not (tmp_path / "ws" / task_id / "1" / "NOTES.md").exists()
    fleet.check_db()


def test_a_run_that_exits_0_without_a_receipt_fails_no_receipt(fleet):
    fleet.configure(**one_agent("silent", ["true"], prompt="stdin"))
    task_id = fleet.create("--title", "forgets its receipt", "--label", "retries:0")
    assert len(dispatch(fleet)["launched"]) == 1
    task = fleet.wait_state(task_id, "failed")
    assert task["failure_reason"] == "no_receipt"
    assert task["failure_detail"] == "the run exited 0 without handing in a receipt"
    failed = fleet.events(task_id)[-1]
    assert failed["type"] == "task.failed" and failed["data"]["reason"] == "no_receipt"
    fleet.check_db()


def test_a_command_that_does_not_exist_fails_its_attempt_as_launch_failed(fleet):
    fleet.configure(**one_agent("missing", ["/nonexistent/agent-binary"], prompt="stdin"))
    task_id = fleet.create("--title", "no such binary", "--label", "retries:0")
    report = dispatch(fleet)
    # the wrapper starts (so the launch itself is confirmed); the shell then answers 127: it never ran
    assert len(report["launched"]) == 1
    task = fleet.wait_state(task_id, "failed")
    assert task["failure_reason"] == "launch_failed"
    assert task["failure_detail"].startswith("the agent command could not be started (exit 127)")


def test_an_unreachable_ssh_host_fails_the_launch_is_marked_down_and_skipped_while_others_work(fleet, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp_path / "id_test"
    key.write_text("not a key\n")
    key.chmod(0o600)
    config = fleet.configure()
    config.write_text(config.read_text() + f'\n[[hosts]]\nhost_id = "remote1"\nhostname = "127.0.0.1"\nssh_port = {port}\n'
                      f'ssh_key_path = "{key}"\nconnect_timeout_secs = 2\n'
                      'agents = [{ agent_type = "ok", agent_id = "remote-ok", capabilities = ["gpu"] }]\n')  # fmt: skip
    gpu = fleet.create("--title", "needs the remote host", "--label", "agent:gpu")
    plain = fleet.create("--title", "anyone can do this")
    done = fleet.run("dispatch", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [f["task_id"] for f in report["failed"]] == [gpu] and report["failed"][0]["host_down"] is True
    assert "refused" in report["failed"][0]["error"].lower() and "remote1" in report["failed"][0]["error"]
    assert "action=host.down host=remote1" in done.stderr and "Traceback" not in done.stderr
    task = fleet.task(gpu)
    assert task["state"] == "queued" and task["failure_reason"] == "launch_failed" and task["attempt"] == 1
    events = [e["type"] for e in fleet.events()]
    assert events.count("host.down") == 1
    fleet.wait_state(plain, "completed")
    # the next pass does not try the host again: it is skipped until the sweep reaches it
    done = fleet.run("dispatch", "--json")
    assert done.returncode == 0, done.stderr
    assert "action=host.skipped host=remote1" in done.stderr
    assert json.loads(done.stdout)["failed"] == [] and fleet.task(gpu)["attempt"] == 1
    agents = {a["agent_id"]: a for a in json.loads(fleet.run("agent", "list", "--json").stdout)["items"]}
    assert agents["remote-ok"]["host_status"] == "down" and agents["remote-ok"]["status"] == "online"
    assert all(a["host_status"] == "up" for k, a in agents.items() if k != "remote-ok")
    assert "remote1 (down)" in fleet.run("agent", "list").stdout
    check = fleet.run("config", "check")  # and config check says why it cannot work
    assert check.returncode == 2 and "hosts.remote1.known_hosts" in check.stderr and "Traceback" not in check.stderr
    fleet.check_db()


def test_a_dry_run_plans_on_the_agents_the_config_makes_and_writes_nothing(fleet):
    """Before any real pass has registered them, a dry run still shows what the pass would do; a drained
    agent stays out, and an agent gone from the config is not planned."""
    fleet.configure(agents=[{"agent_type": "ok", "agent_id": "fresh", "max_concurrency": 1, "capabilities": ["docs"]}])
    task_id = fleet.create("--title", "write docs", "--label", "agent:docs")
    before = fleet.events()
    planned = json.loads(fleet.run("dispatch", "--dry-run", "--json").stdout)["planned"]
    assert planned == [{"task_id": task_id, "agent_id": "fresh"}]
    assert fleet.events() == before and fleet.query("SELECT agent_id FROM agents") == []
    assert fleet.task(task_id)["state"] == "queued"

    assert fleet.run("dispatch", "--limit", "0").returncode == 0  # registers "fresh", launches nothing
    assert fleet.run("agent", "drain", "fresh").returncode == 0
    assert json.loads(fleet.run("dispatch", "--dry-run", "--json").stdout)["planned"] == []
    fleet.configure(agents=[{"agent_type": "ok", "agent_id": "newer", "max_concurrency": 1, "capabilities": ["docs"]}])
    planned = json.loads(fleet.run("dispatch", "--dry-run", "--json").stdout)["planned"]
    assert planned == [{"task_id": task_id, "agent_id": "newer"}]  # "fresh" left the config: not planned
