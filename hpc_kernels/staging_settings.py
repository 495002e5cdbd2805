"""The registry's ``staging:`` setting and where a build takes its inputs from (kept apart from
:mod:`hpc_kernels.staging` so that loading the registry stays cheap)."""

from __future__ import annotations

import enum


class Staging(str, enum.Enum):
    """The registry's ``staging:`` setting."""

    AUTO = "auto"  # stage for `build --slurm` (the job builds offline); a local build fetches as the recipe says
    ALWAYS = "always"  # stage for every build: no build ever fetches anything itself
    NEVER = "never"  # never stage: builds (jobs too) fetch as the recipe says (Fir's compute nodes have internet)


class Fetch(str, enum.Enum):
    """Where one build takes its inputs from."""

    NETWORK = "network"  # the recipe fetches during the build (a base digest is pinned when it can be looked up)
    STAGE = "stage"  # fetch into the staging cache now, then build from it
    STAGED = "staged"  # from the staging cache only; never the network
