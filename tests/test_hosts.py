"""SSH host health (fleetctl/services/hosts.py and the passes): a host that cannot be reached is marked down
once, skipped, re-checked by the sweep, and its attempts fail ``agent_lost`` only past the heartbeat
threshold. The host here is real: 127.0.0.1 on a port nothing listens on (connection refused at once).
The SSH-server side of the same story (wrong key, changed host key, a silent host, coming back) is in
tests/test_ssh_fleet.py against a real sshd."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
from conftest import config_of

from fleetctl import passes, services
from fleetctl.config import AgentSpec, AgentTypeConfig, HostConfig
from fleetctl.errors import HostUnreachable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cfg(orch, tmp_path):
    key = tmp_path / "id"
    key.write_text("unused: the connection is refused before any key is offered\n")
    host = HostConfig(host_id="h1", hostname="127.0.0.1", ssh_port=closed_port(), ssh_key_path=str(key),
                      known_hosts=str(tmp_path / "known_hosts"), connect_timeout_secs=2, work_dir="/tmp/ws",
                      agents=(AgentSpec(agent_type="t", agent_id="h1.t"),))  # fmt: skip
    orch = replace(orch, heartbeat_interval_secs=60, heartbeat_timeout_threshold=3, task_timeout_secs=10**6)
    return replace(config_of(orch), hosts=(host,), agent_types={"t": AgentTypeConfig(name="t", command=("true",))})


def running_on_h1(store, cfg, now: float) -> str:
    """A task whose attempt runs on h1 (claimed and started as a dispatch that reached the host would)."""
    services.sync_config_agents(store, cfg, now)
    task_id = services.create_task(store, cfg.orchestrator, title="t", now=now)["task_id"]
    agent = {"agent_id": "h1.t", "capabilities": [], "max_concurrency": 1}
    claim = services.claim_task(store, cfg, agent, task_id=task_id, host_id="h1", now=now)
    services.start_task(store, task_id, agent_id="h1.t", attempt=claim.task["attempt"], workspace="/tmp/ws/x/1",
                        now=now)  # fmt: skip
    return task_id


def test_down_and_up_are_events_once_each_and_db_check_replays_them(store):
    assert services.mark_host_down(store, "h1", "refused", now=100.0) is True
    assert services.mark_host_down(store, "h1", "refused again", now=110.0) is False  # no event for "still down"
    assert store.down_hosts()["h1"]["since"] == 100.0 and store.down_hosts()["h1"]["error"] == "refused"
    assert services.mark_host_up(store, "h1", now=200.0) is True
    assert services.mark_host_up(store, "h1", now=210.0) is False
    assert services.mark_host_up(store, "never-down", now=210.0) is False
    assert store.down_hosts() == {} and store.hosts()["h1"]["status"] == "up"
    assert [e["type"] for e in store.events() if e["type"].startswith("host.")] == ["host.down", "host.up"]
    report = store.check()
    assert report.ok, report.problems


def test_the_sweep_marks_an_unreachable_host_down_and_loses_its_attempts_only_past_the_threshold(store, cfg):
    t0 = 1_000_000.0
    task_id = running_on_h1(store, cfg, t0)
    report = passes.sweep(store, cfg, now=lambda: t0 + 5)
    assert [a["action"] for a in report.actions] == ["host.down"]
    assert "refused" in store.down_hosts()["h1"]["error"].lower()
    assert store.task(task_id)["state"] == "running"  # a host down for a moment loses nothing

    limit = 60 * 3
    report = passes.sweep(store, cfg, now=lambda: t0 + 5 + limit - 1)  # re-checked, still down, within the limit
    assert report.actions == [] and store.task(task_id)["state"] == "running"
    report = passes.sweep(store, cfg, now=lambda: t0 + 5 + limit + 1)
    assert [(a["action"], a["task"]) for a in report.actions] == [("task.agent_lost", task_id)]
    task = store.task(task_id)
    assert task["state"] == "queued" and task["failure_reason"] == "agent_lost" and "host h1" in task["failure_detail"]
    assert store.check().ok


def test_dispatch_skips_a_down_host_without_connecting(store, cfg):
    t0 = 1_000_000.0
    services.sync_config_agents(store, cfg, t0)
    task_id = services.create_task(store, cfg.orchestrator, title="t", now=t0)["task_id"]
    services.mark_host_down(store, "h1", "refused", now=t0)
    made = []

    def executor_for(host):
        made.append(host.host_id)
        raise AssertionError("dispatch must not make an executor for a down host")

    report = passes.dispatch(store, cfg, executor_for=executor_for, now=lambda: t0 + 1)
    assert report.planned == [] and made == [] and store.task(task_id)["state"] == "queued"


def test_a_launch_that_cannot_connect_marks_the_host_down_and_stops_claiming_for_it(store, cfg):
    t0 = 1_000_000.0
    host = replace(cfg.hosts[0], agents=(AgentSpec(agent_type="t", agent_id="h1.t", max_concurrency=5),))
    cfg = replace(cfg, hosts=(host,))
    ids = [services.create_task(store, cfg.orchestrator, title=f"t{i}", now=t0)["task_id"] for i in range(3)]
    report = passes.dispatch(store, cfg, now=lambda: t0 + 1)
    assert len(report.failed) == 1 and report.failed[0]["host_down"] is True
    assert len(report.skipped_down) == 2  # planned, but not claimed once the host was found down
    states = sorted((store.task(t)["state"], store.task(t)["attempt"]) for t in ids)
    assert states == [("queued", 0), ("queued", 0), ("queued", 1)]
    assert list(store.down_hosts()) == ["h1"]
    assert store.check().ok


def test_host_unreachable_is_a_remote_error_naming_the_host(cfg):
    from fleetctl.executors.ssh import SshExecutor

    ex = SshExecutor(cfg.hosts[0])
    try:
        with pytest.raises(HostUnreachable) as err:
            ex.check()
    finally:
        ex.close()
    assert "host h1" in err.value.message and err.value.exit_code == 5


def test_a_missing_key_file_is_named_in_the_error(cfg, tmp_path):
    from fleetctl.executors.ssh import SshExecutor

    ex = SshExecutor(replace(cfg.hosts[0], ssh_key_path=str(tmp_path / "no-such-key")))
    try:
        with pytest.raises(HostUnreachable) as err:
            ex.check()
    finally:
        ex.close()
    assert f"the key file {tmp_path / 'no-such-key'} (ssh_key_path) does not exist" in err.value.message
