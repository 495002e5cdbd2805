"""The test suite: ``unit/`` needs no real component, ``real/`` drives Apptainer, Podman, Docker, Lmod, Slurm or a
browser (marked; skipped where absent, failures with CI=true), ``helpers/`` is what both import.

A package, so ``pytest`` from the repository root imports ``tests.*`` (and ``python -m tests.helpers.X`` works)."""
