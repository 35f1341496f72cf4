"""What the docs tell people to type is real: every ``fleetctl …`` command in a code block of ``docs/``,
``skill/`` and the README parses — the command exists and takes those options and arguments (the same parse
``--help`` goes through, nothing is run) — and every ``section.key`` the prose names is a configuration key.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer._click import core as click_core  # typer vendors its own click
from typer._click.exceptions import UsageError

from fleetctl.cli import app
from fleetctl.config import _SCHEMA, SECRET_KEYS
from fleetctl.doctor import CHECK_NAMES

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "skill" / "SKILL.md"])
PAGES = [p for p in PAGES if p.name != "cli.md"]  # generated from the program itself
ROOT_COMMAND = typer.main.get_command(app)
SEPARATORS = {"&&", "||", "|", ";", "&"}


def code_blocks(text: str) -> list[str]:
    """The shell blocks (```sh, ```bash, ```shell, ```console): untyped blocks hold output, crontabs, tables."""
    return [m[1] for m in re.finditer(r"^```(?:sh|bash|console|shell)\n(.*?)^```$", text, flags=re.M | re.S)]


def commands_in(block: str) -> list[list[str]]:
    """Each ``fleetctl`` invocation of a shell block, as its arguments (after ``fleetctl``)."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = line.strip().removeprefix("$ ")
        if "fleetctl" not in line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        while words:
            cut = next((i for i, w in enumerate(words) if w in SEPARATORS), len(words))
            segment, words = words[:cut], words[cut + 1 :]
            # the program, not a user or group name: "sudo -u fleetctl fleetctl task list", "install -g fleetctl"
            starts = [i for i, w in enumerate(segment) if (w == "fleetctl" or w.endswith("/bin/fleetctl"))
                      and (i == 0 or not segment[i - 1].startswith("-"))]  # fmt: skip
            starts = [i for i in starts if i + 1 < len(segment) and (segment[i + 1] in ROOT_COMMAND.commands
                                                                      or segment[i + 1].startswith("-"))]  # fmt: skip
            if starts:  # a wrapper's "$@" stands for what its caller passes
                found.append([w for w in segment[starts[-1] + 1 :] if "$@" not in w and w != "}"])
    return found


def parse(args: list[str]) -> None:
    """Parse ``fleetctl ARGS`` down to the command, as click does before running it (raises UsageError)."""
    ctx = ROOT_COMMAND.make_context("fleetctl", list(args))
    cmd = ROOT_COMMAND
    while hasattr(cmd, "resolve_command"):  # a group
        rest = [*getattr(ctx, "_protected_args", []), *getattr(ctx, "protected_args", []), *ctx.args]
        if not rest:
            return
        name, sub, rest = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub


EXAMPLES = [(page, args) for page in PAGES for block in code_blocks(page.read_text()) for args in commands_in(block)]


def test_the_docs_have_commands_to_check():
    pages = {page.name for page, _ in EXAMPLES}
    assert {"deployment.md", "operations.md", "SKILL.md", "README.md", "forgejo.md"} <= pages, pages
    assert len(EXAMPLES) > 40


@pytest.mark.parametrize(("page", "args"), EXAMPLES, ids=[f"{p.name}:{' '.join(a)[:60]}" for p, a in EXAMPLES])
def test_every_documented_command_parses(page, args):
    if any(w in ("--help", "-h") for w in args):
        return
    try:
        parse(args)
    except (click_core.Exit, typer.Exit):
        pass  # an eager option such as --version
    except UsageError as exc:
        pytest.fail(f"{page.relative_to(ROOT)}: `fleetctl {' '.join(args)}` does not parse: {exc.format_message()}")


def test_the_parse_check_would_catch_a_wrong_command():
    for wrong in (["task", "finish", "t-1"], ["task", "list", "--stat", "queued"], ["doctor", "--deeper"],
                  ["agent", "register"]):  # fmt: skip
        with pytest.raises(UsageError):
            parse(wrong)
    parse(["task", "complete", "t-1", "--outcome", "failure", "--summary", "why"])


KEYS = {f"{section}.{key}" for section, keys in _SCHEMA.items() for key in keys}
KEYS |= {f"{section}.{key}_file" for section, keys in SECRET_KEYS.items() for key in keys}
KEY_RE = re.compile(r"`((?:server|forgejo|orchestrator|matrix|budgets)\.[a-z_]+)`")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "config.example.toml"], ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(page):
    unknown = sorted({k for k in KEY_RE.findall(page.read_text()) if k not in KEYS and k not in CHECK_NAMES})
    assert not unknown, f"{page.relative_to(ROOT)} names configuration keys that do not exist: {unknown}"


TOML_BLOCKS = [(page, m[1]) for page in [*PAGES, ROOT / "docs" / "cli.md"]
               for m in re.finditer(r"^```toml\n(.*?)^```$", page.read_text(), flags=re.M | re.S)]  # fmt: skip


@pytest.mark.parametrize(("page", "text"), TOML_BLOCKS, ids=[f"{p.name}:{i}" for i, (p, _t) in enumerate(TOML_BLOCKS)])
def test_every_toml_block_of_the_docs_is_a_valid_config(page, text, tmp_path):
    """A ```toml block is a config (or part of one) a reader may paste: it must load — known sections and
    keys, right types, valid values (secret files are not read: they are read when a command needs them)."""
    from fleetctl.config import load_config_text

    load_config_text(text, tmp_path / "config.toml", env={})


def test_there_are_toml_blocks_to_check():
    assert {p.name for p, _t in TOML_BLOCKS} >= {"deployment.md", "forgejo.md", "matrix.md", "ssh-hosts.md"}
