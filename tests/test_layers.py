"""SPEC §13's layer rules, checked on the source (every import, module-level or inside a function).

- the pure core imports no I/O library;
- nothing imports ``fleetctl.cli`` (but the ``python -m fleetctl`` entry point);
- typer, click and rich only inside ``fleetctl/cli/``;
- httpx only in the HTTP clients; fabric and paramiko only in the SSH executor;
- no ``execute(`` and no private member of the store outside the store (``store.py`` and its migrations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fleetctl"

#: The pure core: decisions and shapes, no I/O (SPEC §13).
CORE = (
    "states",
    "retry",
    "receipts",
    "ids",
    "errors",
    "prompt",
    "projections",
    "matching",
    "config",
    "durations",
    "jsondoc",
    "effects",
)
#: What the core must not import (network, processes, databases, terminals).
IO_LIBRARIES = frozenset({
    "sqlite3", "sqlite_utils", "httpx", "fabric", "paramiko", "invoke", "socket", "subprocess", "http",
    "urllib.request", "select", "selectors", "asyncio", "typer", "click", "rich", "fleetctl.store",
    "fleetctl.server", "fleetctl.cli", "fleetctl.remote", "fleetctl.passes", "fleetctl.executors",
})  # fmt: skip
#: Where each edge library may be imported (paths relative to the package, a trailing / for a folder).
ALLOWED = {
    "typer": ("cli/",),
    "click": ("cli/",),
    "rich": ("cli/",),
    "httpx": ("remote.py", "forgejo/", "matrix/"),
    "fabric": ("executors/ssh.py",),
    "paramiko": ("executors/ssh.py",),
    "fleetctl.cli": ("cli/", "__main__.py"),
}
STORE_FILES = ("store.py", "schema.py", "store/")
STORE_PRIVATE = frozenset({"_one", "_all", "_row", "_write_changed", "_record_claims", "_check", "_db", "_wake"})


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))
    ]


SOURCES = _sources()


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _matches(name: str, library: str) -> bool:
    return name == library or name.startswith(library + ".")


def _inside(rel: str, places: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in places)


def test_the_core_modules_exist():
    for name in CORE:
        assert (PACKAGE / f"{name}.py").exists(), f"core module {name} moved: update tests/test_layers.py"


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_io_library(module):
    tree = dict(SOURCES)[f"{module}.py"]
    bad = [(line, name) for line, name in _imports(tree) if any(_matches(name, lib) for lib in IO_LIBRARIES)]
    assert not bad, f"fleetctl/{module}.py is pure core but imports {bad}"


def test_edge_libraries_only_where_they_belong():
    bad = []
    for rel, tree in SOURCES:
        for line, name in _imports(tree):
            for library, places in ALLOWED.items():
                if _matches(name, library) and not _inside(rel, places):
                    bad.append(f"fleetctl/{rel}:{line} imports {name} (allowed only in {', '.join(places)})")
    assert not bad, "\n".join(bad)


def test_only_the_store_runs_sql_or_touches_its_private_members():
    bad = []
    for rel, tree in SOURCES:
        if _inside(rel, STORE_FILES):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "execute":
                bad.append(f"fleetctl/{rel}:{node.lineno} calls .execute( (add a named Store method)")
            elif isinstance(node, ast.Attribute) and node.attr in STORE_PRIVATE and not _is_self(node.value):
                bad.append(f"fleetctl/{rel}:{node.lineno} uses the store's private {node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module == "fleetctl.store":
                bad += [f"fleetctl/{rel}:{node.lineno} imports {a.name} from the store"
                        for a in node.names if a.name.startswith("_")]  # fmt: skip
    assert not bad, "\n".join(bad)


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def test_the_rules_catch_what_they_forbid():
    """The checks themselves can fail: each rule finds a planted violation."""
    planted = ast.parse("import httpx\nfrom fleetctl.cli import app\ndef f(store):\n    store.execute('x')\n")
    names = [n for _, n in _imports(planted)]
    assert any(_matches(n, "httpx") for n in names) and any(_matches(n, "fleetctl.cli") for n in names)
    assert any(isinstance(n, ast.Attribute) and n.attr == "execute" for n in ast.walk(planted))
    assert _inside("cli/task.py", ("cli/",)) and not _inside("services/runs.py", ("cli/",))
    assert not _inside("remote.py.bak", ("remote.py",))
