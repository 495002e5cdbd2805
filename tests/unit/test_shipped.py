"""What we ship loads: the example registry and the science recipe (parsed by spython)."""

from __future__ import annotations

from pathlib import Path

from hpc_kernels import registry
from hpc_kernels.build import stamps

ROOT = Path(__file__).resolve().parents[2]


def test_example_registry_and_recipe() -> None:
    reg = registry.load_file(ROOT / "kernels.yaml")
    (science,) = reg.kernels
    assert science.recipe == ROOT / "defs" / "science.def"
    sources, base = stamps.recipe_inputs(science.recipe)
    assert sources == [ROOT / "defs" / "science-requirements.txt"] and base is None
    assert "ipykernel" in sources[0].read_text()
    from spython.main.parse.parsers import SingularityParser

    parsed = SingularityParser(str(science.recipe))
    assert parsed.recipe["spython-base"].fromHeader == "python:3.12-slim"
