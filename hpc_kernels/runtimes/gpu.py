"""Which GPUs this node has, decided at launch: no runtime owns it, each maps the answer to its flags
(``Features.gpu_flags``). Import-light: the launcher runs it on every kernel start."""

from __future__ import annotations

import os

#: Device files that show a vendor's GPU driver on this node.
NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0")
AMD_DEVICES = ("/dev/kfd",)


def detect(gpu: str, exists: object = os.path.exists) -> tuple[str | None, str | None]:
    """The vendor (``nvidia``/``rocm``) whose GPUs a kernel asking ``gpu`` gets here, and a warning when
    the request cannot be met. ``gpu`` is the registry's ``auto``/``nvidia``/``rocm``/``none``."""
    check = exists if callable(exists) else os.path.exists
    nvidia = any(bool(check(d)) for d in NVIDIA_DEVICES)
    amd = any(bool(check(d)) for d in AMD_DEVICES)
    if gpu == "none":
        return None, None
    if gpu == "nvidia":
        return ("nvidia", None) if nvidia else (None, "gpu: nvidia requested but this node has no NVIDIA device")
    if gpu == "rocm":
        return ("rocm", None) if amd else (None, "gpu: rocm requested but this node has no AMD GPU (/dev/kfd)")
    if nvidia:
        return "nvidia", None
    if amd:
        return "rocm", None
    return None, None
