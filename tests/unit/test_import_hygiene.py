"""The layers stay apart: the hub's core is pure, and the TUI never imports the hub.

``hub/core`` (engine, registry, windows, plan drafts) takes events and the time
as arguments and returns actions: it imports no event loop, no MQTT, no
database, no processes, no web server, reads no clock and opens no file, and
of the hub it imports only ``hub.core`` (``bus`` is the shared contract). The
TUI talks MQTT like any other tool (what it shares with the hub lives in
``bus``). Each module's AST is read, so a lazy import inside a function counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "hub" / "core"

#: Top-level modules the core must not import: I/O, event loops, processes, clocks, the web.
SHELL = frozenset(
    {
        "asyncio", "paho", "tinydb", "subprocess", "fastapi", "uvicorn", "starlette", "httpx",
        "aiohttp", "textual", "socket", "ssl", "select", "selectors", "signal", "threading",
        "multiprocessing", "concurrent", "os", "shutil", "tempfile", "pathlib", "io", "time",
        "logging", "urllib", "http", "cryptography", "random", "secrets", "uuid",
    }
)  # fmt: skip
#: Calls that read the clock or touch the world.
SHELL_CALLS = frozenset({"open", "print", "input", "now", "utcnow", "today"})


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _package(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parts[:-1])


def _imports(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path`` (of ``package``), relative ones made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            # ``from hub import service`` imports hub.service
            yield from ((node.lineno, f"{module}.{alias.name}") for alias in node.names if module == "hub")


def _calls(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            yield node.lineno, name


def core_violations(path: Path, package: str = "hub.core") -> list[str]:
    """Why ``path`` (a module of the core) is not pure; empty when it is."""
    found = []
    where = path.name
    for line, module in _imports(path, package):
        top = module.split(".")[0]
        if top in SHELL:
            found.append(f"{where}:{line} imports {module} (I/O or a clock: the shell's job)")
        elif top == "hub" and module != "hub" and not module.startswith("hub.core"):
            found.append(f"{where}:{line} imports {module} (the hub's shell)")
        elif top in {"tui", "cli", "edge_agent"}:
            found.append(f"{where}:{line} imports {module} (another program)")
    found.extend(
        f"{where}:{line} calls {name}() (I/O or a clock)"
        for line, name in _calls(path)
        if name in SHELL_CALLS
    )
    return found


def test_the_core_package_has_the_pure_modules() -> None:
    names = {path.stem for path in _modules(CORE)}
    assert {"engine", "events", "state", "registry", "windows", "plan"} <= names


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: p.name)
def test_the_core_imports_no_io_no_clock_and_no_shell(path: Path) -> None:
    assert core_violations(path) == []


def test_the_checker_catches_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"  # read as a module of hub.core
    source = (
        "import asyncio\nfrom time import monotonic\nfrom hub.store import Store\nfrom hub import service\n"
        "from ..rollouts import RolloutManager\nfrom . import engine\nimport datetime\n"
        "def f():\n    import subprocess\n    open('x')\n    return datetime.datetime.now()\n"
    )
    bad.write_text(source)
    said = "\n".join(core_violations(bad))
    for needle in (
        "imports asyncio",
        "imports time",
        "imports hub.store",
        "imports hub.service",
        "imports hub.rollouts",
        "imports subprocess",
        "calls open()",
        "calls now()",
    ):
        assert needle in said, needle
    assert "hub.core.engine" not in said


def test_importing_the_core_loads_no_shell_module() -> None:
    # Transitively too: what the core pulls in through bus/ must not drag the shell along.
    code = (
        "import sys\n"
        "import hub.core.engine, hub.core.events, hub.core.state, hub.core.registry\n"
        "import hub.core.windows, hub.core.plan\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60
    ).stdout.split()
    heavy = {"asyncio", "paho", "tinydb", "subprocess", "fastapi", "uvicorn", "starlette", "textual"}
    shell = [m for m in loaded if m.split(".")[0] in heavy]
    shell += [m for m in loaded if m.startswith("hub.") and not m.startswith("hub.core")]
    assert shell == []


@pytest.mark.parametrize("path", _modules(ROOT / "tui"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_tui_does_not_import_the_hub(path: Path) -> None:
    imported = _imports(path, _package(path))
    hub = [f"line {line}: {module}" for line, module in imported if module.split(".")[0] == "hub"]
    assert hub == []
