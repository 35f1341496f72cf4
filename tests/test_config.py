"""Configuration: search order, validation messages, secrets, and the config/init commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fleetctl import config as C
from fleetctl.cli import app
from fleetctl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
runner = CliRunner()

MINIMAL = """\
# my fleet
[orchestrator]
# wall-clock cap
task_timeout_secs = 1800  # half an hour
requirement_prefix = "agent:"

[[hosts]]
host_id = "local"
local = true
agents = [{ agent_type = "example", capabilities = ["docs"] }]
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def fleet(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


# ------------------------------------------------------------------------------------- search order


def test_embedded_default_when_no_file(tmp_path):
    cfg = C.load_config()
    assert cfg.path is None
    assert cfg.orchestrator.db_path == tmp_path / "fleet.db"  # FLEETCTL_HOME is tmp_path (conftest)
    assert [a.agent_id for _, a in cfg.agent_specs()] == ["local.example"]
    assert cfg.forgejo.url is None and cfg.matrix.homeserver is None


def test_search_order(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg-config" / "fleetctl" / "config.toml"
    xdg.parent.mkdir(parents=True)
    write(xdg, "[server]\nport = 1001\n")
    assert C.load_config().server.port == 1001
    write(tmp_path / "config.toml", "[server]\nport = 1002\n")
    assert C.load_config().server.port == 1002
    named = write(tmp_path / "named.toml", "[server]\nport = 1003\n")
    monkeypatch.setenv("FLEET_CONFIG", str(named))
    assert C.load_config().server.port == 1003
    explicit = write(tmp_path / "explicit.toml", "[server]\nport = 1004\n")
    assert C.load_config(explicit).server.port == 1004
    assert C.load_config(explicit).path == explicit


def test_search_paths_list(tmp_path):
    paths = C.config_search_paths({"XDG_CONFIG_HOME": "/x", "FLEET_CONFIG": "/y/c.toml"})
    assert paths == [
        Path("/y/c.toml"),
        tmp_path / "config.toml",
        Path("/x/fleetctl/config.toml"),
        Path("/etc/fleetctl/config.toml"),
    ]
    assert C.config_search_paths({"HOME": "/home/u"})[1] == Path("/home/u/.config/fleetctl/config.toml")


@pytest.mark.parametrize("how", ["--config", "FLEET_CONFIG"])
def test_named_config_must_exist(how):
    args, env = (["--config", "nope.toml"], None) if how == "--config" else ([], {"FLEET_CONFIG": "nope.toml"})
    result = fleet("config", "check", *args, env=env)
    assert result.exit_code == 2
    assert "nope.toml: config file not found" in result.stderr
    with pytest.raises(ConfigError):
        C.load_config("nope.toml")


# ------------------------------------------------------------------------------------------ loading


def test_example_file_loads_cleanly_and_has_every_key(tmp_path):
    cfg = C.load_config(write(tmp_path / "c.toml", EXAMPLE.read_text()))
    assert cfg.warnings == ()
    assert C.check_config(cfg, serving_webhooks=False) == []
    assert C.check_config(cfg, check_files=True) == []
    with_ssh = C.load_config(
        write(tmp_path / "ssh.toml", EXAMPLE.read_text() + uncomment_ssh_host(EXAMPLE.read_text()))
    )
    assert [h.host_id for h in with_ssh.hosts if not h.is_local] == ["build1"]
    with pytest.raises(ConfigError) as err:  # its SSH host's key and known_hosts are examples, not files here
        C.check_config(replace(with_ssh, hosts=tuple(replace(h, ssh_key_path=str(tmp_path / "nokey"),
                                                              known_hosts=str(tmp_path / "nokh")) for h in with_ssh.hosts)),
                       check_files=True)  # fmt: skip
    assert "hosts.build1.ssh_key_path: cannot read" in err.value.message
    assert "hosts.build1.known_hosts:" in err.value.message and "does not exist" in err.value.message
    raw = tomllib.loads(EXAMPLE.read_text())
    for section, keys in C._SCHEMA.items():
        # per-repository tables are shown commented out (an example repository's limits would apply)
        assert set(keys) - {"repository"} <= set(raw[section]), section
        if "repository" in keys:
            assert f'# [{section}.repository."' in EXAMPLE.read_text(), section
    # the SSH host is commented out (a fresh `config init` must pass `config check`): uncommented, it loads
    ssh = tomllib.loads(uncomment_ssh_host(EXAMPLE.read_text()))["hosts"]
    assert len(ssh) == 1 and ssh[0]["local"] is False
    raw["hosts"] += ssh
    assert set(C._HOST_KEYS) <= {k for h in raw["hosts"] for k in h}
    assert set(C._AGENT_KEYS) <= {k for h in raw["hosts"] for a in h["agents"] for k in a}
    assert set(C._AGENT_TYPE_KEYS) <= {k for t in raw["agent_types"].values() for k in t}
    assert {"codex-cli", "claude-code"} <= set(raw["agent_types"]) and "matrix" in raw
    assert any(h.is_local for h in cfg.hosts)


def uncomment_ssh_host(text: str) -> str:
    """The commented-out ``[[hosts]]`` of the example, uncommented (its prose comments stay comments)."""
    block = text[text.index("# [[hosts]]") : text.index("# [agent_types.NAME]")]
    keyish = re.compile(r"# (\[\[hosts\]\]|[a-z_]+ = |    \{|\]$)")
    return "\n".join(line[2:] if keyish.match(line) else line for line in block.splitlines()) + "\n"


def test_packaged_example_is_the_repo_example():
    assert (REPO / "fleetctl" / "config.example.toml").read_text() == EXAMPLE.read_text()
    assert C.example_text() == EXAMPLE.read_text()


def test_defaults_paths_placeholder_and_builtin_example(tmp_path):
    (tmp_path / "etc").mkdir()
    path = write(
        tmp_path / "etc" / "c.toml",
        '[orchestrator]\ndb_path = "state/f.db"\n'
        '[[hosts]]\nhost_id = "h1"\nhostname = "h1.example.org"\nssh_key_path = "keys/id"\n'
        'agents = [{ agent_type = "py" }, { agent_type = "example", agent_id = "ex1", max_concurrency = 3 }]\n'
        '[agent_types.py]\ncommand = ["{python}", "-m", "agent", "--python={python}"]\nprompt = "arg"\n'
        'env = { A = "1" }\n',
    )
    cfg = C.load_config(path)
    assert cfg.orchestrator.db_path == tmp_path / "etc" / "state" / "f.db"
    host = cfg.host("h1")
    assert host.ssh_key_path == str(tmp_path / "etc" / "keys" / "id") and host.ssh_port == 22
    assert [a.agent_id for a in host.agents] == ["h1.py", "ex1"]
    assert cfg.agent_types["py"].command == (sys.executable, "-m", "agent", f"--python={sys.executable}")
    assert cfg.agent_types["py"].env == {"A": "1"}
    assert cfg.agent_types["example"].command == (sys.executable, "-m", "fleetctl.example_agent")
    assert cfg.agent_types["example"].prompt == "file"
    assert cfg.orchestrator.task_timeout_secs == 1800 and cfg.server.port == 9090


def test_host_id_local_is_local_and_its_relative_work_dir_follows_the_config_file(tmp_path):
    # issue 6: `host_id = "local"` without `local = true` kept work_dir relative to the cwd of each process,
    # and every launch failed after a 10 s wait
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc" / "c.toml", '[[hosts]]\nhost_id = "local"\nwork_dir = "ws"\n'
                 '[[hosts]]\nhost_id = "box"\nlocal = true\nwork_dir = "~/box-ws"\n'
                 '[[hosts]]\nhost_id = "far"\nhostname = "far.example.org"\nwork_dir = "relative/on/far"\n'
                 '[orchestrator]\ndb_path = "state/f.db"\n')  # fmt: skip
    cfg = C.load_config(path)
    local, box, far = cfg.hosts
    assert local.is_local and local.local is True
    assert local.work_dir == str(tmp_path / "etc" / "ws")
    assert box.is_local and box.work_dir == str(Path("~/box-ws").expanduser())
    assert not far.is_local and far.work_dir == "relative/on/far"  # a remote path, not this machine's
    assert cfg.orchestrator.db_path == tmp_path / "etc" / "state" / "f.db"
    shown = fleet("config", "show", "-c", str(path), "--json")
    assert json.loads(shown.stdout)["hosts"][0]["local"] is True


def test_embedded_default_paths_are_under_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETCTL_HOME", "rel-home")  # even a relative FLEETCTL_HOME gives absolute paths
    cfg = C.load_config()
    home = tmp_path / "rel-home"
    assert cfg.orchestrator.db_path == home / "fleet.db"
    assert cfg.hosts[0].is_local and cfg.hosts[0].work_dir == str(home / "workspace")


def test_host_id_local_runs_a_task_from_another_directory(fleet):
    """The same through real processes: config in etc/, commands run from the fleet's directory."""
    etc = fleet.dir / "etc"
    etc.mkdir()
    fleet.configure(name="etc/config.toml")
    text = fleet.config.read_text()
    assert "local = true\n" in text
    fleet.config.write_text(text.replace("local = true\n", ""))
    fleet.db = etc / "fleet.db"
    cfg = ["--config", str(fleet.config)]
    done = fleet.run("task", "create", "--title", "t", *cfg)
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    done = fleet.run("dispatch", *cfg)
    assert done.returncode == 0, done.stderr
    fleet.wait_for(lambda: fleet.run("sweep-timeouts", *cfg).returncode == 0 and fleet.task(task_id)["state"]
                   in ("completed", "failed"), what="the run to end")  # fmt: skip
    assert fleet.task(task_id)["state"] == "completed", fleet.events(task_id)
    assert (etc / "ws" / task_id / "1").is_dir() and not (fleet.dir / "ws").exists()


def test_secs_keys_take_durations(tmp_path):
    path = write(tmp_path / "c.toml", '[orchestrator]\ntask_timeout_secs = "30m"\nlease_secs = "1h30m"\n'
                 'retry_backoff_secs = "0s"\nretry_backoff_max_secs = "2.5m"\nheartbeat_interval_secs = "90s"\n'
                 'dispatch_interval_secs = 15\n[[hosts]]\nhost_id = "h"\nconnect_timeout_secs = "5"\n')  # fmt: skip
    orch = C.load_config(path).orchestrator
    assert (orch.task_timeout_secs, orch.lease_secs, orch.retry_backoff_secs) == (1800, 5400, 0)
    assert (orch.retry_backoff_max_secs, orch.heartbeat_interval_secs, orch.dispatch_interval_secs) == (150, 90, 15)
    assert C.load_config(path).hosts[0].connect_timeout_secs == 5
    assert fleet("config", "set", "-c", str(path), "orchestrator.task_timeout_secs", "2h").exit_code == 0
    assert 'task_timeout_secs = "2h"' in path.read_text()
    assert C.load_config(path).orchestrator.task_timeout_secs == 7200


def test_db_path_default_and_env_override(tmp_path, monkeypatch):
    path = write(tmp_path / "c.toml", "[server]\n")
    assert C.load_config(path).orchestrator.db_path == tmp_path / "fleet.db"
    monkeypatch.setenv("FLEET_DB_PATH", "other/x.db")
    assert C.load_config(path).orchestrator.db_path == tmp_path / "other" / "x.db"
    assert C.load_config().orchestrator.db_path == tmp_path / "other" / "x.db"


# ------------------------------------------------------------------------------------------ secrets


def test_secret_precedence_env_over_file_over_inline(tmp_path):
    secret = write(tmp_path / "token", "from-file\n")
    path = write(tmp_path / "c.toml", '[forgejo]\ntoken = "inline"\n')
    assert C.load_config(path).forgejo.token == "inline"
    write(path, '[forgejo]\ntoken = "inline"\ntoken_file = "token"\n')
    cfg = C.load_config(path, env={})
    assert cfg.forgejo.token == "from-file"
    assert any("both token and token_file" in w for w in cfg.warnings)
    cfg = C.load_config(path, env={"FLEET_FORGEJO_TOKEN": "from-env"})
    assert cfg.forgejo.token == "from-env"
    assert secret.exists()


def test_every_secret_env_var(tmp_path):
    env = {var: f"env-{var}" for var in C.SECRET_ENV}
    cfg = C.load_config(write(tmp_path / "c.toml", ""), env=env)
    assert cfg.server.admin_token == "env-FLEET_API_TOKEN"
    assert cfg.forgejo.token == "env-FLEET_FORGEJO_TOKEN"
    assert cfg.forgejo.webhook_secret == "env-FLEET_WEBHOOK_SECRET"
    assert cfg.matrix.access_token == "env-FLEET_MATRIX_TOKEN"
    assert C.load_config(env=env).server.admin_token == "env-FLEET_API_TOKEN"  # embedded default too


def test_every_secret_file_key(tmp_path):
    lines = []
    for section, keys in C.SECRET_KEYS.items():
        lines.append(f"[{section}]\n")
        for key in keys:
            write(tmp_path / f"{section}.{key}", f"s-{key}\n")
            lines.append(f'{key}_file = "{tmp_path / f"{section}.{key}"}"\n')
    cfg = C.load_config(write(tmp_path / "c.toml", "".join(lines)), env={})
    assert cfg.orchestrator.http_pull_token == "s-http_pull_token"
    assert cfg.matrix.access_token == "s-access_token" and cfg.server.admin_token == "s-admin_token"
    assert cfg.forgejo.token == "s-token" and cfg.forgejo.webhook_secret == "s-webhook_secret"
    assert cfg.warnings == ()


# issue 6: `admin_token = 314159265358979` printed the number; no secret may reach a message, whatever its type
NOT_STRINGS = ["314159265358979", "2.718281828459", "[\"s3cr3t-in-array\"]", "{ k = \"s3cr3t-in-table\" }",
               "1979-05-27T07:32:00", "1979-05-27", "07:32:00.999999"]  # fmt: skip
SECRET_FIELDS = [(section, key) for section, keys in C.SECRET_KEYS.items() for key in keys]


@pytest.mark.parametrize(("section", "key"), SECRET_FIELDS, ids=[f"{s}.{k}" for s, k in SECRET_FIELDS])
def test_config_errors_never_echo_a_secret(tmp_path, section, key):
    for value in NOT_STRINGS:
        path = write(tmp_path / "c.toml", f"[{section}]\n{key} = {value}\n")
        result = fleet("config", "check", "-c", str(path), "--no-webhooks")
        assert result.exit_code == 2, (value, result.output)
        assert f"c.toml:2:1: {section}.{key}: expected a string, got " in result.stderr
        assert "(value not shown)" in result.stderr
        for fragment in ("314159", "718281", "s3cr3t", "1979", "07:32", "999999"):
            assert fragment not in result.output, (value, result.output)
    # a syntax error inside a secret does not quote the offending character either
    path = write(tmp_path / "c.toml", f'[{section}]\n{key} = "abc\x01def"\n')
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 2 and f"{section}.{key}: invalid TOML: Illegal character (not shown)" in result.stderr
    assert "\\x01" not in result.stderr


@pytest.mark.parametrize(("section", "key"), SECRET_FIELDS, ids=[f"{s}.{k}" for s, k in SECRET_FIELDS])
def test_secret_file_errors_never_echo_its_content(tmp_path, section, key):
    cases = {
        "binary": b"s3cr3t-\xff\xfe-s3cr3t\n",  # not UTF-8
        "huge": b"s3cr3t" * (C.SECRET_FILE_MAX_BYTES // 6 + 1),  # over the cap
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        (tmp_path / name).chmod(0o600)
        path = write(tmp_path / "c.toml", f'[{section}]\n{key}_file = "{name}"\n')
        result = fleet("config", "check", "-c", str(path), "--no-webhooks")
        assert result.exit_code == 2, result.output
        assert f"{section}.{key}_file: cannot read secret file {tmp_path / name}: " in result.stderr
        assert "s3cr3t" not in result.output and "\\xff" not in result.output and "0xff" not in result.output


def test_secret_file_problems(tmp_path):
    write(tmp_path / "loose", "abc\n", mode=0o644)
    cfg = C.load_config(write(tmp_path / "c.toml", '[server]\nadmin_token_file = "loose"\n'))
    assert cfg.server.admin_token == "abc"
    warnings = C.check_config(cfg, check_files=True)  # config check and doctor read every secret file
    assert any("readable by group/others" in w and "server.admin_token_file" in w for w in warnings)
    result = fleet("config", "check", "-c", str(write(tmp_path / "c.toml", '[server]\nadmin_token_file = "missing"\n')))
    assert result.exit_code == 2
    assert "c.toml:2:1: server.admin_token_file: cannot read secret file" in result.stderr


def test_config_file_with_secrets_readable_by_others_warns(tmp_path):
    path = write(tmp_path / "c.toml", '[forgejo]\nwebhook_secret = "s3cret"\n', mode=0o644)
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "readable by group/others" in result.stderr
    assert "s3cret" not in result.output
    path.chmod(0o600)
    assert C.load_config(path).warnings == ()


# --------------------------------------------------------------------------------------- validation

ERROR_CASES = [
    # (file text, expected fragments of the message)
    ("[server]\nport = \n", ["c.toml:2:8:", "server.port", "invalid TOML"]),
    ("[server]\nport = 1\nport = 2\n", ["c.toml:3:", "invalid TOML", "Cannot overwrite"]),
    (
        "[orchestrator]\ntask_timeout_sec = 5\n",
        ["c.toml:2:1:", "orchestrator.task_timeout_sec", "did you mean 'task_timeout_secs'?"],
    ),
    ("[matrx]\n", ["c.toml:1:", "matrx", "unknown section", "did you mean 'matrix'?"]),
    (
        "[server]\nbind = '0.0.0.0'\nport = true\n",
        ["c.toml:3:1:", "server.port", "expected an integer, got boolean true"],
    ),
    ('[server]\nport = "80"\n', ["server.port", "expected an integer, got string '80'"]),
    ("[server]\nport = 70000\n", ["c.toml:2:1:", "server.port", "must be <= 65535"]),
    ("[server]\nmetrics_public = 1\n", ["server.metrics_public", "expected a boolean"]),
    ("[orchestrator]\nheartbeat_interval_secs = -5\n", ["orchestrator.heartbeat_interval_secs", "must be > 0, got -5"]),
    ("[orchestrator]\ntask_timeout_secs = 0\n", ["orchestrator.task_timeout_secs", "must be > 0"]),
    ("[orchestrator]\ndefault_max_retries = -1\n", ["orchestrator.default_max_retries", "must be >= 0"]),
    (
        "[orchestrator]\nretry_backoff_secs = 100\nretry_backoff_max_secs = 50\n",
        ["c.toml:3:1:", "must be >= retry_backoff_secs"],
    ),
    ("[orchestrator]\nprompt_template = 'x {'\n", ["orchestrator.prompt_template", "invalid template"]),
    # issue 6: these passed `config check`, then a dequeue claimed the task and answered 500
    (
        "[orchestrator]\nprompt_template = '{0}'\n",
        ["c.toml:2:1: orchestrator.prompt_template: invalid template: positional placeholder {0}"],
    ),
    ("[orchestrator]\nprompt_template = 'do {nope}'\n", ["c.toml:2:1:", "unknown placeholder {nope}"]),
    ("[orchestrator]\nprompt_template = '{title.__class__}'\n", ["c.toml:2:1:", "attribute and index access"]),
    ("[orchestrator]\nprompt_template = '{title[0]}'\n", ["c.toml:2:1:", "attribute and index access"]),
    ("[orchestrator]\nprompt_template = '{title:d}'\n", ["c.toml:2:1:", "unsupported format spec 'd'"]),
    ('[orchestrator]\nprompt_template = """\nline\n{body\n"""\n', ["c.toml:2:1:", "invalid template"]),
    # *_secs take durations (issue 6), and say so when a string is not one
    (
        "[orchestrator]\ntask_timeout_secs = '30 minutes'\n",
        [
            "c.toml:2:1: orchestrator.task_timeout_secs: expected seconds (900) or a duration with units (90s, 30m, 2h, "
            "1h30m), got string '30 minutes'"
        ],
    ),
    ("[orchestrator]\nlease_secs = '0s'\n", ["orchestrator.lease_secs", "must be > 0, got 0"]),
    ("[orchestrator]\nretry_backoff_secs = '-5m'\n", ["orchestrator.retry_backoff_secs", "got string '-5m'"]),
    (
        "[orchestrator]\nretry_backoff_secs = '2m'\nretry_backoff_max_secs = '1m'\n",
        ["c.toml:3:1:", "must be >= retry_backoff_secs (120), got 60"],
    ),
    ("[[hosts]]\nhost_id = 'h'\nconnect_timeout_secs = 'soon'\n", ["hosts[0].connect_timeout_secs", "90s, 30m"]),
    ("[orchestrator]\ntask_timeout_secs = true\n", ["orchestrator.task_timeout_secs", "got boolean true"]),
    # host_id "local" is local; saying otherwise is a contradiction, not a silent choice
    ("[[hosts]]\nhost_id = 'local'\nlocal = false\n", ["c.toml:3:1: hosts[0].local: host_id 'local' always runs"]),
    ("[orchestrator]\nrequirement_prefix = ''\n", ["orchestrator.requirement_prefix", "must not be empty"]),
    ("[forgejo]\nurl = 'forge.example.org'\n", ["forgejo.url", "expected an http:// or https:// URL"]),
    ("[forgejo]\nrepositories = ['nope']\n", ["forgejo.repositories", "owner/name"]),
    ("[matrix]\nevents = ['task failed']\n", ["matrix.events", "event kinds"]),
    ("hosts = 5\n", ["c.toml:1:1:", "hosts", "array of tables"]),
    ("[[hosts]]\nhostname = 'x'\n", ["c.toml:1:", "hosts[0]", "missing required key 'host_id'"]),
    ("[[hosts]]\nhost_id = '../etc'\n", ["c.toml:2:1:", "hosts[0].host_id", "invalid id '../etc'"]),
    (
        "[[hosts]]\nhost_id = 'a'\n[[hosts]]\nhost_id = 'a'\n",
        ["c.toml:4:1:", "hosts[1].host_id", "duplicate host id 'a'"],
    ),
    ("[[hosts]]\nhost_id = 'a'\nssh_port = 0\n", ["hosts[0].ssh_port", "must be >= 1"]),
    (
        "[[hosts]]\nhost_id = 'h'\nagents = [\n  { agent_type = 'example' },\n  { agent_type = 'example' },\n]\n",
        ["c.toml:5:5:", "hosts[0].agents[1].agent_type", "duplicate agent id 'h.example'"],
    ),
    (
        "[[hosts]]\nhost_id = 'h'\nagents = [{ agent_type = 'example', agent_id = 'x' }]\n"
        "[[hosts]]\nhost_id = 'g'\nagents = [{ agent_type = 'example', agent_id = 'x' }]\n",
        ["c.toml:6:", "hosts[1].agents[0].agent_id", "duplicate agent id 'x' (also hosts[0].agents[0])"],
    ),
    (
        "[[hosts]]\nhost_id = 'h'\nagents = [{ agent_type = 'codx' }]\n[agent_types.codex]\ncommand = ['c']\n",
        ["c.toml:3:", "hosts[0].agents[0].agent_type", "no [agent_types.codx] section (did you mean 'codex'?)"],
    ),
    (
        "[[hosts]]\nhost_id = 'h'\nagents = [{ agent_type = 'example', agent_id = 'a b' }]\n",
        ["agent_id", "invalid id 'a b'"],
    ),
    (
        "[[hosts]]\nhost_id = 'h'\nagents = [{ agent_type = 'example', max_concurrency = 0 }]\n",
        ["c.toml:3:", "max_concurrency", "must be >= 1"],
    ),
    (
        "[agent_types.x]\ncommand = ['x']\nprompt = 'stdn'\n",
        ["c.toml:3:1:", "agent_types.x.prompt", "stdin, file, arg", "did you mean 'stdin'?"],
    ),
    ("[agent_types.x]\ncommand = []\n", ["c.toml:2:1:", "agent_types.x.command", "empty command"]),
    ("[agent_types.x]\nprompt = 'arg'\n", ["agent_types.x", "missing required key 'command'"]),
    ("[agent_types.x]\ncommand = ['x']\nenv = { A = 1 }\n", ["agent_types.x.env", "table of strings"]),
]


@pytest.mark.parametrize(("text", "fragments"), ERROR_CASES)
def test_config_errors(tmp_path, text, fragments):
    path = write(tmp_path / "c.toml", text)
    result = fleet("config", "check", "--config", str(path))
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("error: ")
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in result.output


def test_all_errors_reported_at_once(tmp_path):
    path = write(tmp_path / "c.toml", "[server]\nport = -1\nbnid = 'x'\n[orchestrator]\nlease_secs = 0\n")
    with pytest.raises(ConfigError) as info:
        C.load_config(path)
    assert info.value.message.startswith("3 configuration errors:")
    assert len(info.value.details["errors"]) == 3
    lines = [e.split(":")[1] for e in info.value.details["errors"]]
    assert lines == ["2", "3", "5"]  # sorted by position in the file


def test_webhook_listener_with_empty_secret(tmp_path):
    path = write(tmp_path / "c.toml", "[forgejo]\nurl = 'https://forge.example.org'\nrequire_pull_request = false\n"
                 "token = 't'\n")  # fmt: skip
    cfg = C.load_config(path)
    assert C.check_config(cfg, serving_webhooks=False) == []
    with pytest.raises(ConfigError, match="webhook listener with an empty secret"):
        C.check_config(cfg, serving_webhooks=True)
    result = fleet("config", "check", "-c", str(path), "--webhooks")
    assert result.exit_code == 2
    assert "forgejo.webhook_secret: webhook listener with an empty secret" in result.stderr
    # by default, config check checks as serve would: Forgejo configured means a webhook route
    assert fleet("config", "check", "-c", str(path)).exit_code == 2
    assert fleet("config", "check", "-c", str(path), "--no-webhooks").exit_code == 0
    assert fleet("config", "check", "-c", str(path), "--webhooks", env={"FLEET_WEBHOOK_SECRET": "w"}).exit_code == 0


# Forgejo settings that need forgejo.url, and Matrix ones that need matrix.homeserver, are said to be idle; `config
# check` says so instead of letting a configured section look like it does something
@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("[forgejo]\ntoken = 't'\nrepositories = ['acme/api']\n",
         "forgejo.token, forgejo.repositories: set but forgejo.url is not: sync, receipt checks and write-back"),
        ("[forgejo]\nurl = 'https://f.example.org'\nwebhook_secret = 'w'\n",
         "forgejo.token: not set: receipts cannot be checked against pull requests"),
        ("[matrix]\naccess_token = 'a'\nroom_id = '!r:m.example.org'\n",
         "matrix.room_id: set but matrix.homeserver is not: no notifications are sent"),
    ],
)  # fmt: skip
def test_check_warns_about_sections_not_used_yet(tmp_path, text, warning):
    path = write(tmp_path / "c.toml", text)
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: {warning}" in result.stderr
    assert result.stdout == f"ok: {path}\n"
    assert "'t'" not in result.stderr and "'a'" not in result.stderr


def test_config_check_checks_the_webhook_secret_by_default_when_forgejo_is_configured(tmp_path):
    path = write(tmp_path / "c.toml", "[forgejo]\nurl = 'https://f.example.org'\ntoken = 't'\n")
    result = fleet("config", "check", "-c", str(path))
    assert result.exit_code == 2
    assert "forgejo.webhook_secret: webhook listener with an empty secret" in result.stderr
    assert fleet("config", "check", "-c", str(path), env={"FLEET_WEBHOOK_SECRET": "w"}).exit_code == 0


def test_no_not_yet_warning_for_what_is_used_or_unset(tmp_path):
    # forgejo.url (clone URLs in prompts) and require_pull_request take effect; empty keys are not "configured"
    path = write(tmp_path / "c.toml", "[forgejo]\nurl = 'https://f.example.org'\nrequire_pull_request = false\n"
                 "token = 't'\n[matrix]\nhomeserver = ''\n")  # fmt: skip
    assert C.check_config(C.load_config(path), serving_webhooks=False) == []
    assert C.not_used_yet(C.load_config(write(tmp_path / "e.toml", EXAMPLE.read_text()))) == []
    assert C.not_used_yet(C.load_config()) == []


def test_check_ok_output(tmp_path):
    path = write(tmp_path / "c.toml", MINIMAL)
    result = fleet("config", "check", "-c", str(path))
    assert result.exit_code == 0
    assert result.stdout == f"ok: {path}\n"
    assert fleet("config", "check").stdout == "ok: embedded default\n"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]{}=\"'.,# \n_abcdehilmnoprstuvx0123456789-")), max_size=120))
def test_any_text_gives_a_config_or_a_config_error(text):
    try:
        C.load_config_text(text, "/nonexistent/c.toml", env={})
    except ConfigError as exc:
        assert "/nonexistent/c.toml" in exc.message


# ------------------------------------------------------------------------------------- bounded reads


def _fleetctl_with_memory_cap(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fleetctl ARGS`` limited to 1 GiB of address space and 60 s, so an unbounded read fails
    (MemoryError) instead of taking the machine down."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fleetctl", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, preexec_fn=limit, timeout=60)  # fmt: skip


def test_config_from_dev_zero_or_a_fifo_is_refused(tmp_path):
    # issue 6: `--config /dev/zero` read until memory ran out; a FIFO hung on open
    os.mkfifo(tmp_path / "fifo")
    for source, kind in [("/dev/zero", "a character device"), (str(tmp_path / "fifo"), "a FIFO")]:
        done = _fleetctl_with_memory_cap("config", "check", "--config", source, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"error: {source}: cannot read config file: not a regular file ({kind})\n"
    done = _fleetctl_with_memory_cap("config", "check", "--config", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path}: cannot read config file: is a directory\n"


def test_secret_file_from_dev_zero_is_refused(tmp_path):
    path = write(tmp_path / "c.toml", '[server]\nadmin_token_file = "/dev/zero"\n')
    done = _fleetctl_with_memory_cap("config", "check", "--config", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "server.admin_token_file: cannot read secret file /dev/zero: not a regular file (a character device)" in (
        done.stderr
    )


def test_config_file_size_cap(tmp_path):
    assert C.CONFIG_MAX_BYTES == 1 << 20  # documented in docs/configuration.md
    body = "[server]\nport = 9091\n"
    at_cap = body + "#" * (C.CONFIG_MAX_BYTES - len(body) - 1) + "\n"
    assert len(at_cap.encode()) == C.CONFIG_MAX_BYTES
    assert C.load_config(write(tmp_path / "c.toml", at_cap)).server.port == 9091
    path = write(tmp_path / "c.toml", at_cap + "\n")
    result = fleet("config", "check", "-c", str(path))
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: cannot read config file: larger than 1 MiB, the most fleetctl reads\n"
    result = fleet("config", "set", "-c", str(path), "server.port", "1")  # the editor reads through the same cap
    assert result.exit_code == 2 and "larger than 1 MiB" in result.stderr


def test_secret_file_size_cap(tmp_path):
    assert C.SECRET_FILE_MAX_BYTES == 64 << 10  # documented in docs/configuration.md
    write(tmp_path / "tok", "t" * (C.SECRET_FILE_MAX_BYTES - 1) + "\n")
    path = write(tmp_path / "c.toml", '[server]\nadmin_token_file = "tok"\n')
    assert C.load_config(path).server.admin_token == "t" * (C.SECRET_FILE_MAX_BYTES - 1)
    write(tmp_path / "tok", "t" * C.SECRET_FILE_MAX_BYTES + "\n")
    cfg = C.load_config(path)  # read when needed, not at load
    with pytest.raises(ConfigError, match="admin_token_file: cannot read secret file .*: larger than 64 KiB"):
        cfg.server.admin_token  # noqa: B018


# --------------------------------------------------------------------------------------------- show

SECRETS = {
    "admin": "sekrit-admin-1",
    "token": "sekrit-forgejo-2",
    "webhook": "sekrit-webhook-3",
    "pull": "sekrit-pull-4",
    "matrix": "sekrit-matrix-5",
    "urlpass": "sekrit-urlpass-6",
    "envval": "sekrit-envval-7",
}


def test_show_masks_every_secret(tmp_path):
    write(tmp_path / "pull", SECRETS["pull"] + "\n")
    path = write(
        tmp_path / "c.toml",
        f"""[server]\nadmin_token = "{SECRETS["admin"]}"\n[forgejo]\nurl = "https://bot:{SECRETS["urlpass"]}@forge.example.org"
token = "{SECRETS["token"]}"\n[orchestrator]\nhttp_pull_token_file = "pull"\n[matrix]\nhomeserver = "https://m.example.org"
room_id = "!r:example.org"\n[agent_types.x]\ncommand = ["x"]\nenv = {{ API_KEY = "{SECRETS["envval"]}" }}\n""",
    )
    env = {"FLEET_WEBHOOK_SECRET": SECRETS["webhook"], "FLEET_MATRIX_TOKEN": SECRETS["matrix"]}
    for args in ([], ["--json"]):
        result = fleet("config", "show", "-c", str(path), *args, env=env)
        assert result.exit_code == 0, result.output
        for secret in SECRETS.values():
            assert secret not in result.output
        assert "***" in result.stdout
    doc = json.loads(result.stdout)
    assert doc["forgejo"]["token"] == doc["forgejo"]["webhook_secret"] == doc["server"]["admin_token"] == "***"
    assert doc["orchestrator"]["http_pull_token"] == doc["matrix"]["access_token"] == "***"
    assert doc["forgejo"]["url"] == "https://***@forge.example.org"
    assert doc["agent_types"]["x"]["env"] == {"API_KEY": "***"}
    assert doc["orchestrator"]["task_timeout_secs"] == 1800


def test_show_toml_round_trips(tmp_path):
    shown = fleet("config", "show", "-c", str(write(tmp_path / "c.toml", EXAMPLE.read_text())))
    assert shown.exit_code == 0
    again = C.load_config(write(tmp_path / "shown.toml", shown.stdout))
    assert C.mask(again) == C.mask(C.load_config(tmp_path / "c.toml"))


# ---------------------------------------------------------------------------------------------- set


def test_set_keeps_comments_and_order(tmp_path):
    path = write(tmp_path / "config.toml", EXAMPLE.read_text(), mode=0o640)
    before = path.read_text().splitlines()
    result = fleet("config", "set", "orchestrator.task_timeout_secs", "3600")
    assert result.exit_code == 0, result.output
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [("task_timeout_secs = 1800", "task_timeout_secs = 3600")]
    assert C.load_config(path).orchestrator.task_timeout_secs == 3600
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # no temporary file left


def test_set_value_kinds_and_paths(tmp_path):
    path = write(tmp_path / "config.toml", MINIMAL)
    for key, value in [
        ("orchestrator.requirement_prefix", "fleet:"),
        ("forgejo.repositories", '["acme/api", "acme/web"]'),
        ("hosts.local.work_dir", "/srv/work"),
        ("hosts[0].agents[0].max_concurrency", "3"),
        ("hosts.0.agents.example.capabilities", '["docs", "code:python"]'),
        ("matrix.room_id", "!room:example.org"),
        ('agent_types."my.type".command', '["{python}", "-V"]'),
        ("server.metrics_public", "false"),
    ]:
        result = fleet("config", "set", key, value)
        assert result.exit_code == 0, (key, result.output)
    cfg = C.load_config(path)
    assert cfg.orchestrator.requirement_prefix == "fleet:"
    assert cfg.forgejo.repositories == ("acme/api", "acme/web")
    assert cfg.hosts[0].work_dir == "/srv/work"
    assert cfg.hosts[0].agents[0].max_concurrency == 3
    assert cfg.hosts[0].agents[0].capabilities == ("docs", "code:python")
    assert cfg.matrix.room_id == "!room:example.org"
    assert cfg.agent_types["my.type"].command == (sys.executable, "-V")
    assert cfg.server.metrics_public is False
    text = path.read_text()
    assert text.startswith("# my fleet\n") and "# wall-clock cap\n" in text and "# half an hour" in text


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("orchestrator.task_timeout_secs", "-5", "must be > 0"),
        ("orchestrator.task_timeout_secs", "soon", "expected seconds (900) or a duration with units"),
        ("orchestrator.task_timeout_sec", "60", "did you mean 'task_timeout_secs'?"),
        ("server.port", "true", "expected an integer, got boolean true"),
        ("hosts.nohost.work_dir", "/x", "no item with id 'nohost'"),
        ("hosts[3].work_dir", "/x", "out of range"),
        ("orchestrator.task_timeout_secs.x", "1", "is not a table"),
        ("orchestrator..x", "1", "invalid key"),
    ],
)
def test_set_refuses_invalid_results_and_changes_nothing(tmp_path, key, value, fragment):
    path = write(tmp_path / "config.toml", MINIMAL)
    stat = path.stat()
    result = fleet("config", "set", "--", key, value)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert path.read_text() == MINIMAL and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_set_without_a_file_or_on_broken_toml(tmp_path):
    result = fleet("config", "set", "server.port", "8080")
    assert result.exit_code == 2 and "run `fleetctl init` first" in result.stderr
    path = write(tmp_path / "config.toml", "[server]\nport = \n")
    result = fleet("config", "set", "server.port", "8080")
    assert result.exit_code == 2 and "config.toml:2:8" in result.stderr
    assert path.read_text() == "[server]\nport = \n"


def test_parse_value():
    assert C.parse_value("60") == 60 and C.parse_value("1.5") == 1.5 and C.parse_value("true") is True
    assert C.parse_value('["a", 1]') == ["a", 1] and C.parse_value('"quoted"') == "quoted"
    assert C.parse_value("fleet:") == "fleet:" and C.parse_value("") == "" and C.parse_value("a b") == "a b"


# --------------------------------------------------------------------------------------------- init


def test_init_writes_private_config_and_database(tmp_path):
    result = fleet("init")
    assert result.exit_code == 0, result.output
    path = tmp_path / "config.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == EXAMPLE.read_text()
    assert (tmp_path / "data" / "agent-fleet.db").exists()
    assert fleet("config", "check").exit_code == 0


def test_init_refuses_overwrite(tmp_path):
    path = write(tmp_path / "mine.toml", "# precious\n")
    result = fleet("init", "--path", str(path))
    assert result.exit_code == 4
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert path.read_text() == "# precious\n"
    assert fleet("init", "--path", str(path), "--force").exit_code == 0
    assert path.read_text() == EXAMPLE.read_text() and path.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------ startup


def test_loading_imports_nothing_heavy(tmp_path):
    code = (
        "import sys, fleetctl.config as c; c.load_config(); "
        "print([m for m in ('tomlkit', 'rich', 'typer', 'difflib') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- [matrix]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("room_id = 'fleet'", "matrix.room_id: expected a room id like '!abc:example.org' or an alias"),
        ("room_id = '#fleet'", "matrix.room_id: expected a room id"),
        ("room_id = '!a b:x'", "matrix.room_id: expected a room id"),
        ("events = ['task.faild']", "matrix.events: unknown event kind 'task.faild' (did you mean 'task.failed'?)"),
        ("events = ['zzz.zzz']", "matrix.events: unknown event kind 'zzz.zzz' (one of task.created,"),
        ("template = '{task_id} {nope}'", "matrix.template: invalid template: unknown placeholder {nope}"),
        ("homeserver = 'matrix.example.org'", "matrix.homeserver: expected an http:// or https:// URL"),
        ("timeout_secs = 0", "matrix.timeout_secs: must be > 0"),
    ],
)
def test_matrix_settings_are_checked_with_their_line(tmp_path, line, error):
    base = {"homeserver": "'https://m.example.org'", "access_token": "'a'", "room_id": "'!r:m.example.org'"}
    key, value = line.split(" = ", 1)
    text = "[matrix]\n" + "".join(f"{k} = {v}\n" for k, v in {**base, key: value}.items())
    path = write(tmp_path / "c.toml", text)
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 2, result.output
    row = 1 + list({**base, key: value}).index(key) + 1
    assert f"c.toml:{row}:1: {error}" in result.stderr
    assert "'a'" not in result.stderr


@pytest.mark.parametrize("room", ["!LxgBJqWQDnsrJRvxYzab", "!r:m.example.org", "#fleet:m.example.org:8448"])
def test_matrix_room_ids_of_every_room_version_and_aliases_are_accepted(tmp_path, room):
    path = write(tmp_path / "c.toml", f"[matrix]\nhomeserver = 'https://m.example.org'\naccess_token = 'a'\n"
                                      f"room_id = '{room}'\nevents = ['task.failed', 'host.down']\n"
                                      "template = '{kind}: {task_id} {title!r:.20} {pr_url}'\n")  # fmt: skip
    cfg = C.load_config(path)
    assert cfg.matrix.room_id == room and cfg.matrix.ready and cfg.matrix.events == ("task.failed", "host.down")
    assert C.check_config(cfg, serving_webhooks=False) == []


def test_matrix_needs_a_room_once_a_homeserver_is_set_and_warns_without_a_token(tmp_path):
    path = write(tmp_path / "c.toml", "[matrix]\nhomeserver = 'https://m.example.org'\n")
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 2
    assert "matrix.room_id: must be set" in result.stderr
    path.write_text(path.read_text() + "room_id = '!r:m.example.org'\n")
    # a unit without the token (the dispatch unit) only queues the messages: a warning, not an error
    result = fleet("config", "check", "-c", str(path), "--no-webhooks")
    assert result.exit_code == 0 and "matrix.access_token: not set here: Matrix messages wait" in result.stderr
    result = fleet("config", "check", "-c", str(path), "--no-webhooks", env={"FLEET_MATRIX_TOKEN": "tok"})
    assert result.exit_code == 0 and "warning" not in result.stderr
