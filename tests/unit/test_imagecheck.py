"""An image must be able to start its kernel: its Python is found (python3, else python) and recorded at build
time, or at install time for an image given as is; an image that cannot start its kernel is refused with
the fix. Driven with fakes here (what the image holds is data); tests/test_imagecheck_real.py runs Apptainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import pytest

from hpc_kernels import cli, kernelspec, keys, model, registry, specdirs
from hpc_kernels.build import imagecheck, orchestrator, stamps
from hpc_kernels.errors import BuildError, HpcKernelsError
from tests.helpers.builders import DEF, FakeBuilder

NO_IPYKERNEL = "ModuleNotFoundError: No module named 'ipykernel'"


def load(make_registry: Any, kernel: str) -> model.KernelEntry:
    path = make_registry(
        f"defaults:\n  images_dir: images\nkernels:\n  sci:\n{kernel}",
        {"sci.def": DEF, "data/a.txt": "a", "env.yml": "x", "base.sif": "base", "given.sif": "an image"},
    )
    return registry.load_file(path).kernels[0]


@pytest.fixture
def entry(make_registry: Any) -> model.KernelEntry:
    return load(make_registry, "    def: sci.def\n")


def kernel_argv(entry: model.KernelEntry) -> list[str]:
    data = json.loads((specdirs.Target().kernels_dir() / entry.name / "kernel.json").read_text())
    return list(data["metadata"]["hpc_kernels"]["command"])


def test_the_default_command_is_python3_until_an_image_says_otherwise(entry: model.KernelEntry) -> None:
    assert entry.command[0] == "python3" and not entry.command_given
    assert imagecheck.kernel_command(entry) == keys.DEFAULT_COMMAND


@pytest.mark.parametrize(("programs", "found"), [
    ({"python3": "ok", "python": "ok"}, "python3"),
    ({"python": "ok"}, "python"),  # an image with only `python`
    ({"python3": NO_IPYKERNEL, "python": "ok"}, "python"),  # a system python3 beside a conda python
])
def test_a_build_finds_the_python_with_ipykernel_and_the_kernelspec_uses_it(
        entry: model.KernelEntry, programs: dict[str, str], found: str) -> None:
    fake = FakeBuilder(programs=programs)
    orchestrator.build(entry, builder=fake)
    stamp = stamps.read_stamp(entry.image)
    assert stamp is not None and stamp["program"] == found and stamp["program_check"] == "import ipykernel"
    assert all(argv[1:] == ["-c", "import ipykernel"] for argv in fake.ran)
    kernelspec.install(entry, specdirs.Target())
    assert kernel_argv(entry) == [found, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


@pytest.mark.parametrize(("programs", "reason", "fix"), [
    ({}, "the image has no Python: neither python3 nor python is on its PATH", "install Python and ipykernel"),
    ({"python3": NO_IPYKERNEL}, "'python3 -c \"import ipykernel\"' fails in the image",
     "add 'python3 -m pip install ipykernel'"),
])
def test_a_built_image_that_cannot_start_its_kernel_is_a_failed_build(
        entry: model.KernelEntry, programs: dict[str, str], reason: str, fix: str) -> None:
    orchestrator.build(entry, builder=FakeBuilder())
    good = entry.image.read_text()
    stamp = stamps.read_stamp(entry.image)
    assert entry.recipe is not None
    entry.recipe.write_text(DEF + "\n# edited\n")
    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=FakeBuilder(programs=programs))
    message = str(info.value)
    assert reason in message and fix in message and "set 'command:' of kernel 'sci'" in message
    assert "the previous image, if any, is kept" in message and info.value.log_path
    assert entry.image.read_text() == good and stamps.read_stamp(entry.image) == stamp
    assert sorted(p.name for p in entry.image.parent.iterdir()) == ["sci.sif", "sci.sif.hpck.json"]


def test_a_given_command_is_checked_as_given(make_registry: Any) -> None:
    entry = load(make_registry, "    def: sci.def\n    language: R\n"
                                "    command: [R, --slave, -e, 'IRkernel::main()', --args, '{connection_file}']\n")
    assert entry.command_given
    fake = FakeBuilder(programs={"sh": "ok"})
    orchestrator.build(entry, builder=fake)
    # The program's name is an argument of a fixed script, never part of it.
    assert fake.ran == [["sh", "-c", 'command -v "$1"', "sh", "R"]]
    assert stamps.read_stamp(entry.image)["program"] == "R"  # type: ignore[index]
    assert imagecheck.kernel_command(entry) == entry.command

    class NoR(FakeBuilder):
        def runner(self, entry: model.KernelEntry, image: str) -> Any:
            return lambda argv: (1, "")  # `command -v R` finds nothing

    with pytest.raises(BuildError, match="the kernel's program 'R' does not exist in the image"):
        orchestrator.build(entry, builder=NoR(), force=True)


def test_a_given_python_command_must_import_its_module(make_registry: Any) -> None:
    entry = load(make_registry, "    def: sci.def\n    command: [python, -m, ipykernel_launcher, -f, '{connection_file}']\n")
    with pytest.raises(BuildError, match="the kernel's program 'python' does not exist in the image"):
        orchestrator.build(entry, builder=FakeBuilder(programs={"python3": "ok"}))
    with pytest.raises(BuildError, match="'python -c \"import ipykernel\"' fails in the image"):
        orchestrator.build(entry, builder=FakeBuilder(programs={"python": NO_IPYKERNEL}))
    orchestrator.build(entry, builder=FakeBuilder(programs={"python": "ok"}))


def test_a_container_that_does_not_start_fails_the_build(entry: model.KernelEntry) -> None:
    class Broken(FakeBuilder):
        def runner(self, entry: model.KernelEntry, image: str) -> Any:
            return lambda argv: (255, "FATAL:   could not open image: image format not recognized")

    with pytest.raises(BuildError, match=r"could not be started to check it.*image format not recognized"):
        orchestrator.build(entry, builder=Broken())
    assert not entry.image.exists()


def test_only_a_python_we_would_have_found_is_taken_from_a_record(entry: model.KernelEntry) -> None:
    orchestrator.build(entry, builder=FakeBuilder(programs={"python": "ok"}))
    stamp = json.loads(stamps.stamp_path(entry.image).read_text())
    stamp["program"] = "/tmp/evil"
    stamps.stamp_path(entry.image).write_text(json.dumps(stamp))
    assert imagecheck.kernel_command(entry) == keys.DEFAULT_COMMAND


# ----------------------------------------------------------------------------- given images, at install time


class FakeApptainer:
    """Stands in for `apptainer exec` of the given image: ``programs`` as in FakeBuilder; records each run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, programs: dict[str, str] | None) -> None:
        from hpc_kernels.runtimes.apptainer import cli as apptainer

        self.ran: list[list[str]] = []
        self.programs = programs
        if programs is None:
            def missing(*_a: Any, **_k: Any) -> str:
                raise apptainer.RuntimeNotFoundError(apptainer.NOT_FOUND_HINT)

            monkeypatch.setattr(apptainer, "find_binary", missing)
        else:
            monkeypatch.setattr(apptainer, "find_binary", lambda *a, **k: "/fake/apptainer")
        monkeypatch.setattr(imagecheck, "probe_spec_runner", self.runner)

    def runner(self, entry: model.KernelEntry, image: str, binary: str, timeout: float = 0) -> Any:
        assert image == str(entry.image) and binary == "/fake/apptainer"

        def run(argv: Sequence[str]) -> tuple[int, str]:
            self.ran.append(list(argv))
            behaviour = (self.programs or {}).get(argv[0])
            if behaviour is None:
                return 255, f'FATAL:   "{argv[0]}": executable file not found in $PATH'
            return (0, "") if behaviour == "ok" else (1, behaviour)

        return run


@pytest.fixture
def given(make_registry: Any) -> model.KernelEntry:
    return load(make_registry, "    image: given.sif\n")


def test_install_finds_the_python_of_a_given_image_once(given: model.KernelEntry, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeApptainer(monkeypatch, {"python": "ok"})
    reg = str(given.image.parent / "kernels.yaml")
    assert cli.main(["install", "sci", "--registry", reg]) == 0
    assert kernel_argv(given)[0] == "python"
    assert [a[0] for a in fake.ran] == ["python3", "python"]
    # Remembered (outside the image's directory: not ours to write in) until the image changes.
    assert sorted(p.name for p in given.image.parent.iterdir() if p.suffix == ".json") == []
    assert cli.main(["install", "sci", "--registry", reg]) == 0
    assert len(fake.ran) == 2
    given.image.write_text("another image")
    os.utime(given.image, (1, 1))
    assert cli.main(["install", "sci", "--registry", reg]) == 0
    assert len(fake.ran) == 4


def test_install_refuses_a_given_image_that_cannot_start_its_kernel(given: model.KernelEntry,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    FakeApptainer(monkeypatch, {"python3": NO_IPYKERNEL})
    with pytest.raises(HpcKernelsError) as info:
        kernelspec.install(given, specdirs.Target())
    assert f"kernel 'sci' cannot start in {given.image}" in str(info.value)
    assert "python3 -m pip install ipykernel" in str(info.value)
    assert not (specdirs.Target().kernels_dir() / "sci").exists()


@pytest.mark.parametrize("programs", [None, {"python3": "FATAL: could not open image"}])
def test_install_says_when_it_could_not_look_into_the_image(given: model.KernelEntry,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            programs: dict[str, str] | None) -> None:
    class Failing(FakeApptainer):
        def runner(self, entry: model.KernelEntry, image: str, binary: str, timeout: float = 0) -> Any:
            return lambda argv: (255, "FATAL:   could not open image: image format not recognized")

    (FakeApptainer if programs is None else Failing)(monkeypatch, programs)
    notes: list[str] = []
    kernelspec.install(given, specdirs.Target(), on_note=notes.append)
    assert kernel_argv(given)[0] == "python3"
    assert len(notes) == 1 and notes[0].startswith("could not look for the image's Python")
    assert ("no Apptainer on PATH" in notes[0]) == (programs is None)


def test_a_given_command_is_not_probed_at_install(make_registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = load(make_registry, "    image: given.sif\n    command: [python, -m, ipykernel_launcher, -f, '{connection_file}']\n")
    fake = FakeApptainer(monkeypatch, {})
    kernelspec.install(entry, specdirs.Target())
    assert fake.ran == [] and kernel_argv(entry)[0] == "python"


def test_no_check_builds_an_image_that_is_not_a_kernel(entry: model.KernelEntry, make_registry: Any,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`build --no-check`: for an image this node cannot run (a GPU, a bind source, another architecture)."""
    fake = FakeBuilder(programs={})
    monkeypatch.setattr(orchestrator, "default_builder", lambda _entry: fake)
    reg = str(entry.image.parent.parent / "kernels.yaml")
    assert cli.main(["build", "sci", "--registry", reg]) == 1
    assert "the image has no Python" in capsys.readouterr().err and not entry.image.exists()
    assert cli.main(["build", "sci", "--no-check", "--registry", reg]) == 0
    stamp = stamps.read_stamp(entry.image)
    assert stamp is not None and "program" not in stamp and fake.ran == [["python3", "-c", "import ipykernel"],
                                                                          ["python", "-c", "import ipykernel"]]
    assert imagecheck.kernel_command(entry) == keys.DEFAULT_COMMAND
    # The flag travels into a Slurm job's build.
    assert cli.main(["build", "sci", "--slurm", "--dry-run", "--no-check", "--registry", reg]) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if '-m hpc_kernels build "$kernel"' in li)
    assert f'--registry {reg} --no-check' in line
