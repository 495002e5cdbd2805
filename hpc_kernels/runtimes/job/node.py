"""The compute node as a job kernel's agent sees it: its address on the cluster network, free ports there,
and the agent's log lines. Standard library only (the agent runs with ``python -I -S``)."""

from __future__ import annotations

import contextlib
import socket
import sys
import time

from hpc_kernels.proc import run


def log(text: str) -> None:
    """A line in the job's output file (``hpc-kernels jobs`` shows its tail)."""
    print(f"hpc-kernels agent [{time.strftime('%H:%M:%S')}]: {text}", file=sys.stderr, flush=True)


def node_address(environ: dict[str, str]) -> str:
    """The address of this node that the login node reaches: ``$HPC_KERNELS_NODE_ADDR``, else Slurm's
    ``NodeAddr`` of this node (what slurmctld itself connects to), else the host name's address."""
    override = environ.get("HPC_KERNELS_NODE_ADDR")
    name = override or ""
    if not name:
        node = environ.get("SLURMD_NODENAME") or socket.gethostname()

        with contextlib.suppress(Exception):
            out = run(["scontrol", "show", "node", "-o", node], check=False, timeout=30).stdout
            for token in out.split():
                if token.startswith("NodeAddr="):
                    name = token.partition("=")[2]
        name = name or node
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return str(infos[0][4][0])


def free_ports(address: str, count: int) -> list[int]:
    """``count`` ports free on ``address`` now (the kernel binds them a moment later, as jupyter_client's do)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def listening(address: str, port: int) -> bool:
    """Whether something accepts connections on ``address:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0
