"""The one action log: one line per action, values escaped, secrets never written, a quiet switch."""

from __future__ import annotations

import pytest

from fleetctl import log as fleetlog


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
        ("\x1b[31mred", '"\\x1b[31mred"'),
    ],
)
def test_values_are_escaped_so_an_action_is_one_line(value, written):
    line = fleetlog.format_line("task.assigned", task=value)
    assert line == f"action=task.assigned task={written}"
    assert "\n" not in line and "\x1b" not in line


def test_fields_that_are_none_are_left_out():
    assert fleetlog.format_line("x", a=1, b=None, c="z") == "action=x a=1 c=z"


def test_secret_fields_and_registered_secrets_are_never_written():
    fleetlog.redact("s3cr3t-token-value")
    line = fleetlog.format_line("http.error", token="abc", admin_token="abc",
                                error="bad header Authorization: Bearer s3cr3t-token-value")  # fmt: skip
    assert "s3cr3t-token-value" not in line and "abc" not in line
    assert "token=*** admin_token=***" in line


def test_long_values_are_cut():
    line = fleetlog.format_line("x", detail="y" * 10_000)
    assert len(line) < 2100 and "(+8000 chars)" in line


def test_quiet_silences_and_restores(capsys):
    with fleetlog.quiet():
        fleetlog.log("hidden", a=1)
    fleetlog.log("shown", a=1)
    fleetlog.set_quiet(True)
    fleetlog.log("hidden2")
    fleetlog.set_quiet(False)
    err = capsys.readouterr().err
    assert err == "action=shown a=1\n"


def test_configured_secrets_are_never_logged(tmp_path):
    """Loading a configuration registers its secrets with the log, whatever field a value turns up in."""
    from fleetctl.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nadmin_token = "adm-0123456789abcdef"\n[orchestrator]\nhttp_pull_token = "reg-secret-42"\n'
    )
    path.chmod(0o600)
    load_config(path)
    line = fleetlog.format_line("http.internal_error", error="echo adm-0123456789abcdef and reg-secret-42")
    assert "adm-0123456789abcdef" not in line and "reg-secret-42" not in line


def test_the_quiet_switch_silences_the_action_log_of_a_real_pass(fleet):
    fleet.configure()
    fleet.create("--title", "t")
    loud = fleet.run("dispatch")
    assert loud.returncode == 0 and "action=task.assigned" in loud.stderr
    fleet.create("--title", "t2")
    quiet = fleet.run("--quiet", "dispatch")
    assert quiet.returncode == 0 and "action=" not in quiet.stderr, quiet.stderr
    assert fleet.run("-q", "task", "list").returncode == 0
