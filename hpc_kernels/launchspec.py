"""What a kernel's launcher needs to know, stored as data in kernel.json's metadata.

Kept free of heavy imports: the launcher reads this on every kernel start.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# Not ``typing.TYPE_CHECKING``: the launcher runs with ``python -S``, where importing typing costs ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: kernel.json ``metadata`` key that marks a kernelspec as ours.
MARKER = "hpc_kernels"
FORMAT = 1


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the launcher decides from; resolved against the node only at launch."""

    kernel: str
    runtime: str
    mode: str
    image: str
    command: tuple[str, ...]
    binds: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = ()
    gpu: str = "auto"
    runtime_args: tuple[str, ...] = ()
    idle_timeout: float = 300.0
    container_image: str | None = None
    image_id: str = ""
    registry: str = ""
    #: The runtime found when the kernelspec was installed: used when the server's PATH has none
    #: (a JupyterHub session where `module load apptainer` was not done).
    runtime_hint: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists)."""
        data = asdict(self)
        data["env"] = dict(self.env)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchSpec:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on data we did not write."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not an hpc-kernels launch spec (or one from another version)")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("command", "binds", "pass_env", "runtime_args"):
            fields[key] = tuple(fields.get(key, ()))
        fields["env"] = tuple(sorted(dict(fields.get("env", {})).items()))
        return cls(**fields)


def read_kernel_json(path: str) -> tuple[dict[str, Any], LaunchSpec]:
    """Load a kernel.json we wrote and its launch spec."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    meta = data.get("metadata", {}).get(MARKER)
    return data, LaunchSpec.from_json(meta)
