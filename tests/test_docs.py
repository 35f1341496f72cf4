"""Docs are part of the product: the CLI reference is generated and must not go stale; every command
has help; the state table in docs/architecture.md is the one the code enforces."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from fleetctl.cli import app
from fleetctl.states import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = 'typer fleetctl.cli utils docs --name fleetctl --title "fleetctl CLI reference" --output docs/cli.md'


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            yield from _commands(cmd, path)
        else:
            yield path, cmd


ALL = list(_commands(typer.main.get_command(app)))


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "fleetctl.cli", "utils", "docs", "--name", "fleetctl",
         "--title", "fleetctl CLI reference", "--output", str(out)],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), f"docs/cli.md is stale; run: {REGENERATE}"


@pytest.mark.parametrize("path,cmd", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_command_has_help_and_an_example(path, cmd):
    assert cmd.help and len(cmd.help.strip()) > 20, f"fleetctl {' '.join(path)} has no real help"
    assert "Example:" in cmd.help, f"fleetctl {' '.join(path)}: the help has no Example: line"
    assert f"## `fleetctl {' '.join(path)}`" in (ROOT / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("path,cmd", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_command_answers_help(path, cmd):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_architecture_state_table_matches_the_code():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("<!-- transitions:start -->")[1].split("<!-- transitions:end -->")[0]
    rows = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|$", block, re.M))
    assert rows == {(s.value, k.value, t.value) for (s, k), t in TRANSITIONS.items()}


def test_readme_opens_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block and text.index("```sh") < text.index("## "), "the README must open with the commands"
    lines = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert "fleetctl demo" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci, ".ci/run must call the README's second command"
