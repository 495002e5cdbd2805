"""The package's shape stays as docs/architecture.md describes it: every module is on the map, nothing on the
map is gone, and no two modules import each other, directly or around a loop (imports inside functions and
under TYPE_CHECKING count: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from benchmarks import structure

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hpc_kernels"
MAP = ROOT / "docs" / "architecture.md"


def _defines_nothing(path: Path) -> bool:
    """A package's ``__init__.py`` that is only a docstring (the package's modules are on the map)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in tree.body)


def module_files() -> set[str]:
    """Every module of the package as a path relative to hpc_kernels/ (``runtimes/apptainer/cli.py``);
    ``__main__.py`` and docstring-only ``__init__.py`` files need no row."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name != "__main__.py" and not (p.name == "__init__.py" and _defines_nothing(p))}


def mapped() -> set[str]:
    """The modules docs/architecture.md's module map names: backticked ``path.py`` in its table rows."""
    text = MAP.read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1]
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("|"):
            first_cell = row.split("|")[1]
            names.update(re.findall(r"`([\w/]+\.py)`", first_cell))
    return names


def test_the_module_map_names_every_module_and_only_modules_that_exist() -> None:
    modules = module_files()
    listed = mapped()
    missing = sorted(modules - listed)
    gone = sorted(listed - modules)
    assert not missing, f"docs/architecture.md's module map does not name: {missing}"
    assert not gone, f"docs/architecture.md's module map names modules that do not exist: {gone}"


def test_the_map_check_reads_the_table() -> None:
    """The check above can fail: it reads the rows' first cells (a module named only in prose is not on the
    map), and a docstring-only ``__init__.py`` is the only module that needs no row."""
    listed = mapped()
    assert {"cli.py", "launch.py", "runtimes/table.py"} <= listed
    assert "build/__init__.py" not in module_files() and "runtimes/apptainer/__init__.py" in module_files()


def test_no_import_cycles() -> None:
    found = structure.measure()["import_cycles"]
    assert found == [], f"import cycles between modules of hpc_kernels: {found}"


def test_the_cycle_check_finds_a_cycle() -> None:
    """The same function finds a loop when there is one (a check that could never fail proves nothing)."""
    assert structure.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert structure.cycles({"a": {"b"}, "b": set()}) == []
