"""The systemd units in ``systemd/`` (SPEC §10, STYLE practice 14).

- ``systemd-analyze verify`` accepts every unit without a word of output, with ExecStart pointed at a
  stub (the real binary is not installed here): any warning is a unit that systemd would half-ignore.
- Every directive that is not self-explanatory has a comment on the line above it.
- docs/operations.md includes every unit verbatim, and its deployment config matches serve's credentials.
- What the units name exists in the program: the subcommands, the dispatch interval, the drain grace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetctl.cli import app
from fleetctl.config import OrchestratorConfig, load_config_text
from fleetctl.server import GRACE_SECS

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
OPERATIONS = ROOT / "docs" / "operations.md"
UNITS = sorted(p for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".timer"))
BINARY = "/usr/local/bin/fleetctl"
SELF_EXPLANATORY = {"Description", "ExecStart", "WantedBy"}
"""Directives that need no comment of their own; every other one has a ``#`` line right above it."""


def directives(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, section, key, value) of every directive, in order (keys may repeat)."""
    out, section = [], ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            continue
        key, _, value = stripped.partition("=")
        out.append((number, section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _n, _s, k, v in directives(path) if k == key]


def value(path: Path, key: str) -> str:
    found = values(path, key)
    assert len(found) == 1, f"{path.name}: expected one {key}=, found {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span of one unit, as used in these units: 10s, 5min, 1h."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min|h)?", span)
    assert m, f"unexpected time span {span!r}"
    return float(m[1]) * {"ms": 0.001, "s": 1, "min": 60, "h": 3600, None: 1}[m[2]]


def analyze() -> str:
    """The systemd-analyze binary, or fail in CI / skip on a developer's machine without it."""
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("systemd-analyze is missing in CI; the machine needs: apt-get install systemd")
        pytest.skip("systemd-analyze not found; install it with: apt-get install systemd")
    return found


def stubbed(tmp_path: Path, units: list[Path]) -> list[Path]:
    """Copies of ``units`` in tmp_path whose ExecStart binary is an executable stub (arguments kept)."""
    stub = tmp_path / "fleetctl"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for unit in units:
        lines = []
        for line in unit.read_text().splitlines(keepends=True):
            if line.startswith("ExecStart="):
                binary, _, args = line.removeprefix("ExecStart=").partition(" ")
                assert binary == BINARY, f"{unit.name}: ExecStart runs {binary}, expected {BINARY}"
                line = f"ExecStart={stub} {args}"
            lines.append(line)
        copy = tmp_path / unit.name
        copy.write_text("".join(lines))
        copies.append(copy)
    return copies


def verify(paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([analyze(), "verify", "--man=no", *map(str, paths)],
                          capture_output=True, text=True, timeout=120, cwd=paths[0].parent)  # fmt: skip


def test_the_units_are_there():
    names = {p.name for p in UNITS}
    assert {"fleetctl-serve.service", "fleetctl-dispatch.service", "fleetctl-dispatch.timer",
            "fleetctl-sweep.service", "fleetctl-sweep.timer"} <= names  # fmt: skip
    for timer in UNIT_DIR.glob("*.timer"):
        service = timer.with_suffix(".service")
        assert service.exists(), f"{timer.name} fires {service.name}, which is missing"
        assert value(service, "Type") == "oneshot", f"{service.name}: a timer's pass is Type=oneshot"


def test_systemd_analyze_verify_is_silent(tmp_path):
    result = verify(stubbed(tmp_path, UNITS))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify (exit {result.returncode}):\n{output}"


def test_the_verify_check_would_catch_a_bad_unit(tmp_path):
    """A unit systemd half-ignores still exits 0: it is the output that tells, so the test reads it."""
    unit = tmp_path / "src" / "fleetctl-sweep.service"
    unit.parent.mkdir()
    unit.write_text((UNIT_DIR / "fleetctl-sweep.service").read_text().replace("Type=oneshot", "Type=oneshott"))
    result = verify(stubbed(tmp_path, [unit]))
    assert "oneshott" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_every_directive_has_a_comment(unit):
    lines = unit.read_text().splitlines()
    bare = [f"{unit.name}:{n}: {key}" for n, _section, key, _v in directives(unit)
            if key not in SELF_EXPLANATORY and not lines[n - 2].lstrip().startswith(("#", ";"))]  # fmt: skip
    assert not bare, "directives without a comment on the line above (STYLE practice 14):\n" + "\n".join(bare)


def fenced_blocks(text: str, lang: str) -> list[str]:
    return [m[1] for m in re.finditer(rf"^```{lang}\n(.*?)^```$", text, flags=re.M | re.S)]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_operations_doc_includes_the_unit_verbatim(unit):
    blocks = fenced_blocks(OPERATIONS.read_text(), "ini")
    assert unit.read_text() in blocks, (
        f"docs/operations.md must include systemd/{unit.name} verbatim in an ```ini block; copy the file in"
    )


def test_the_documented_config_matches_serve_credentials(tmp_path):
    """The deployment config's *_file names are exactly the credentials serve loads (besides the config),
    and it loads both in serve's view (credentials directory) and everyone else's (empty placeholders)."""
    configs = [b for b in fenced_blocks(OPERATIONS.read_text(), "toml") if b.startswith("# /etc/fleetctl/config.toml")]
    assert len(configs) == 1, "docs/operations.md has one ```toml block starting '# /etc/fleetctl/config.toml'"
    text = configs[0]
    files = set(re.findall(r'^\s*\w+_file\s*=\s*"([^"]+)"', text, flags=re.M))
    credentials = {v.split(":", 1)[0] for v in values(UNIT_DIR / "fleetctl-serve.service", "LoadCredential")}
    assert files == credentials - {"config.toml"}
    for name in files:
        (tmp_path / name).write_text("secret\n")
        (tmp_path / name).chmod(0o600)
    serve_view = load_config_text(text, tmp_path / "config.toml", env={})
    assert serve_view.server.admin_token == "secret" and not serve_view.warnings
    for name in files:
        (tmp_path / name).write_text("")
    others_view = load_config_text(text, tmp_path / "config.toml", env={})
    assert others_view.server.admin_token is None and others_view.orchestrator.http_pull_token is None


@pytest.mark.parametrize("unit", sorted(UNIT_DIR.glob("*.service")), ids=lambda p: p.name)
def test_exec_start_names_a_real_command(unit):
    """No unit for a command that does not exist (`fleetctl sync` is future work: no unit until it is)."""
    args = value(unit, "ExecStart").split()[1:]
    result = CliRunner().invoke(app, [*args, "--help"])  # the subcommand and every option it is given
    assert result.exit_code == 0, f"{unit.name}: fleetctl {' '.join(args)} --help failed:\n{result.output}"


def test_every_unit_shares_one_user_state_directory_and_database():
    services = sorted(UNIT_DIR.glob("*.service"))
    for service in services:
        assert value(service, "User") == "fleetctl", service.name
        assert value(service, "StateDirectory") == "fleetctl", service.name
        assert value(service, "Environment") == "FLEET_DB_PATH=/var/lib/fleetctl/fleet.db", service.name


def test_dispatch_lets_its_local_runs_outlive_the_pass():
    dispatch = UNIT_DIR / "fleetctl-dispatch.service"
    assert value(dispatch, "KillMode") == "process"
    assert value(dispatch, "PrivateTmp") == "no"
    assert "%d" not in value(dispatch, "ExecStart"), "runs reload the config after the unit (and %d) is gone"


def test_timer_intervals_agree_with_the_program():
    dispatch = UNIT_DIR / "fleetctl-dispatch.timer"
    assert seconds(value(dispatch, "OnUnitActiveSec")) == OrchestratorConfig().dispatch_interval_secs
    for timer in UNIT_DIR.glob("*.timer"):
        assert seconds(value(timer, "AccuracySec")) <= 1, timer.name
        assert seconds(value(timer, "OnBootSec")) > 0, timer.name


def test_serve_stop_timeout_covers_the_drain_grace():
    serve = UNIT_DIR / "fleetctl-serve.service"
    assert value(serve, "KillSignal") == "SIGTERM"
    assert GRACE_SECS < seconds(value(serve, "TimeoutStopSec")) <= 3 * GRACE_SECS
