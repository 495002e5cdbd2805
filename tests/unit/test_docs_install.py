"""First contact: the install steps a newcomer copies work as written (issue #13).

On Debian 12 a bare `pip install .` (and `pip install --user .`) fails with externally-managed-environment
(PEP 668); hpc-kernels is not on PyPI, so `pip install hpc-kernels` would install somebody else's package;
and a `~/bin` created in this shell is not on its PATH yet.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = [ROOT / "README.md", ROOT / "modulefiles" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section(text: str, heading: str) -> str:
    """The text of a ``## heading`` section, up to the next ``## ``."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def commands(block: str) -> list[str]:
    """The command lines of a fenced block, comments removed."""
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def test_readme_install_works_on_debian_12() -> None:
    install = section((ROOT / "README.md").read_text(), "Install")
    [block] = FENCE_RE.findall(install)
    lines = commands(block)
    assert lines[0].startswith("git clone ")  # the clone step comes first
    assert any(re.match(r"python3? -m venv ", line) for line in lines)
    pips = [line for line in lines if re.search(r"\bpip3? install\b", line)]
    assert pips and all(re.match(r"~/venvs/[^/]+/bin/pip install ", p) for p in pips), pips  # a venv's pip
    for needle in ("externally-managed-environment", "pipx install", "pip install --user", "python3-venv"):
        assert needle in install, needle
    assert_bin_on_path_before_use(lines)


def test_quickstart_puts_bin_on_path_in_the_same_shell() -> None:
    step = section((ROOT / "docs" / "quickstart.md").read_text(), "1. Install hpc-kernels (once, on a login node)")
    [block] = FENCE_RE.findall(step)
    lines = commands(block)
    assert any(line.startswith("git clone ") for line in lines)
    assert_bin_on_path_before_use(lines)
    assert "~/.bashrc" in step


def assert_bin_on_path_before_use(lines: list[str]) -> None:
    link = next(i for i, line in enumerate(lines) if "ln -s" in line and "~/bin/hpc-kernels" in line)
    export = next(i for i, line in enumerate(lines) if re.match(r'export PATH="?(\$HOME|~)/bin:\$PATH"?$', line))
    first_use = next(i for i, line in enumerate(lines) if line.startswith("hpc-kernels "))
    assert link < export < first_use


def test_nothing_tells_users_to_install_from_the_package_index() -> None:
    """Not published there: a command that installs 'hpc-kernels' by name installs whatever holds the name."""
    by_name = re.compile(r"\bpip3? install (--user )?(-U )?hpc[-_]kernels\b")
    for page in PAGES:
        for block in FENCE_RE.findall(page.read_text()):
            assert not by_name.search(block), f"{page}: {by_name.search(block)}"
    for source in (ROOT / "hpc_kernels").rglob("*.py"):
        assert not by_name.search(source.read_text()), source
