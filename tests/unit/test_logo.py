"""The kernel logo: package data that `hpc-kernels install` copies into every kernelspec, where
jupyter_client finds it as the kernelspec's resources (JupyterLab's launcher card shows logo-svg.svg;
tests/real/test_browser.py checks the card in a real JupyterLab)."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from importlib.resources import files
from pathlib import Path
from typing import Any

from hpc_kernels import cli, specdirs

REGISTRY = """\
kernels:
  boxed:
    image: /nonexistent/boxed.sif
"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_shipped_logo_files_are_what_jupyter_expects() -> None:
    resources = files("hpc_kernels").joinpath("resources")
    svg = ET.fromstring(resources.joinpath("logo-svg.svg").read_bytes())
    assert svg.tag == "{http://www.w3.org/2000/svg}svg" and svg.get("viewBox") == "0 0 64 64"
    assert png_size(resources.joinpath("logo-64x64.png").read_bytes()) == (64, 64)


def test_install_copies_the_logo_and_jupyter_client_lists_it(make_registry: Any, isolated_home: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    path = make_registry(REGISTRY)
    assert cli.main(["install", "boxed", "--registry", str(path)]) == 0
    spec_dir = isolated_home / ".local/share/jupyter/kernels/boxed"
    resources = files("hpc_kernels").joinpath("resources")
    for name in specdirs.LOGO_FILES:
        assert (spec_dir / name).read_bytes() == resources.joinpath(name).read_bytes()
    # What Jupyter Server turns into /kernelspecs/boxed/logo-svg.svg for the launcher.
    found = KernelSpecManager().get_all_specs()["boxed"]
    assert found["resource_dir"] == str(spec_dir)
    assert sorted(p.name for p in spec_dir.iterdir()) == ["kernel.json", "logo-64x64.png", "logo-svg.svg"]
    assert cli.main(["uninstall", "boxed"]) == 0
    assert not spec_dir.exists()
