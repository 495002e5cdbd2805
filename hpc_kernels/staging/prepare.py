"""The derived recipe each build runs (:func:`prepare`), its preview, its labels, and the hint for a build
that could not reach the network."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_kernels import __version__, oci
from hpc_kernels.build import recipegen
from hpc_kernels.build.derive import derive
from hpc_kernels.build.recipegen import Label
from hpc_kernels.build.stamps import input_digest
from hpc_kernels.errors import BuildError
from hpc_kernels.fsutil import atomic_write
from hpc_kernels.model import Fetch
from hpc_kernels.staging import requirements
from hpc_kernels.staging.cache import PIN_TIMEOUT, Base, Staged, _dir, _sha256
from hpc_kernels.staging.inputs import _final_base, _inputs
from hpc_kernels.staging.needs import Needs, Remote, needs
from hpc_kernels.staging.wheelhouse import normalised_dir

if TYPE_CHECKING:
    from hpc_kernels.build.recipegen import Derivation
    from hpc_kernels.model import KernelEntry

EventSink = Callable[[str], None]




@dataclass(frozen=True)
class Prepared:
    """The recipe one build runs, and what its image will say about itself."""

    recipe: Path
    text: str
    fetch: Fetch
    labels: dict[str, str]
    staged: Staged | None
    notes: tuple[str, ...] = ()




def prepare(entry: KernelEntry, *, digest: str, build_id: str, fetch: Fetch,
            on_event: EventSink = lambda _m: None, pull: bool = False) -> Prepared:
    """Write the derived recipe of one build into the cache (staging first with :data:`Fetch.STAGE`)."""
    need = needs(entry)
    result: Staged | None = None
    pins: dict[int, str] = {}
    notes: list[str] = []
    if fetch is Fetch.NETWORK:
        final_digest = ""
        for remote in need.remote:
            pin = _pin(entry, need, remote, on_event)
            if pin:
                pins[remote.stage] = str(remote.ref.pinned(pin)).split("://", 1)[1]
                if remote.stage == len(need.stages) - 1:
                    final_digest = pin
        final = _final_base(need, [Base(r.stage, str(r.ref), final_digest, None) for r in need.remote])
    else:
        result = _inputs(entry, online=fetch is Fetch.STAGE, pull=pull, fresh_lock=False, on_event=on_event,
                         known=need)
        final = result.final
        notes = [f"{n}; a staged build has none" for n in need.notes]
    labels = _labels(entry, need, digest=digest, build_id=build_id, final=final, staged=result is not None)
    how = derivation(entry, need, result, labels, pins)
    text = derive(need.source, how)
    # One file per image (builds of an image hold its lock): the record of its last build points to it.
    key = hashlib.sha256(str(entry.image).encode()).hexdigest()[:12]
    path = _dir("recipes") / f"{entry.name}-{key}.def"
    atomic_write(path, text)
    return Prepared(path, text, fetch, labels, result, tuple(notes))


def preview(entry: KernelEntry, *, staged_inputs: bool = False) -> str:
    """The recipe a build of ``entry`` runs (``show --recipe``, ``build --slurm --dry-run``), without network:
    from the staging cache with ``staged_inputs``, else as a build without staging (its base as written)."""

    need = needs(entry)
    result = _inputs(entry, online=False, pull=False, fresh_lock=False, on_event=lambda _m: None, known=need) \
        if staged_inputs else None
    final = result.final if result is not None else \
        _final_base(need, [Base(r.stage, str(r.ref), r.ref.digest, None) for r in need.remote])
    labels = _labels(entry, need, digest=input_digest(entry), build_id="(set by each build)", final=final,
                     staged=result is not None)
    return derive(need.source, derivation(entry, need, result, labels, write=False))


def _pin(entry: KernelEntry, need: Needs, remote: Remote, on_event: EventSink) -> str:
    """Without staging: the digest a registry base's tag points to now (one HEAD request), so the image can say
    which base it has. Best effort: a registry that cannot be reached or wants a login (Apptainer may have
    one) leaves the reference as written, and Apptainer's own pull says what is wrong; only a registry that
    answers that the image does not exist stops the build here, in one sentence."""
    if remote.ref.transport is oci.Transport.LIBRARY:
        return ""
    if remote.ref.digest:
        return remote.ref.digest
    if os.environ.get("HPC_KERNELS_NO_LOOKUP"):
        # No request at all (an air-gapped node that must not even try; the test suite, which addresses
        # nothing beyond loopback): the image then names its base as written, without a digest.
        return ""
    on_event(f"looking up {remote.ref}")
    try:
        return oci.resolve(remote.ref, timeout=PIN_TIMEOUT)
    except oci.RegistryError as exc:
        if exc.kind == "not-found":
            raise BuildError(entry.name, f"{need.shown_line(remote.line)}: {exc}") from None
        on_event(f"note: could not look up the digest of {remote.ref} ({str(exc).rstrip('.')}); the image's "
                 "labels will not name its base's digest")
        return ""


def offline_hint(entry: KernelEntry | None, said: str, staged: bool = False) -> str:
    """What to do about a build that could not reach the network (``said``: the line that says so)."""
    name = entry.name if entry is not None else "NAME"
    if staged:
        return (f"this build ran from staged inputs, without network (the log says: {said.strip()[:200]}), but the "
                "recipe itself reaches the network: hpc-kernels stages the base image and the Python packages "
                "pip installs, not what other %post commands (apt-get, curl, git...) download; do those in the "
                "base image instead, or set 'staging: never' and build where there is network.")
    return (f"this node could not reach the network (the log says: {said.strip()[:200]}). Compute nodes of Narval "
            "and Rorqual have no internet: let hpc-kernels stage the inputs on the login node and build offline "
            f"in the job: 'hpc-kernels build {name} --slurm' does when the registry's 'staging:' is 'auto' (the "
            "default) or 'always' ('always' also stages local builds); this kernel builds with "
            f"'staging: {entry.staging.value if entry is not None else 'never'}' (README: \"Compute nodes without "
            "internet\").")


def derivation(entry: KernelEntry, need: Needs, result: Staged | None, labels: dict[str, str],
               pins: dict[int, str] | None = None, write: bool = True) -> Derivation:
    """How :func:`~hpc_kernels.build.derive.derive` turns ``entry``'s recipe into the one a build runs."""
    pythons = tuple(dict.fromkeys([*([entry.command[0]] if _plain_program(entry.command[0]) else []),
                                   "python3", "python"]))
    label_items = tuple(labels.items())
    if result is not None:
        install = None
        if result.wheelhouse is not None and (need.own is not None or result.extras):
            install = recipegen.Install(True, result.wheelhouse.path, recipegen.INSTALL_FILE, result.pip_wheel)
        return recipegen.Derivation(
            label_items, bases={b.stage: b.sif for b in result.bases if b.sif is not None}, offline=True,
            wheels=result.wheelhouse.path if result.wheelhouse else None, install=install, pythons=pythons)
    install = None
    if need.own is not None or need.generated:
        lock_python = requirements.read_lock(need.lock).python if need.lock else None  # type: ignore[union-attr]
        python = lock_python or (need.own.python if need.own else None)
        ipykernel = need.generated and need.lock is None and not (need.own and "ipykernel" in need.own.names)
        directory = normalised_dir(need.own, write=write)
        install = recipegen.Install(False, directory, "requirements.txt" if need.own else "", None, python,
                                    ipykernel)
    return recipegen.Derivation(label_items, pins=pins or {}, install=install, pythons=pythons)


def _plain_program(word: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9_./+-]+$", word)) and "{" not in word


def _labels(entry: KernelEntry, need: Needs, *, digest: str, build_id: str, final: Base | None,
            staged: bool) -> dict[str, str]:
    labels = {
        Label.VERSION.value: __version__,
        Label.BUILD_ID.value: build_id,
        Label.INPUTS_DIGEST.value: f"sha256:{digest}" if digest and ":" not in digest else digest,
        Label.RECIPE.value: need.source.shown,
        Label.RECIPE_DIGEST.value: "sha256:" + hashlib.sha256(need.source.text.encode()).hexdigest(),
        Label.BASE.value: final.shown if final else (need.stages[-1].get("bootstrap") or "none"),
        Label.BASE_DIGEST.value: (final.digest if final and final.digest else "unknown"),
        Label.STAGED.value: "yes" if staged else "no",
    }
    if need.own_base is not None:
        labels[Label.REQUIREMENTS.value] = str(need.own_base.path)
        labels[Label.REQUIREMENTS_DIGEST.value] = "sha256:" + need.own_base.digest()
    if need.lock is not None:
        labels[Label.LOCK.value] = f"{need.lock} sha256:{_sha256(need.lock)}"
    return labels
