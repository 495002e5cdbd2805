"""Adapters of the external programs that are not container runtimes: one module per program (Slurm,
Lmod). Each only runs its program through :func:`hpc_kernels.proc.run` and parses its answers."""
