"""``gc`` runs a container program only when a kernel of ours uses it: asking Podman on a cluster where every
kernel is Apptainer's started Podman's machinery (~/.config/cni, /run/user/UID, a catatonit process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hpc_kernels import cli, gc, kernelspec, registry, specdirs
from hpc_kernels.errors import RuntimeNotFoundError
from hpc_kernels.runtimes.apptainer import cli as apptainer
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.docker import cli as docker
from hpc_kernels.runtimes.docker import container as dk_container

MakeRegistry = Callable[..., Path]


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every runtime gc tries to run, recorded instead of run (none of them is started for real)."""
    calls: list[str] = []

    def container_cli(self: docker.ContainerCLI, runtime: str, binary: str | None = None) -> None:
        calls.append(runtime)
        raise RuntimeNotFoundError(f"{runtime}: not run in tests")

    def find_apptainer(environ: object = None, fallback: str = "") -> str:
        calls.append("apptainer")
        raise RuntimeNotFoundError("apptainer: not run in tests")

    monkeypatch.setattr(docker.ContainerCLI, "__init__", container_cli)
    monkeypatch.setattr(apptainer, "find_binary", find_apptainer)
    return calls


def test_gc_with_no_kernels_runs_no_runtime(asked: list[str]) -> None:
    assert gc.sweep(dry_run=False) == []
    assert asked == []  # used to ask podman, then docker, then apptainer
    assert cli.main(["gc"]) == 0 and asked == []


def test_gc_asks_the_runtime_an_installed_kernelspec_names(asked: list[str], make_registry: MakeRegistry,
                                                           tmp_path: Path) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  box:\n    runtime: podman\n    image: python:3.12\n"
                         f"  sci:\n    image: {image}\n")
    for entry in registry.load_file(path).kernels:
        kernelspec.install(entry, specdirs.Target(), path)
    asked.clear()  # install looked for Apptainer to find the given image's Python: gc's own asks follow
    path.unlink()  # the registry is gone: the kernelspecs alone say what is in use
    assert gc.runtimes_in_use() == {"podman", "apptainer"}
    gc.sweep(dry_run=True)
    assert sorted(asked) == ["apptainer", "podman"]


def test_gc_asks_the_runtimes_of_the_registry(asked: list[str], make_registry: MakeRegistry) -> None:
    path = make_registry("kernels:\n  box:\n    runtime: docker\n    image: python:3.12\n")
    assert cli.main(["gc", "--dry-run", "--registry", str(path)]) == 0
    assert asked == ["docker"]
    asked.clear()
    assert cli.main(["gc", "--registry", str(path.parent / "missing.yaml")]) == 1  # named: must load
    assert asked == []


def test_gc_asks_the_runtimes_our_records_name(asked: list[str]) -> None:
    dk_container.mark_used("podman")  # what a podman kernel's launch leaves, even once uninstalled
    assert gc.runtimes_in_use() == {"podman"}
    app_instance.root().mkdir(parents=True)  # shared-instance state of ours: Apptainer's
    gc.sweep(dry_run=True)
    assert sorted(asked) == ["apptainer", "podman"]


def test_a_container_kernel_marks_its_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hpc_kernels.model import LaunchSpec

    class Stop(Exception):
        pass

    def host_network(self: docker.ContainerCLI) -> None:
        raise Stop

    monkeypatch.setattr(docker.ContainerCLI, "check_host_network", host_network)
    spec = LaunchSpec(kernel="box", runtime="podman", mode="exec", image="/unused", container_image="img:1",
                      command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"))
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    with pytest.raises(Stop):
        dk_container.arm(spec, str(tmp_path / "kernel-1.json"), {"PATH": str(tmp_path)})
    assert dk_container.runtimes_marked() == ["podman"]


def test_the_runtime_mark_is_private_state() -> None:
    dk_container.mark_used("docker")
    marker = dk_container._mark("docker")
    assert oct(marker.stat().st_mode & 0o777) == oct(0o600)
    assert oct(marker.parent.stat().st_mode & 0o777) == oct(0o700)
