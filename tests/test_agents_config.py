"""Agents of the configuration ([[hosts]]) versus the operator's agent commands, through the real CLI."""

from __future__ import annotations


def test_a_config_agent_cannot_be_deregistered_only_drained_and_resumed(fleet):
    fleet.configure()
    assert fleet.run("dispatch").returncode == 0  # registers local-ok from the configuration
    done = fleet.run("agent", "deregister", "local-ok")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "defined in the configuration" in done.stderr and "agent drain local-ok" in done.stderr
    assert fleet.query("SELECT status FROM agents WHERE agent_id='local-ok'")[0]["status"] == "online"

    assert fleet.run("agent", "drain", "local-ok").returncode == 0
    assert fleet.run("dispatch").returncode == 0  # a drained agent of the configuration stays drained
    assert fleet.query("SELECT status FROM agents WHERE agent_id='local-ok'")[0]["status"] == "draining"
    task_id = fleet.create("--title", "waits while drained")
    assert fleet.run("dispatch").returncode == 0
    assert fleet.task(task_id)["state"] == "queued"
    fleet.check_db()


def test_an_operator_deregister_revokes_a_pull_agents_token(fleet):
    fleet.configure()
    done = fleet.run("agent", "register", "puller", "--type", "t", "--json")
    assert done.returncode == 0, done.stderr
    assert fleet.query("SELECT token_hash FROM agents WHERE agent_id='puller'")[0]["token_hash"]
    assert fleet.run("agent", "deregister", "puller").returncode == 0
    row = fleet.query("SELECT status, token_hash FROM agents WHERE agent_id='puller'")[0]
    assert row == {"status": "offline", "token_hash": None}
    fleet.check_db()


def test_the_cli_cannot_take_over_an_agent_of_the_configuration(fleet):
    fleet.configure()
    assert fleet.run("dispatch").returncode == 0
    done = fleet.run("agent", "register", "local-ok", "--type", "t")
    assert done.returncode == 4 and "defined in the configuration" in done.stderr, done.stdout + done.stderr
    row = fleet.query("SELECT mode, token_hash FROM agents WHERE agent_id='local-ok'")[0]
    assert row == {"mode": "ssh_cli", "token_hash": None}
