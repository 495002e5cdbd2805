"""Kernelspec writes are atomic: a full disk during install leaves the old kernelspec (or none), never a
half-written one, and what an interrupted install left behind is recognised and cleaned up."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hpc_kernels import cli, kernelspec, paths, registry, specdirs
from hpc_kernels.errors import HpcKernelsError, NotOursError

MakeRegistry = Callable[..., Path]


@pytest.fixture
def reg(make_registry: MakeRegistry, tmp_path: Path) -> Path:
    image = tmp_path / "sci.sif"
    image.write_bytes(b"sif")
    return make_registry(f"kernels:\n  sci:\n    image: {image}\n    display_name: Science\n")


def disk_full_under(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Every write to a file under ``root`` fails with ENOSPC, as on a full filesystem (or quota): both
    os.write and the sendfile that shutil's copies use."""
    real_write, real_sendfile = os.write, os.sendfile

    def full(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if target.startswith(str(root)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(fd: int, data: bytes) -> int:
        full(fd)
        return real_write(fd, data)

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        full(out_fd)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "sendfile", sendfile)


def test_disk_full_on_first_install_leaves_nothing(reg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "prefix"
    disk_full_under(monkeypatch, prefix)
    assert cli.main(["install", "--prefix", str(prefix), "--registry", str(reg), "sci"]) == 1
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert "could not write the kernelspec 'sci' in " in line and "No space left on device" in line
    assert "diskusage_report" in line and "Traceback" not in err
    kdir = prefix / "share" / "jupyter" / "kernels"
    assert list(kdir.iterdir()) == []  # no kernelspec, no 0-byte kernel.json, no staging directory


def test_disk_full_on_reinstall_keeps_the_old_kernelspec(reg: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    entry = registry.load_file(reg).get("sci")
    target = specdirs.Target.from_flags(str(tmp_path / "prefix"), False)
    dest = kernelspec.install(entry, target, reg)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    disk_full_under(monkeypatch, tmp_path / "prefix")
    with pytest.raises(HpcKernelsError, match="No space left on device"):
        kernelspec.install(entry, target, reg)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in dest.parent.iterdir()] == ["sci"]


def half_written_dir(kdir: Path) -> Path:
    """What jupyter_client's copy left when the disk filled: a 0-byte kernel.json and a cut-off logo."""
    from importlib.resources import files

    dest = kdir / "sci"
    dest.mkdir(parents=True)
    (dest / "kernel.json").write_bytes(b"")
    logo = files("hpc_kernels").joinpath("resources", "logo-svg.svg").read_bytes()
    (dest / "logo-svg.svg").write_bytes(logo[:100])
    return dest


def test_install_and_uninstall_recognise_a_half_written_kernelspec(reg: Path) -> None:
    target = specdirs.Target()
    dest = half_written_dir(target.kernels_dir())
    assert specdirs.half_written(dest)
    entry = registry.load_file(reg).get("sci")
    assert kernelspec.install(entry, target, reg) == dest  # used to refuse: "not written by hpc-kernels"
    assert specdirs.is_ours(dest)
    kernelspec.uninstall("sci", target)
    assert not dest.exists()
    half_written_dir(target.kernels_dir())
    assert cli.main(["uninstall", "--all"]) == 0
    assert list(target.kernels_dir().iterdir()) == []


@pytest.mark.parametrize(("name", "content"), [
    ("kernel.json", b'{"argv": ["python"], "display_name": "theirs", "language": "python"}'),
    ("kernel.json", b'{"argv": ["python", "-m", "ipykern'),  # cut off, but not ours
    ("notes.txt", b"mine"),
])
def test_what_is_not_ours_is_still_refused(reg: Path, name: str, content: bytes) -> None:
    target = specdirs.Target()
    dest = target.kernels_dir() / "sci"
    dest.mkdir(parents=True)
    (dest / "kernel.json").write_bytes(b"")
    (dest / name).write_bytes(content)
    assert not specdirs.half_written(dest)
    with pytest.raises(NotOursError):
        kernelspec.install(registry.load_file(reg).get("sci"), target, reg)
    with pytest.raises(NotOursError):
        kernelspec.uninstall("sci", target)
    assert (dest / name).read_bytes() == content


def test_leftover_temporaries_are_hidden_and_cleaned(reg: Path) -> None:
    target = specdirs.Target()
    kdir = target.kernels_dir()
    entry = registry.load_file(reg).get("sci")
    kernelspec.install(entry, target, reg)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = paths.hostname()
    dead = kdir / f"{specdirs.STAGING_PREFIX}sci@{host}.{gone.pid}.0000"
    live = kdir / f"{specdirs.RETIRED_PREFIX}sci@{host}.{os.getpid()}.0000"
    other_node = kdir / f"{specdirs.STAGING_PREFIX}sci@elsewhere.1.0000"
    for leftover in (dead, live, other_node):
        leftover.mkdir()
        (leftover / "kernel.json").write_text((kdir / "sci" / "kernel.json").read_text())
    # Never listed as kernels of ours, even with a complete kernel.json inside.
    assert set(specdirs.installed_ours()) == {"sci"}
    kernelspec.install(entry, target, reg)
    assert not dead.exists() and live.exists() and other_node.exists()  # a running install, a recent one
    os.utime(other_node, (1, 1))
    kernelspec.uninstall("sci", target)
    assert sorted(p.name for p in kdir.iterdir()) == [live.name]


def test_install_output_is_what_jupyter_reads_and_others_can_read(reg: Path, tmp_path: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    dest = kernelspec.install(registry.load_file(reg).get("sci"), specdirs.Target(), reg)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["kernel.json", *specdirs.LOGO_FILES])
    spec = KernelSpecManager().get_kernel_spec("sci")
    assert spec.display_name == "Science" and json.loads((dest / "kernel.json").read_text())["argv"]
    # A group's --prefix in /project: the directory and files follow the umask (jupyter_client's copy of a
    # private temporary directory made the kernelspec 0700, unreadable by the group).
    old = os.umask(0o002)
    try:
        shared = kernelspec.install(registry.load_file(reg).get("sci"),
                                    specdirs.Target.from_flags(str(tmp_path / "group"), False), reg)
    finally:
        os.umask(old)
    assert oct(shared.stat().st_mode & 0o777) == oct(0o775)
    assert oct((shared / "kernel.json").stat().st_mode & 0o777) == oct(0o664)

