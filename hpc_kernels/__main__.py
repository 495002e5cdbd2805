"""``python -m hpc_kernels`` runs the command-line interface."""

from hpc_kernels.cli import main

raise SystemExit(main())
