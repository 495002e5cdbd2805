"""The whole report: every check in order, as data (:class:`Report`) and as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_kernels import registry, specdirs
from hpc_kernels.doctor.base import FAIL, OK, WARN, Context, Finding
from hpc_kernels.doctor.hostchecks import (
    check_build_namespaces,
    check_environment,
    check_login_node,
    check_runtime,
    check_runtime_version,
    check_state_dirs,
)
from hpc_kernels.doctor.installchecks import check_group, check_installed, check_kernelspec
from hpc_kernels.doctor.kernelchecks import (
    check_binds,
    check_gpu,
    check_image,
    check_ipykernel,
    check_kernel_env,
    check_slurm_job,
)
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.launchspec import read_kernel_json
from hpc_kernels.model import KernelEntry, Runtime
from hpc_kernels.registry import Registry


@dataclass(frozen=True)
class Report:
    """All findings of one doctor run, plus the directories Jupyter searches for kernelspecs."""

    findings: tuple[Finding, ...]
    kernel_dirs: tuple[str, ...]
    registry: str | None

    @property
    def failed(self) -> bool:
        """True when at least one check failed."""
        return any(f.status == FAIL for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for ``doctor --json``."""
        counts = {s: sum(f.status == s for f in self.findings) for s in (OK, WARN, FAIL)}
        return {"ok": not self.failed, "counts": counts, "registry": self.registry,
                "jupyter_kernel_dirs": list(self.kernel_dirs),
                "findings": [f.to_json() for f in self.findings]}




# ----------------------------------------------------------------------------- all of it


def kernel_findings(entry: KernelEntry, apptainer_bin: str | None, installed: Path | None,
                    ctx: Context) -> list[Finding]:
    """Every per-kernel check, in report order; checks that do not apply return nothing."""
    binds = check_binds(entry, ctx)
    probe = check_ipykernel(entry, apptainer_bin, ctx)
    found = [check_image(entry), binds, probe, check_gpu(entry, ctx), check_slurm_job(entry, ctx),
             check_kernel_env(entry),
             check_kernelspec(entry, ctx)]
    result = [f for f in found if f is not None]
    if installed is not None:
        result += check_installed(entry.name, installed, entry, ctx)
    return result


def run_checks(registry: Registry | None, names: list[str] | None = None, ctx: Context | None = None,
               registry_problem: str | None = None) -> Report:
    """Run every check for the named kernels (default: the whole registry and every kernelspec of ours)."""
    ctx = ctx or Context()
    findings: list[Finding] = []
    if registry_problem:
        findings.append(Finding("registry", FAIL if names else WARN, registry_problem,
                                "pass --registry PATH or set HPC_KERNELS_REGISTRY."))
    entries: list[KernelEntry] = []
    if registry is not None:
        entries = list(registry.kernels)
        if names:
            entries = [registry.get(n) for n in names]
        findings.append(Finding("registry", OK, f"{registry.path} (found via {registry.source}), "
                                                f"{len(registry.kernels)} kernel(s)."))
    installed = specdirs.installed_ours()
    runtimes = sorted({str(e.runtime) for e in entries}) or ["apptainer"]
    fallbacks = runtime_hints(installed, {e.name for e in entries} if names else None)
    binaries: dict[str, str | None] = {}
    for runtime in runtimes:
        finding, binaries[runtime] = check_runtime(ctx, runtime, fallbacks)
        findings.append(finding)
    apptainer_bin = binaries.get("apptainer")
    if apptainer_bin:
        findings.append(check_runtime_version(apptainer_bin, ctx))
    optional = check_build_namespaces(ctx, entries)
    if optional:
        findings.append(optional)
    findings.append(check_login_node(ctx))
    findings += check_environment(ctx)
    findings += check_state_dirs()
    if registry is not None:
        findings += check_group(registry, ctx)
    for entry in entries:
        findings += kernel_findings(entry, apptainer_bin, installed.get(entry.name), ctx)
    if not names:
        known = {e.name for e in entries}
        for name, kdir in installed.items():
            if name not in known:
                findings += check_installed(name, kdir, None, ctx)
    return Report(tuple(findings), tuple(str(d) for d in specdirs.search_dirs()),
                  str(registry.path) if registry else None)


def runtime_hints(installed: Mapping[str, Path], only: set[str] | None = None) -> dict[str, str]:
    """The Apptainer each installed kernel's launcher falls back to (recorded at install time; "" if none)."""
    hints: dict[str, str] = {}
    for name, kdir in installed.items():
        if only is not None and name not in only:
            continue
        try:
            _data, spec = read_kernel_json(str(kdir / "kernel.json"))
        except (OSError, ValueError):
            continue
        if spec.runtime == Runtime.APPTAINER:
            hints[name] = spec.runtime_hint
    return hints


def load_registry(explicit: str | None) -> tuple[Registry | None, str | None]:
    """The registry, or the sentence saying why there is none (doctor runs anyway)."""
    try:
        return registry.load(explicit), None
    except HpcKernelsError as exc:
        return None, str(exc)


def report_json(report: Report) -> str:
    """``doctor --json`` text."""
    return json.dumps(report.to_json(), indent=2)
