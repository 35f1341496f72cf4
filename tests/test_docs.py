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


def _sections(text: str) -> dict[str, str]:
    """The ``### `` sections of a Markdown page by heading (``####`` subsections stay inside theirs)."""
    parts = re.split(r"^### (.*)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_configuration_md_has_a_row_for_every_key_and_no_other():
    """Every key the loader accepts is in its section's table in docs/configuration.md, and every row there
    is a key the loader accepts (a renamed key cannot linger in the docs)."""
    from fleetctl import config as C

    sections = _sections((ROOT / "docs" / "configuration.md").read_text())
    expected = {f"[{name}]": set(keys) for name, keys in C._SCHEMA.items()}
    expected["[[hosts]]"] = set(C._HOST_KEYS) | set(C._AGENT_KEYS)
    expected["[agent_types.NAME]"] = set(C._AGENT_TYPE_KEYS)
    for heading, keys in expected.items():
        found = [body for title, body in sections.items() if title.startswith(f"`{heading}`")]
        assert len(found) == 1, f"docs/configuration.md has no section ### `{heading}`"
        rows = set(re.findall(r"^\| `(\w+)` \|", found[0], re.M))
        assert rows == keys, f"{heading}: missing from the docs {sorted(keys - rows)}, not a key {sorted(rows - keys)}"


def test_architecture_md_names_every_event_type_the_reducer_knows():
    from fleetctl.projections import STATEFUL_EVENT_TYPES

    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = sorted(t for t in STATEFUL_EVENT_TYPES if f"`{t}`" not in text)
    assert not missing, f"docs/architecture.md does not name the event types {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


DOC_PAGES = sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "skill" / "SKILL.md"])


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_a_heading(page):
    """Every relative link of a page names a file that exists and, with ``#anchor``, a heading in it."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # links in code are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", file.read_text(), flags=re.M | re.S), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


def test_the_index_links_every_page():
    text = (ROOT / "docs" / "index.md").read_text()
    linked = {t.partition("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)}
    pages = {p.name for p in (ROOT / "docs").iterdir() if p.suffix in (".md", ".json") and p.name != "index.md"}
    assert pages <= linked, f"docs/index.md does not link {sorted(pages - linked)}"
    assert "../skill/SKILL.md" in linked
