"""Kernel clients for tests and test processes (tests/helpers/member_kernels.py): start a kernel robustly, run a cell."""

from __future__ import annotations

from typing import Any


def _listening(ip: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((ip, port)) == 0


def start_ready_kernel(make_manager: Any, timeout: float = 90, attempts: int = 3) -> tuple[Any, Any]:
    """Start a kernel and return (manager, ready client), robust to the port race of jupyter_client.

    jupyter_client picks free ports and the kernel binds them later; another process can take one in
    between, the kernel then dies at start-up, and a client sending to it blocks forever (a zmq DEALER
    without a peer). So: wait until the kernel listens on all its ports *while alive*, and start a fresh
    manager (new ports) when it died.
    """
    import time

    failures: list[str] = []
    for _ in range(attempts):
        km = make_manager()
        km.start_kernel()
        ports = (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and km.is_alive():
            if all(_listening(km.ip, port) for port in ports):
                kc = km.client()
                kc.start_channels()
                kc.wait_for_ready(timeout=timeout)
                return km, kc
            time.sleep(0.1)
        alive = km.is_alive()
        failures.append("did not listen in time" if alive else "died during start-up")
        km.shutdown_kernel(now=True) if alive else km.cleanup_resources()
    raise RuntimeError(f"kernel failed to start {attempts} times: {', '.join(failures)}")


def run_cell(kc: Any, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Execute ``code``; the reply's content and everything the cell printed."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)
