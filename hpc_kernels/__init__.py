"""hpc-kernels: Jupyter kernels inside Apptainer (and Docker/Podman) containers on HPC clusters."""

__version__ = "0.1.0"
