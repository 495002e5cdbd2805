"""Incremental, atomic and locked builds, with a recording fake builder (the real one is in test_e2e)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import model, registry
from hpc_kernels.build import orchestrator, stamps
from hpc_kernels.errors import BuildBusyError, BuildError
from hpc_kernels.runtimes.base import LineSink
from tests.helpers.builders import DEF, FakeBuilder


@pytest.fixture
def entry(make_registry: Any) -> model.KernelEntry:
    path = make_registry(
        "defaults:\n  images_dir: images\nkernels:\n  sci:\n    def: sci.def\n",
        {"sci.def": DEF, "data/a.txt": "a", "data/b.txt": "b", "env.yml": "x", "base.sif": "base"},
    )
    return registry.load_file(path).kernels[0]


def with_changes(entry: model.KernelEntry, **changes: Any) -> model.KernelEntry:
    from dataclasses import replace

    return replace(entry, **changes)


def test_recipe_inputs_follow_files_section(entry: model.KernelEntry) -> None:
    assert entry.recipe is not None
    sources, base = stamps.recipe_inputs(entry.recipe)
    root = entry.recipe.parent
    assert sources == [root / "data/a.txt", root / "data/b.txt", root / "env.yml"]
    assert base == root / "base.sif"


def test_incremental(entry: model.KernelEntry) -> None:
    fake = FakeBuilder()
    assert stamps.image_state(entry).status == "missing"
    assert orchestrator.build(entry, builder=fake).action == "built"
    assert stamps.image_state(entry).status == "built"
    assert orchestrator.build(entry, builder=fake).action == "up-to-date"
    assert len(fake.calls) == 1
    assert entry.recipe is not None
    # a file copied by %files changes -> stale -> rebuilt
    (entry.recipe.parent / "data" / "b.txt").write_text("changed")
    assert stamps.image_state(entry).status == "stale"
    assert orchestrator.build(entry, builder=fake).action == "built"
    # a new file matching the glob counts too
    (entry.recipe.parent / "data" / "c.txt").write_text("new")
    assert stamps.image_state(entry).status == "stale"
    orchestrator.build(entry, builder=fake)
    # build options are inputs
    zstd = with_changes(entry, compression="zstd")
    assert stamps.image_state(zstd).status == "stale"
    orchestrator.build(zstd, builder=fake)
    assert fake.calls[-1] == ["--mksquashfs-args", "-comp zstd"]
    # --force rebuilds an up-to-date image
    assert orchestrator.build(zstd, builder=fake, force=True).action == "built"
    assert len(fake.calls) == 5


def test_failed_build_keeps_the_good_image(entry: model.KernelEntry) -> None:
    orchestrator.build(entry, builder=FakeBuilder())
    good = entry.image.read_text()
    assert entry.recipe is not None
    entry.recipe.write_text(DEF + "\n# edited\n")
    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=FakeBuilder(fail=True))
    assert "FATAL: %post failed" in str(info.value)
    assert info.value.log_path and Path(info.value.log_path).read_text().count("FATAL") == 1
    assert entry.image.read_text() == good
    assert not list(entry.image.parent.glob(".sci.sif.tmp-*"))
    assert not list(entry.image.parent.glob(".sci.sif.build-*"))
    assert stamps.image_state(entry).status == "stale"


def test_leftover_temporary_of_a_killed_build_is_removed(entry: model.KernelEntry) -> None:
    entry.image.parent.mkdir(parents=True, exist_ok=True)
    stale = entry.image.parent / ".sci.sif.tmp-999999"
    stale.write_text("half an image")
    orchestrator.build(entry, builder=FakeBuilder())
    assert not stale.exists()


def _build_in_child(entry: model.KernelEntry, wait: bool, queue: Any) -> None:
    try:
        result = orchestrator.build(entry, builder=FakeBuilder(delay=1.5), wait=wait)
        queue.put(result.action)
    except BuildBusyError:
        queue.put("busy")


def test_concurrent_builds_one_builds_the_other_waits(entry: model.KernelEntry) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(entry, True, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted([queue.get(timeout=5), queue.get(timeout=5)]) == ["built", "up-to-date"]
    assert entry.image.read_text().startswith("image from")


def test_concurrent_build_without_wait_reports_busy(entry: model.KernelEntry) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    first = ctx.Process(target=_build_in_child, args=(entry, True, queue))
    first.start()
    lock = orchestrator.lock_path(entry.image)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    second = ctx.Process(target=_build_in_child, args=(entry, False, queue))
    second.start()
    second.join(30)
    first.join(30)
    assert sorted([queue.get(timeout=5), queue.get(timeout=5)]) == ["built", "busy"]


def test_build_environment_follows_drac_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               entry: model.KernelEntry) -> None:
    from hpc_kernels.build import temp as buildtemp

    monkeypatch.setenv("APPTAINER_BIND", "/project,/scratch")
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    monkeypatch.delenv("APPTAINER_CACHEDIR", raising=False)
    monkeypatch.delenv("APPTAINER_TMPDIR", raising=False)
    entry.image.parent.mkdir(parents=True, exist_ok=True)
    temp = buildtemp.create(entry.name, entry.image)
    # The build's private temporary directory is on the node-local disk of the job, named after the build.
    assert temp.tmpdir.parent == tmp_path and temp.tmpdir.name.startswith(f"hpck-build-{os.getuid()}-sci-")
    with orchestrator.build_environment(temp):
        assert "APPTAINER_BIND" not in os.environ
        assert os.environ["APPTAINER_CACHEDIR"] == str(tmp_path / "apptainer-cache")
        assert os.environ["APPTAINER_TMPDIR"] == str(temp.tmpdir)
        assert os.environ[buildtemp.ENV_RECORD] == str(temp.workdir / "owner.json")
    assert os.environ["APPTAINER_BIND"] == "/project,/scratch"
    assert "APPTAINER_CACHEDIR" not in os.environ and "APPTAINER_TMPDIR" not in os.environ
    assert buildtemp.remove(temp) == [] and not temp.tmpdir.exists() and not temp.workdir.exists()


def test_entry_without_recipe_is_not_buildable(make_registry: Any) -> None:
    reg = registry.load_file(make_registry("kernels:\n  ext:\n    image: /nowhere/ext.sif\n"))
    assert stamps.image_state(reg.kernels[0]).status == "external-missing"
    with pytest.raises(BuildError, match="no 'def' recipe"):
        orchestrator.build(reg.kernels[0], builder=FakeBuilder())


def test_an_image_we_did_not_build_is_never_overwritten(entry: model.KernelEntry) -> None:
    entry.image.parent.mkdir(parents=True, exist_ok=True)
    entry.image.write_text("the user's own image")
    assert stamps.image_state(entry).status == "foreign"
    fake = FakeBuilder()
    for force in (False, True):
        with pytest.raises(BuildError, match="was not built by hpc-kernels"):
            orchestrator.build(entry, builder=fake, force=force)
    assert entry.image.read_text() == "the user's own image" and fake.calls == []


def test_a_missing_files_source_is_found_before_the_build_with_its_recipe_line(entry: model.KernelEntry) -> None:
    assert entry.recipe is not None
    (entry.recipe.parent / "env.yml").unlink()
    for old in (entry.recipe.parent / "data").glob("*.txt"):
        old.unlink()
    fake = FakeBuilder()
    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=fake)
    text = str(info.value)
    # Both sources, each with the recipe's file:line; the builder (the base image pull) never ran.
    assert f"{entry.recipe}:5: %files source 'data/*.txt' does not exist" in text
    assert f"{entry.recipe}:6: %files source 'env.yml' does not exist (looked for " in text
    assert fake.calls == [] and not entry.image.exists()
    (entry.recipe.parent / "env.yml").write_text("x")
    with pytest.raises(BuildError, match=r"sci.def:5: %files source 'data/\*.txt'"):
        orchestrator.build(entry, builder=fake)
    (entry.recipe.parent / "data" / "a.txt").write_text("a")
    assert orchestrator.build(entry, builder=fake).action == "built"


def test_build_cli_names_the_missing_files_source(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from hpc_kernels import cli

    path = make_registry("kernels:\n  sci:\n    def: sci.def\n",
                         {"sci.def": "Bootstrap: docker\nFrom: python:3.12-slim\n\n%files\n    wheels /opt/wheels\n"})
    for argv in (["build", "sci"], ["build", "sci", "--slurm", "--dry-run"]):
        assert cli.main([*argv, "--registry", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"{path.parent / 'sci.def'}:5: %files source 'wheels' does not exist" in err, err


OFFLINE_TAILS = [
    'FATAL:   While performing build: conveyor failed to get: Get "https://registry-1.docker.io/v2/": '
    "dial tcp: lookup registry-1.docker.io on 10.10.0.1:53: no such host",
    'Get "https://index.docker.io/v2/": dial tcp 54.1.2.3:443: connect: network is unreachable',
    'Get "https://quay.io/v2/": dial tcp 127.0.0.1:443: connect: connection refused',
    "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving "
    "'deb.debian.org'",
    "curl: (6) Could not resolve host: github.com; Temporary failure in name resolution",
    "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3"
    ".connection.HTTPSConnection object>: Failed to establish a new connection: [Errno -3]')': /simple/numpy/",
    "ERROR: Could not find a version that satisfies the requirement numpy (from versions: none)",
]


@pytest.mark.parametrize("tail", OFFLINE_TAILS)
def test_a_build_that_cannot_reach_the_network_says_what_that_means(entry: model.KernelEntry,
                                                                    tail: str) -> None:
    class Offline(FakeBuilder):
        def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
            on_line(tail)
            raise BuildError(recipe.stem, "apptainer build exited with code 255", f"step 1\n{tail}")

    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=Offline())
    text = str(info.value)
    assert "\nhint: this node could not reach the network (the log says: " in text
    assert "Compute nodes of Narval and Rorqual have no internet" in text
    assert "\"Compute nodes without internet\"" in text
    # The hint names the registry setting that makes such a build work: staging on the login node.
    assert "'hpc-kernels build sci --slurm'" in text and "'staging:' is 'auto'" in text
    assert "this kernel builds with 'staging: auto'" in text
    assert text.index("hint:") < text.index("full build log:")


def test_other_build_failures_get_no_network_hint(entry: model.KernelEntry) -> None:
    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=FakeBuilder(fail=True))
    assert "hint:" not in str(info.value) and info.value.hint == ""


def test_docker_builds_get_the_network_hint_too(make_registry: Any) -> None:
    from hpc_kernels.runtimes.docker import cli as docker

    class OfflineCLI(docker.ContainerCLI):
        def image_labels(self, image: str) -> dict[str, str] | None:
            return None

        def image_id(self, image: str) -> str | None:
            return None

        def build(self, recipe: Path, dest: Path, options: list[str], on_line: LineSink) -> None:
            raise BuildError(recipe.stem, "podman build exited with code 125", OFFLINE_TAILS[0])

    path = make_registry("kernels:\n  box:\n    def: box.def\n    runtime: podman\n",
                         {"box.def": "Bootstrap: docker\nFrom: python:3.12-slim\n"})
    entry = registry.load_file(path).kernels[0]
    with pytest.raises(BuildError, match="hint: this node could not reach the network"):
        orchestrator.build(entry, builder=OfflineCLI("podman", "/bin/false"))


def test_an_image_truncated_after_its_build_is_damaged_and_rebuilt(entry: model.KernelEntry) -> None:
    fake = FakeBuilder()
    orchestrator.build(entry, builder=fake)
    stamp = stamps.read_stamp(entry.image)
    assert stamp is not None and stamp["size"] == entry.image.stat().st_size
    whole = entry.image.read_bytes()
    with entry.image.open("r+b") as fh:  # what a full disk or quota leaves after a copy
        fh.truncate(len(whole) // 2)
    assert stamps.image_state(entry).status == "damaged"
    assert orchestrator.build(entry, builder=fake).action == "built" and len(fake.calls) == 2

    def same_build(data: bytes) -> bytes:  # every build has its own id (a label of the image)
        return b"\n".join(ln for ln in data.split(b"\n") if b"org.hpc-kernels.build-id" not in ln)

    assert same_build(entry.image.read_bytes()) == same_build(whole) and stamps.image_state(entry).status == "built"
    # Overwritten with a file of the same size: the modification time tells.
    entry.image.write_bytes(b"x" * len(whole))
    assert stamps.image_state(entry).status == "damaged"


def test_records_of_earlier_versions_without_size_are_trusted(entry: model.KernelEntry) -> None:
    import json

    orchestrator.build(entry, builder=FakeBuilder())
    stamp = stamps.read_stamp(entry.image)
    assert stamp is not None
    old = {k: v for k, v in stamp.items() if k not in ("size", "mtime_ns")}
    stamps.stamp_path(entry.image).write_text(json.dumps(old))
    entry.image.write_text("changed")
    assert stamps.image_state(entry).status == "built"


def test_list_and_doctor_show_a_damaged_image(entry: model.KernelEntry,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from hpc_kernels import cli
    from hpc_kernels.doctor import kernelchecks

    orchestrator.build(entry, builder=FakeBuilder())
    entry.image.write_bytes(b"")
    registry_path = str(entry.recipe.parent / "kernels.yaml") if entry.recipe else ""
    assert cli.main(["list", "--json", "--registry", registry_path]) == 0
    assert json.loads(capsys.readouterr().out)["kernels"][0]["image_state"] == "damaged"
    finding = kernelchecks.check_image(entry)
    assert finding.status == "fail" and "not the file hpc-kernels built" in finding.message
    assert finding.fix == "hpc-kernels build sci"
