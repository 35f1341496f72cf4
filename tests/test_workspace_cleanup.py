"""Workspace cleanup (issue 8): the sweep removes the workspaces of settled attempts after
``orchestrator.workspace_retention_secs``, oldest first and a bounded batch a pass, on local and SSH hosts,
and never a workspace whose run still lives; ``task show`` says where each workspace is, or that it went.

Real runs (dispatched by the real pass, detached with ``setsid -f``), real executors (a real sshd on
127.0.0.1 for the SSH host), a real SQLite file. Time moves by the passes' ``now=``: the runs end when
they end, and the sweep is told it is days later. Every run a test starts is reaped by process group
(the ``write_config`` fixture).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomlkit
from conftest import COMPLETE_SCRIPT, REPO_ROOT, pid_alive, wait_for

from fleetctl import passes, services
from fleetctl.cli import app
from fleetctl.config import Config, load_config
from fleetctl.store import Store

DAY = 86400.0
RETENTION = 3 * DAY  # the default

#: Hands in its receipt, then goes on running until the file "go" appears in its workspace (bounded).
LINGERS = COMPLETE_SCRIPT.replace("sys.exit(", "code = (") + (
    "; import time; n = 0\nwhile not os.path.exists('go') and n < 1200: time.sleep(0.05); n += 1\nsys.exit(code)"
)

#: Waits (bounded) for the file "go" in its workspace, then exits 0.
GATED = ["sh", "-c", 'n=0; while [ ! -e go ] && [ "$n" -lt 1200 ]; do sleep 0.05; n=$((n+1)); done']

#: The runs import this checkout, whatever an editable install points at (run_env drops PYTHONPATH).
RUN_ENV = {"PYTHONPATH": str(REPO_ROOT)}


def local_config(write_config, **orchestrator) -> Path:
    """One local host (work_dir tmp_path/ws) with an agent whose run hands in its receipt and exits, and one
    whose run hands it in and lingers until its workspace has a file "go"."""
    agents = [{"agent_type": "done", "agent_id": "local-done", "max_concurrency": 4, "capabilities": ["done"]},
              {"agent_type": "lingers", "agent_id": "local-lingers", "max_concurrency": 4,
               "capabilities": ["linger"]}]  # fmt: skip
    types = {"done": {"command": ["{python}", "-c", COMPLETE_SCRIPT], "prompt": "file", "env": RUN_ENV},
             "lingers": {"command": ["{python}", "-c", LINGERS], "prompt": "file", "env": RUN_ENV}}  # fmt: skip
    return write_config(orchestrator=orchestrator, agents=agents, agent_types=types)


@contextmanager
def local_fleet(write_config, **orchestrator) -> Iterator[tuple[Path, Config, Store]]:
    """``local_config``: its path, the loaded configuration and the open store."""
    config = local_config(write_config, **orchestrator)
    cfg = load_config(config)
    with Store.open(cfg.orchestrator.db_path) as store:
        yield config, cfg, store


def ssh_config(write_config, tmp_path: Path, sshd, *, port: int | None = None, name: str = "config.toml") -> Path:
    """No local agents; one SSH host ``box`` (the test sshd, or a refused ``port``) with a gated agent."""
    path = write_config(agents=[], name=name)
    doc = tomlkit.parse(path.read_text())
    doc["hosts"].append({"host_id": "box", "hostname": sshd.host, "ssh_user": sshd.user,
                         "ssh_port": port or sshd.port, "ssh_key_path": sshd.key_path,
                         "known_hosts": sshd.known_hosts, "connect_timeout_secs": 5,
                         "work_dir": str(tmp_path / "remote"),
                         "agents": [{"agent_type": "gated", "agent_id": "box-gated", "max_concurrency": 4}]})  # fmt: skip
    doc["agent_types"] = {"gated": {"command": GATED, "prompt": "stdin"}}
    path.write_text(tomlkit.dumps(doc))
    return path


def run_to_the_end(store: Store, cfg, title: str, agent: str = "done") -> dict:
    """Create a task for the ``done`` (or ``linger``) agent, dispatch it (the one launch of this pass) and
    wait until its receipt is in (and a ``done`` run has exited); its first attempt's row."""
    task = services.create_task(store, cfg.orchestrator, title=title, labels=[f"agent:{agent}"])
    report = passes.dispatch(store, cfg)
    assert [x["task_id"] for x in report.launched] == [task["task_id"]], report.to_json()
    wait_for(lambda: store.task(task["task_id"])["state"] == "completed", what=f"{title} to complete")
    attempt = store.attempt(task["task_id"], 1)
    if agent == "done":  # the receipt is in a moment before the run has exited
        run_over(attempt["workspace"])
    return attempt


def run_over(workspace: str) -> None:
    """Wait until the run in ``workspace`` is over: its exit status written and its wrapper gone (a local
    wrapper reports the end with ``fleetctl task run-ended`` after writing the status)."""
    meta = Path(workspace, ".fleet")
    wait_for(lambda: (meta / "exit_status").exists() and not pid_alive(int((meta / "pid").read_text())),
             what=f"the run in {workspace} to be over")  # fmt: skip


def sweep_at(store: Store, cfg, when: float) -> list[dict]:
    """One sweep pass that believes it is ``when``; its workspace.cleaned actions."""
    report = passes.sweep(store, cfg, now=lambda: when)
    return [a for a in report.actions if a["action"] == "workspace.cleaned"]


def shown(runner, config: Path, task_id: str) -> dict:
    result = runner.invoke(app, ["--config", str(config), "task", "show", task_id, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def db_check(runner, config: Path) -> None:
    result = runner.invoke(app, ["--config", str(config), "db", "check"])
    assert result.exit_code == 0, result.output


def test_settled_workspaces_go_after_the_retention_oldest_first_a_bounded_batch_a_pass(write_config, runner,
                                                                                      monkeypatch):  # fmt: skip
    with local_fleet(write_config) as (config, cfg, store):
        old = [run_to_the_end(store, cfg, f"task {n}") for n in range(3)]
        newest = run_to_the_end(store, cfg, "the newest")
        assert [a["ended_at"] for a in old] == sorted(a["ended_at"] for a in old) < [newest["ended_at"]] * 3
        for a in (*old, newest):
            assert Path(a["workspace"], ".fleet", "exit_status").exists() and a["host_id"] == "local"

        # before the retention is over for any of them: nothing goes
        assert sweep_at(store, cfg, old[0]["ended_at"] + RETENTION - 1) == []
        # the three old ones are due, the newest is not; two a pass, oldest first
        monkeypatch.setattr(passes, "CLEAN_BATCH", 2)
        when = (old[-1]["ended_at"] + newest["ended_at"]) / 2 + RETENTION
        first = sweep_at(store, cfg, when)
        assert [(c["task"], c["attempt"], c["host"]) for c in first] == [(a["task_id"], 1, "local") for a in old[:2]]
        assert [Path(a["workspace"]).exists() for a in (*old, newest)] == [False, False, True, True]
        assert not Path(old[0]["workspace"]).parent.exists()  # the task directory went with its only attempt
        assert [c["task"] for c in sweep_at(store, cfg, when)] == [old[2]["task_id"]]
        assert sweep_at(store, cfg, when) == [] and Path(newest["workspace"]).exists()

    for a in old:
        doc = shown(runner, config, a["task_id"])["attempts"][0]
        assert doc["workspace"] == a["workspace"] and doc["workspace_cleaned_at"].startswith(
            time.strftime("%Y-%m-%dT", time.gmtime(when))
        )
    assert shown(runner, config, newest["task_id"])["attempts"][0]["workspace_cleaned_at"] is None
    human = runner.invoke(app, ["--config", str(config), "task", "show", old[0]["task_id"]])
    assert "(cleaned " in human.stdout and "removed local:" in human.stdout
    human = runner.invoke(app, ["--config", str(config), "task", "show", newest["task_id"]])
    assert f"local:{newest['workspace']}" in human.stdout
    db_check(runner, config)


def test_a_retention_of_0_keeps_every_workspace(write_config, runner):
    with local_fleet(write_config, workspace_retention_secs=0) as (config, cfg, store):
        attempt = run_to_the_end(store, cfg, "kept for good")
        assert sweep_at(store, cfg, attempt["ended_at"] + 365 * DAY) == []
        assert Path(attempt["workspace"], ".fleet").is_dir()
    db_check(runner, config)


def test_the_workspace_of_a_settled_attempt_whose_run_lives_on_is_never_removed(write_config, runner, monkeypatch):
    """The run handed in its receipt (the attempt is settled) and goes on running: its workspace stays, and
    with a batch of one it does not hold up the workspace behind it."""
    monkeypatch.setattr(passes, "CLEAN_BATCH", 1)
    with local_fleet(write_config) as (config, cfg, store):
        lives = run_to_the_end(store, cfg, "lingers after its receipt", "linger")
        done = run_to_the_end(store, cfg, "done")
        assert lives["ended_at"] < done["ended_at"]
        when = done["ended_at"] + RETENTION + 1
        assert sweep_at(store, cfg, when) == []  # the oldest: its run lives
        assert Path(lives["workspace"], ".fleet", "pid").exists()
        assert [c["task"] for c in sweep_at(store, cfg, when)] == [done["task_id"]]  # the next one is not held up
        for _ in range(2):  # around again: still alive, still kept
            assert sweep_at(store, cfg, when) == []
        assert store.attempt(lives["task_id"], 1)["workspace_cleaned_at"] is None
        assert Path(lives["workspace"], ".fleet", "pid").exists()

        Path(lives["workspace"], "go").touch()  # the run ends
        run_over(lives["workspace"])
        assert [c["task"] for c in sweep_at(store, cfg, when)] == [lives["task_id"]]
        assert not Path(lives["workspace"]).exists()
    assert shown(runner, config, lives["task_id"])["attempts"][0]["workspace_cleaned_at"] is not None
    db_check(runner, config)


def test_a_workspace_path_that_is_not_the_attempts_own_is_left_alone(write_config, runner):
    """Defence in depth: the database names the path of another attempt (the executor would take it)."""
    with local_fleet(write_config) as (config, cfg, store):
        first = run_to_the_end(store, cfg, "first")
        second = run_to_the_end(store, cfg, "second")
        store.execute("UPDATE attempts SET workspace=? WHERE task_id=?", (first["workspace"], second["task_id"]))
        assert [c["task"] for c in sweep_at(store, cfg, second["ended_at"] + RETENTION + 1)] == [first["task_id"]]
        assert Path(second["workspace"]).exists()  # neither its own path (not recorded) nor the first's
        assert store.attempt(second["task_id"], 1)["workspace_cleaned_at"] is None


def test_on_an_ssh_host_settled_workspaces_go_a_live_one_stays_and_an_unreachable_host_is_marked_down(
    write_config, tmp_path, runner, sshd
):  # fmt: skip
    config = ssh_config(write_config, tmp_path, sshd)
    cfg = load_config(config)
    with Store.open(cfg.orchestrator.db_path) as store:
        ended = services.create_task(store, cfg.orchestrator, title="ends, settled by the sweep's probe")
        lives = services.create_task(store, cfg.orchestrator, title="hands in its receipt over the API, runs on")
        report = passes.dispatch(store, cfg)
        assert {x["task_id"] for x in report.launched} == {ended["task_id"], lives["task_id"]}, report.to_json()
        ws = {x["task_id"]: x["workspace"] for x in report.launched}
        assert all(w.startswith(str(tmp_path / "remote")) for w in ws.values())
        # the one run ends (exit 0, no receipt: settled no_receipt by the sweep); the other hands in its
        # receipt (what the API does for it) and runs on
        Path(ws[ended["task_id"]], "go").touch()
        services.complete_task(store, cfg, lives["task_id"], {"summary": "done, but still running"},
                               agent_id="box-gated", attempt=1)  # fmt: skip
        run_over(ws[ended["task_id"]])
        passes.sweep(store, cfg)
        settled = store.attempt(ended["task_id"], 1)
        assert settled["failure_reason"] == "no_receipt" and settled["host_id"] == "box"
        assert store.attempt(lives["task_id"], 1)["ended_at"] is not None

        when = max(a["ended_at"] for a in store.workspaces_to_clean(time.time() + 1)) + RETENTION + 1
        cleaned = sweep_at(store, cfg, when)
        assert [(c["task"], c["host"]) for c in cleaned] == [(ended["task_id"], "box")]
        assert not Path(ws[ended["task_id"]]).exists() and not Path(ws[ended["task_id"]]).parent.exists()
        assert Path(ws[lives["task_id"]], ".fleet", "pid").exists()  # alive: kept
        assert store.attempt(lives["task_id"], 1)["workspace_cleaned_at"] is None

        # the host stops answering: the cleanup marks it down, and the next pass skips it
        unreachable = load_config(
            ssh_config(write_config, tmp_path, sshd, port=refused_port(), name="unreachable.toml")
        )
        report = passes.sweep(store, unreachable, now=lambda: when)
        assert [a["action"] for a in report.actions] == ["host.down"]
        assert "box" in store.down_hosts()
        report = passes.sweep(store, unreachable, now=lambda: when)
        assert [a["action"] for a in report.actions] == []
        assert Path(ws[lives["task_id"]], ".fleet", "pid").exists()

        # back up (the sweep reaches it again), the run ends: its workspace goes too
        Path(ws[lives["task_id"]], "go").touch()
        run_over(ws[lives["task_id"]])
        report = passes.sweep(store, cfg, now=lambda: when)
        assert [a["action"] for a in report.actions] == ["host.up", "workspace.cleaned"]
        assert not Path(ws[lives["task_id"]]).exists()
        assert list((tmp_path / "remote").iterdir()) == []  # the work_dir itself stays

    doc = shown(runner, config, ended["task_id"])
    assert doc["attempts"][0]["host_id"] == "box" and doc["attempts"][0]["workspace_cleaned_at"] is not None
    db_check(runner, config)


def refused_port() -> int:
    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_agents_attempts_are_not_ours_to_clean(write_config, tmp_path, runner):
    """An attempt claimed over the API has no host; even with a workspace path recorded, the sweep skips it."""
    with local_fleet(write_config) as (config, cfg, store):
        task = services.create_task(store, cfg.orchestrator, title="pulled")
        services.register_agent(store, "puller", agent_type="custom")
        claimed = services.claim_task(store, cfg, {"agent_id": "puller", "capabilities": [], "max_concurrency": 1})
        pulled = tmp_path / "pull-ws" / task["task_id"] / "1"
        (pulled / ".fleet").mkdir(parents=True)
        services.start_task(store, task["task_id"], agent_id="puller", attempt=1, workspace=str(pulled))
        services.complete_task(store, cfg, task["task_id"], {"summary": "ok"}, agent_id="puller", attempt=1)
        assert claimed is not None and store.attempt(task["task_id"], 1)["host_id"] is None
        assert sweep_at(store, cfg, time.time() + 10 * RETENTION) == []
        assert pulled.is_dir()
    db_check(runner, config)


def test_a_pass_over_its_time_budget_starts_no_more_removals_and_the_next_goes_on(write_config, monkeypatch):
    with local_fleet(write_config) as (config, cfg, store):
        attempt = run_to_the_end(store, cfg, "one")
        when = attempt["ended_at"] + RETENTION + 1
        monkeypatch.setattr(passes, "CLEAN_BUDGET_SECS", -1.0)  # spent before it begins
        assert sweep_at(store, cfg, when) == [] and Path(attempt["workspace"]).exists()
        monkeypatch.undo()
        assert [c["task"] for c in sweep_at(store, cfg, when)] == [attempt["task_id"]]


def test_the_settled_workspaces_query_filters_by_host_and_pages_by_key(store, orch):
    """``Store.workspaces_to_clean``: settled attempts with a workspace not yet cleaned, by (ended_at, task_id,
    attempt); ``hosts`` and ``after`` narrow it (the sweep's cursor)."""
    from conftest import config_of

    cfg = config_of(orch)
    services.register_agent(store, "a1", agent_type="t", max_concurrency=10)
    agent = {"agent_id": "a1", "capabilities": [], "max_concurrency": 10}
    rows = []
    for n, host in enumerate(["h1", "h2", "h1", None]):
        task = services.create_task(store, orch, title=f"t{n}", now=100.0 + n)
        services.claim_task(store, cfg, agent, task_id=task["task_id"], host_id=host, now=200.0 + n)
        services.start_task(store, task["task_id"], attempt=1, workspace=f"/w/{task['task_id']}/1", now=300.0 + n)
        services.complete_task(store, cfg, task["task_id"], {"summary": "ok"}, attempt=1, now=400.0 + n)
        rows.append((400.0 + n, task["task_id"], 1))

    def keys(found: list[dict]) -> list[tuple]:
        return [(r["ended_at"], r["task_id"], r["attempt"]) for r in found]

    assert keys(store.workspaces_to_clean(500.0)) == rows
    assert keys(store.workspaces_to_clean(402.0)) == rows[:2]
    assert keys(store.workspaces_to_clean(500.0, hosts=["h1"])) == [rows[0], rows[2]]
    assert keys(store.workspaces_to_clean(500.0, hosts=["h1", "h2"], after=rows[0])) == rows[1:3]
    assert keys(store.workspaces_to_clean(500.0, 1, after=rows[1])) == [rows[2]]
    assert services.workspace_cleaned(store, rows[0][1], 1, now=600.0) is True
    assert services.workspace_cleaned(store, rows[0][1], 1, now=601.0) is False  # once
    assert keys(store.workspaces_to_clean(500.0, hosts=["h1"])) == [rows[2]]
    assert store.attempt(rows[0][1], 1)["workspace_cleaned_at"] == 600.0
