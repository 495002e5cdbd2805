"""``hpc-kernels doctor``: every way a kernel can fail to appear in the menu or to start, with a fix.

Each check is a small function that returns :class:`Finding` objects (``ok``, ``warn`` or ``fail``,
a message saying what was seen, and a fix). Checks read the node through a :class:`Context` so a
test can point one at another hostname, ``/proc`` or ``/etc``; the probes that matter (the
runtime's version, ``import ipykernel`` inside the image, the launcher's Python) run the real
programs through :func:`hpc_kernels.proc.run`, with time-outs.

Modules: :mod:`.base` (Finding, Context, check ids), :mod:`.hostchecks`, :mod:`.kernelchecks`,
:mod:`.installchecks`, :mod:`.reporting` (``run_checks``, the report). Nothing is imported here.
"""
