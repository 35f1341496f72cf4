"""fleetctl/cli/_coerce.py: the pydantic-free coercion agrees with typer's own, value by value.

No timing here (benchmarks live in bench/); these check behaviour, and that the commands timers and
agents run every few seconds do not import pydantic at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer import _coercion, _param_types
from typer._click import Context
from typer._click.exceptions import BadParameter
from typer.core import _TyperParameter

from fleetctl.cli import app, app_for
from fleetctl.cli._coerce import FastRuntimeParam, handles, install

VALUES = [
    None, "", "0", "1", "7", "-1", "-0", "007", "+3", "1_000", " 5", "5 ", "3.0", "abc", "12345678901234567890",
    "-", "/tmp", "x/y", "config.toml", "/nonexistent/dir/f.toml", Path("rel/p"), 3, 0, -2, True, False,
    ("1", "2"), ("a",), (), ["5"], ("1", "x"), ("0",),
]  # fmt: skip


def _params():
    root = typer.main.get_command(app)

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])
        for p in cmd.params:
            if isinstance(p, _TyperParameter):
                yield " ".join(path), cmd, p

    return list(walk(root, ["fleetctl"]))


def _outcome(runtime, value, param, ctx):
    try:
        out = runtime.coerce(value, param=param, ctx=ctx)
    except BadParameter as exc:
        return ("error", exc.format_message())
    return ("ok", type(out).__name__, out)


def test_every_fleetctl_parameter_takes_the_fast_path():
    """A new parameter of another type would silently bring pydantic back into start-up."""
    slow = [f"{where} {p.name}: {p.type_descriptor.annotation}" for where, _, p in _params()
            if not handles(p.type_descriptor) and p.name not in ("install_completion", "show_completion")]  # fmt: skip
    assert slow == []


@pytest.mark.parametrize("where,cmd,param", _params(), ids=lambda x: x if isinstance(x, str) else "")
def test_fast_and_typer_coercion_agree(where, cmd, param):
    d = param.type_descriptor
    if not handles(d):
        pytest.skip("typer's own path")
    fast = FastRuntimeParam(d, _coercion.build_runtime_param, _param_types.coerce_cli_path)
    slow = _coercion.build_runtime_param(d)
    ctx = Context(cmd)
    for value in VALUES:
        assert _outcome(fast, value, param, ctx) == _outcome(slow, value, param, ctx), (where, param.name, value)


def test_install_is_idempotent():
    assert install() is True
    assert install() is True


@pytest.mark.parametrize("argv", [["dispatch"], ["task", "list", "--state", "queued", "--json", "--limit", "5"]])
def test_hot_commands_do_not_import_pydantic(argv, tmp_path):
    code = (
        "import sys\n"
        "from fleetctl.cli import main\n"
        f"sys.argv = ['fleetctl', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------------------
# main() builds only the invoked command's parser (fleetctl.cli.app_for); it must read exactly like the app


def _paths():
    root = typer.main.get_command(app)

    def walk(cmd, path):
        is_group = hasattr(cmd, "commands")
        yield path, is_group
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(root, []))


@pytest.mark.parametrize("path,is_group", _paths(), ids=lambda p: " ".join(p) if isinstance(p, list) else "")
def test_slim_app_reads_like_the_whole_app(path, is_group):
    from typer.testing import CliRunner

    runner = CliRunner()
    cases = [[*path, "--help"], [*path, "--no-such-option"]]  # a command itself never runs here
    if is_group:
        cases += [path, [*path, "no-such-command"]]
    for args in cases:
        whole = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "100"})
        slim = runner.invoke(app_for(args), args, env={"NO_COLOR": "1", "COLUMNS": "100"})
        assert (slim.exit_code, slim.output) == (whole.exit_code, whole.output), args


def test_slim_app_leaves_the_app_whole():
    before = [c.name for c in app.registered_commands], [g.name for g in app.registered_groups]
    assert [c.name for c in app_for(["dispatch"]).registered_commands] == ["dispatch"]
    assert app_for(["task", "complete", "x"]).registered_groups[0].typer_instance.registered_commands[0].name == (
        "complete"
    )
    assert ([c.name for c in app.registered_commands], [g.name for g in app.registered_groups]) == before


def test_every_integer_option_is_bounded():
    """An unbounded int option lets a 30-digit value through to SQLite (OverflowError, exit 1)."""
    unbounded = [f"{where} {p.name}" for where, _, p in _params()
                 if p.type_descriptor.annotation in (int, list[int]) and (p.min is None or p.max is None)]  # fmt: skip
    assert unbounded == []
