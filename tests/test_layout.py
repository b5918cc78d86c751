"""The import contract: the package's folders are its architecture, and this keeps them so.

- ``core/`` is pure: the standard library's computing modules, numpy and other core modules only;
- ``qemu/`` (the QMP edge), ``config/``, ``libvirt/`` (the libvirt edge), ``web/`` and ``serve/`` may use
  what is below them, never what is above, and never the lab;
- ``helper/`` (the privileged zero-page helper) may use the core and the zero-page reader only;
- ``lab/`` (rig, fake QMP, reference, demo) may use anything; only ``cli.py`` reaches it, and only
  inside the ``demo`` command's function, so the daemon's runtime path never imports it.

Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "migpredictd"

# What each layer may import from the package (besides itself) and from outside the standard library.
LAYERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "core": (frozenset(), frozenset({"numpy"})),
    "qemu": (frozenset({"core"}), frozenset({"qemu"})),
    "config": (frozenset({"core", "qemu.settings"}), frozenset({"yaml"})),
    "web": (frozenset({"core", "config"}), frozenset({"bcrypt"})),
    # The libvirt edge: discovery and measurement through libvirt's API (libvirt-python, an extra).
    "libvirt": (frozenset({"core", "qemu", "config"}), frozenset({"libvirt"})),
    "serve": (
        frozenset({"core", "qemu", "config", "web", "libvirt"}),
        frozenset({"prometheus_client", "apscheduler"}),
    ),
    # The privileged helper: the zero-page reader and its protocol, nothing from outside the stdlib.
    "helper": (frozenset({"core", "qemu.zeropages", "qemu.zerohelper", "qemu.settings"}), frozenset()),
}
# The core computes; it does not reach files, sockets, processes, clocks or threads.
CORE_STDLIB: frozenset[str] = frozenset(
    {"__future__", "abc", "bisect", "collections", "dataclasses", "enum", "functools", "heapq",
     "itertools", "json", "math", "numbers", "operator", "re", "statistics", "typing"}
)  # fmt: skip


def _imports(tree: ast.AST) -> Iterator[tuple[int, str, bool]]:
    """(line, imported module, whether the import is at module level) for every import in ``tree``."""
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, id(node) in top
            if node.module == "migpredictd":  # `from migpredictd import x`: x may be a module
                for alias in node.names:
                    if not alias.name.startswith("__"):  # __version__ is not a module
                        yield node.lineno, f"migpredictd.{alias.name}", id(node) in top


def _layer_of(module: str) -> str:
    """``migpredictd.qemu.settings`` -> ``qemu``; the package root and cli.py are ``root``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "root"


def violations(source: str, layer: str, where: str) -> list[str]:
    """Every import in ``source`` (a module of ``layer``) that breaks the contract, as messages."""
    problems: list[str] = []
    own_allowed, outside_allowed = LAYERS.get(layer, (frozenset(), frozenset()))
    for line, module, at_top in _imports(ast.parse(source)):
        top_name = module.split(".")[0]
        if top_name == "migpredictd":
            if module == "migpredictd":
                continue  # __version__
            target = _layer_of(module) if module.count(".") >= 2 else module.split(".")[1]
            if layer == "lab":
                continue
            if target == "lab":
                if layer == "root" and not at_top:
                    continue  # cli.py's demo command, imported only when it runs
                problems.append(f"{where}:{line}: {layer} imports the lab ({module})")
                continue
            if layer in ("root", target):
                continue
            sub = ".".join(module.split(".")[1:3])
            if target not in own_allowed and sub not in own_allowed:
                problems.append(f"{where}:{line}: {layer} imports {module}")
        elif layer == "core" and top_name not in CORE_STDLIB and top_name not in outside_allowed:
            problems.append(f"{where}:{line}: core imports {module} (not pure)")
        elif layer in LAYERS and top_name not in sys.stdlib_module_names and top_name not in outside_allowed:
            problems.append(f"{where}:{line}: {layer} imports the third-party {module}")
    return problems


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        out.append((rel.parts[0] if len(rel.parts) > 1 else "root", path))
    return out


def test_every_module_keeps_the_import_contract() -> None:
    problems = [
        p
        for layer, path in _modules()
        for p in violations(path.read_text(), layer, str(path.relative_to(PACKAGE.parent)))
    ]
    assert problems == []


def test_the_tree_has_the_layers_and_nothing_loose() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"core", "qemu", "config", "libvirt", "web", "serve", "helper", "lab"}
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "cli.py"}


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("core", "import socket\n", "core imports socket (not pure)"),
        ("core", "from migpredictd.qemu.qmp import QMPSession\n", "core imports migpredictd.qemu.qmp"),
        ("core", "def f():\n    import asyncio\n", "core imports asyncio (not pure)"),
        ("qemu", "from migpredictd.serve.state import State\n", "qemu imports migpredictd.serve.state"),
        ("config", "from migpredictd.qemu.measure import measure\n", "config imports migpredictd.qemu"),
        ("serve", "from migpredictd.lab.fakeqmp import FakeVM\n", "serve imports the lab"),
        ("web", "import prometheus_client\n", "web imports the third-party prometheus_client"),
        ("root", "from migpredictd.lab.demo import demo_command\n", "root imports the lab"),
        (
            "helper",
            "from migpredictd.qemu.measure import measure\n",
            "helper imports migpredictd.qemu.measure",
        ),
        ("helper", "import yaml\n", "helper imports the third-party yaml"),
        ("libvirt", "from migpredictd.serve.state import State\n", "libvirt imports migpredictd.serve.state"),
        ("config", "import libvirt\n", "config imports the third-party libvirt"),
    ],
)
def test_the_checker_catches_each_kind_of_breach(layer: str, source: str, expected: str) -> None:
    found = violations(source, layer, "x.py")
    assert len(found) == 1
    assert expected in found[0]


def test_allowed_imports_pass_the_checker() -> None:
    assert violations("from migpredictd.qemu.settings import MeasureSettings\n", "config", "x.py") == []
    assert violations("def demo():\n    from migpredictd.lab.demo import run\n", "root", "cli.py") == []
    assert violations("import numpy as np\nimport math\n", "core", "x.py") == []


def test_the_daemon_runtime_path_imports_no_lab_module() -> None:
    code = (
        "import sys\n"
        "import migpredictd.cli, migpredictd.serve.daemon, migpredictd.config.schema\n"
        "print(sorted(m for m in sys.modules if m.startswith('migpredictd.lab')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_helper_loads_nothing_but_the_standard_library() -> None:
    """The privileged helper's whole code: its modules, the zero-page reader, the error types."""
    code = (
        "import sys\n"
        "import migpredictd.helper.zeropaged\n"
        "print(sorted(m for m in sys.modules if m.startswith('migpredictd')))\n"
        "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'yaml', 'prometheus_client', 'apscheduler', 'qemu', 'bcrypt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    ours, third = out.strip().splitlines()
    assert third == "[]"
    assert set(eval(ours)) <= {  # noqa: S307 (our own subprocess's repr of a list of names)
        "migpredictd", "migpredictd.core", "migpredictd.core.errors", "migpredictd.qemu",
        "migpredictd.qemu.settings", "migpredictd.qemu.zerohelper", "migpredictd.qemu.zeropages",
        "migpredictd.helper", "migpredictd.helper.zeropaged",
    }  # fmt: skip


def test_only_the_libvirt_api_module_imports_libvirt_python() -> None:
    """libvirt-python is an extra: one module imports it (and copes with its absence)."""
    importers = sorted(
        str(path.relative_to(PACKAGE.parent))
        for _layer, path in _modules()
        if any(
            m.split(".")[0] in ("libvirt", "libvirt_qemu", "libvirtaio")
            for _, m, _ in _imports(ast.parse(path.read_text()))
        )
    )
    assert importers == ["migpredictd/libvirt/api.py"]
