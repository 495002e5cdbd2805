"""Kernels started by another user, for the group tests (tests/real/test_group.py): run as that user with
``python -m tests.helpers.member_kernels`` in the environment their ``module load`` gives.

One JSON object per line on stdin, one answer per line on stdout:

* ``{"start": "NAME"}`` → ``{"id": N}``: start the kernelspec NAME (as Jupyter finds it) and wait until ready;
* ``{"run": N, "code": "..."}`` → ``{"status": "ok", "out": "..."}``: execute a cell in kernel N;
* ``{"stop": N}`` → ``{"stopped": N}``. At end of input every kernel still running is shut down.

Errors are answered as ``{"error": "..."}`` so that the test sees them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main() -> int:
    from jupyter_client.manager import KernelManager

    from tests.helpers.kernels import run_cell, start_ready_kernel

    # Answers go to our own copy of stdout; kernels inherit fd 1, which now goes to stderr (their output
    # would otherwise mix with the answers).
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    kernels: dict[int, tuple[Any, Any]] = {}
    started = 0
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            try:
                if "start" in request:
                    name = str(request["start"])
                    km, kc = start_ready_kernel(lambda name=name: KernelManager(kernel_name=name))
                    started += 1
                    kernels[started] = (km, kc)
                    answer: dict[str, Any] = {"id": started}
                elif "run" in request:
                    _km, kc = kernels[int(request["run"])]
                    reply, out = run_cell(kc, str(request["code"]))
                    answer = {"status": reply["status"], "out": out,
                              "error": reply.get("evalue", "") if reply["status"] != "ok" else ""}
                elif "stop" in request:
                    km, kc = kernels.pop(int(request["stop"]))
                    kc.stop_channels()
                    km.shutdown_kernel(now=False)
                    answer = {"stopped": request["stop"]}
                else:
                    answer = {"error": f"unknown request {request!r}"}
            except Exception as exc:  # the test reads it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        for km, kc in kernels.values():
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
