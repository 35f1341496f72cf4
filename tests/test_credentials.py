"""Secrets as systemd credentials (SPEC §4, §10): a ``*_file`` is read when a command needs it, not when the
config loads, and may name ``${CREDENTIALS_DIRECTORY}``, which systemd sets only inside a unit that loads
credentials. So one config file serves every unit and every operator command: a credential that exists only
inside one unit does not break a command that does not need it, and a command that does need it says
exactly what is missing and how to give it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleetctl import config as C

REPO = "acme/widgets"


@pytest.fixture
def credentialed(fleet, forgejo, tmp_path):
    """The fleet's config with every secret named as a credential; two units' credential directories: the
    sweep's (only the Forgejo token) and serve's (only the admin token)."""
    fleet.configure(
        server={"admin_token_file": "${CREDENTIALS_DIRECTORY}/admin-token"},
        forgejo={"url": forgejo.url, "repositories": [REPO], "token_file": "${CREDENTIALS_DIRECTORY}/forgejo-token",
                 "webhook_secret_file": "${CREDENTIALS_DIRECTORY}/webhook-secret"},
    )  # fmt: skip
    units = {}
    for unit, secrets in {"sweep": {"forgejo-token": forgejo.bot_token}, "serve": {"admin-token": "a" * 32}}.items():
        directory = tmp_path / "credentials" / unit
        directory.mkdir(parents=True)
        for name, value in secrets.items():
            (directory / name).write_text(value + "\n")
            (directory / name).chmod(0o600)
        units[unit] = str(directory)
    return units


def test_commands_that_need_no_secret_run_outside_every_unit(fleet, credentialed):
    task = fleet.create("--title", "no secret needed")
    for args in (["task", "list", "--json"], ["task", "show", task], ["dispatch"], ["sweep-timeouts"],
                 ["config", "show", "--json"], ["events"], ["db", "check"]):  # fmt: skip
        done = fleet.run(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert "CREDENTIALS_DIRECTORY" not in done.stderr, (args, done.stderr)
    assert fleet.wait_state(task, "completed", "failed")["state"] == "completed"  # a local run reloads the config


def test_config_check_outside_the_units_warns_instead_of_failing(fleet, credentialed):
    done = fleet.run("config", "check")
    assert done.returncode == 0, done.stderr
    assert "forgejo.token_file: token_file = '${CREDENTIALS_DIRECTORY}/forgejo-token' names $CREDENTIALS_DIRECTORY, " \
           "which is not set in this process" in done.stderr  # fmt: skip


def test_a_command_that_needs_the_secret_says_how_to_give_it(fleet, credentialed):
    done = fleet.run("sync")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "forgejo.token_file" in done.stderr and "LoadCredential=" in done.stderr
    assert "FLEET_FORGEJO_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_each_unit_sees_its_own_credentials_only(fleet, forgejo, credentialed):
    forgejo.open_issue(REPO, "Labelled", labels=["agent:code"])
    # the sweep's directory has the Forgejo token and nothing else: sync (which needs only that) works
    done = fleet.run("sync", "--json", env={"CREDENTIALS_DIRECTORY": credentialed["sweep"]})
    assert done.returncode == 0, done.stderr
    assert fleet.query("SELECT count(*) AS n FROM tasks WHERE repo=?", (REPO,))[0]["n"] == 1
    # serve's directory lacks the webhook secret that serve needs with Forgejo configured: a clear exit 2
    serve = subprocess.run([sys.executable, "-m", "fleetctl", "serve", "--port", "0"], capture_output=True,
                           text=True, cwd=fleet.dir, timeout=60, stdin=subprocess.DEVNULL,
                           env=fleet.env(CREDENTIALS_DIRECTORY=credentialed["serve"]))  # fmt: skip
    assert serve.returncode == 2, serve.stderr
    assert "forgejo.webhook_secret_file: cannot read secret file" in serve.stderr and "webhook-secret" in serve.stderr


def test_a_secret_file_is_not_read_until_needed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nadmin_token_file = "missing"\n[forgejo]\ntoken_file = "${NOT_SET_ANYWHERE}/t"\n')
    path.chmod(0o600)
    cfg = C.load_config(path, env={})  # loads: nothing read yet
    assert C.mask(cfg)["server"] == {**C.mask(cfg)["server"], "admin_token": "***", "admin_token_file": "missing"}
    with pytest.raises(C.ConfigError, match=r"server\.admin_token_file: cannot read secret file .*missing"):
        cfg.server.admin_token  # noqa: B018
    assert not cfg.forgejo.api_ready  # an optional use: simply not at hand
    with pytest.raises(C.ConfigError, match=r"names \$NOT_SET_ANYWHERE, which is not set in this process"):
        cfg.forgejo.token  # noqa: B018
    # the environment still wins, and then the file is never looked at
    assert C.load_config(path, env={"FLEET_API_TOKEN": "from-env"}).server.admin_token == "from-env"


def test_a_secret_file_read_is_kept_for_the_life_of_the_config_only(tmp_path):
    (tmp_path / "tok").write_text("first\n")
    path = tmp_path / "c.toml"
    path.write_text('[server]\nadmin_token_file = "tok"\n')
    cfg = C.load_config(path, env={})
    assert cfg.server.admin_token == "first"
    (tmp_path / "tok").write_text("second\n")
    assert cfg.server.admin_token == "first"  # one value per loaded config: a command sees one token
    assert C.load_config(path, env={}).server.admin_token == "second"  # a reload (serve's restart) sees the new one
