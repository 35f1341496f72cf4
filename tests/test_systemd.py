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
DEPLOYMENT = ROOT / "docs" / "deployment.md"
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


def timer_problems(unit_dir: Path) -> list[str]:
    """What is wrong with the timers in ``unit_dir``: a timer whose service is missing or not a oneshot, or
    one without ``OnBootSec=`` or ``OnUnitActiveSec=`` (it would fire once, or never after a reboot)."""
    problems = []
    for timer in sorted(unit_dir.glob("*.timer")):
        service = timer.with_suffix(".service")
        if not service.exists():
            problems.append(f"{timer.name} fires {service.name}, which is missing")
        elif values(service, "Type") != ["oneshot"]:
            problems.append(f"{service.name}: a timer's pass is Type=oneshot")
        for key in ("OnBootSec", "OnUnitActiveSec"):
            found = values(timer, key)
            if len(found) != 1 or seconds(found[0]) <= 0:
                problems.append(f"{timer.name}: needs one positive {key}=, has {found}")
    return problems


def test_the_units_are_there():
    names = {p.name for p in UNITS}
    assert {"fleetctl-serve.service", "fleetctl-dispatch.service", "fleetctl-dispatch.timer",
            "fleetctl-sweep.service", "fleetctl-sweep.timer", "fleetctl-sync.service",
            "fleetctl-sync.timer"} <= names  # fmt: skip
    assert timer_problems(UNIT_DIR) == []


def test_the_timer_check_would_catch_a_lonely_or_idle_timer(tmp_path):
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text())
    (tmp_path / "fleetctl-sync.service").unlink()
    sweep = tmp_path / "fleetctl-sweep.timer"
    sweep.write_text(sweep.read_text().replace("OnUnitActiveSec=30s\n", ""))
    dispatch = tmp_path / "fleetctl-dispatch.timer"
    dispatch.write_text(dispatch.read_text().replace("OnBootSec=15s\n", ""))
    assert timer_problems(tmp_path) == [
        "fleetctl-dispatch.timer: needs one positive OnBootSec=, has []",
        "fleetctl-sweep.timer: needs one positive OnUnitActiveSec=, has []",
        "fleetctl-sync.timer fires fleetctl-sync.service, which is missing",
    ]


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
    blocks = fenced_blocks(DEPLOYMENT.read_text(), "ini")
    assert unit.read_text() in blocks, (
        f"docs/deployment.md must include systemd/{unit.name} verbatim in an ```ini block; copy the file in"
    )


def documented_config() -> str:
    configs = [b for b in fenced_blocks(DEPLOYMENT.read_text(), "toml") if b.startswith("# /etc/fleetctl/config.toml")]
    assert len(configs) == 1, "docs/deployment.md has one ```toml block starting '# /etc/fleetctl/config.toml'"
    return configs[0]


def credentials_of(unit: Path) -> dict[str, str]:
    return dict(v.split(":", 1) for v in values(unit, "LoadCredential"))


def test_the_documented_config_names_each_secret_in_the_units_credentials_directory(tmp_path):
    """Every *_file of the deployment config is ${CREDENTIALS_DIRECTORY}/NAME; every unit loads each NAME it
    uses from /etc/fleetctl/credentials/NAME; together the units load exactly the names the config uses."""
    text = documented_config()
    names = re.findall(r'^\s*\w+_file\s*=\s*"([^"]+)"', text, flags=re.M)
    assert names and all(n.startswith("${CREDENTIALS_DIRECTORY}/") for n in names), names
    files = {n.removeprefix("${CREDENTIALS_DIRECTORY}/") for n in names}
    loaded: set[str] = set()
    for unit in sorted(UNIT_DIR.glob("*.service")):
        for name, source in credentials_of(unit).items():
            assert source == f"/etc/fleetctl/credentials/{name}", (unit.name, name, source)
            loaded.add(name)
    assert loaded == files
    assert not credentials_of(UNIT_DIR / "fleetctl-dispatch.service"), "local runs inherit dispatch's environment"
    # Each unit's view: its own credentials directory holds only what it loads.
    for unit in ("fleetctl-serve.service", "fleetctl-sweep.service", "fleetctl-sync.service"):
        creds = tmp_path / unit
        creds.mkdir()
        for name in credentials_of(UNIT_DIR / unit):
            (creds / name).write_text(f"{name}-value\n")
            (creds / name).chmod(0o600)
        cfg = load_config_text(text, tmp_path / "config.toml", env={"CREDENTIALS_DIRECTORY": str(creds)})
        assert cfg.forgejo.token == "forgejo-token-value", unit
    # An operator's shell (no CREDENTIALS_DIRECTORY): the config loads; the secrets are simply not at hand.
    cfg = load_config_text(text, tmp_path / "config.toml", env={})
    assert not cfg.forgejo.api_ready and not cfg.matrix.ready


@pytest.mark.parametrize("unit", sorted(UNIT_DIR.glob("*.service")), ids=lambda p: p.name)
def test_exec_start_names_a_real_command(unit):
    """No unit for a command that does not exist; every option it passes is one the command takes."""
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
    assert value(dispatch, "ExecStart").endswith("--config /etc/fleetctl/config.toml"), "runs reload it later"


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
