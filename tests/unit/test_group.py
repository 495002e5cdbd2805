"""Group directories without a second user: modes whatever the umask, the lock that works across nodes and
users, the refusal of a directory one may not write, registries that extend a group's, and the checks.

The two-user proofs on the test bed are in tests/real/test_group.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import (
    cli,
    fsutil,
    group,
    grouptree,
    kernelspec,
    locks,
    model,
    modulefile,
    modulefile_lua,
    paths,
    procfs,
    registry,
    specdirs,
)
from hpc_kernels.build import orchestrator, stamps
from hpc_kernels.doctor import base, installchecks, kernelchecks
from hpc_kernels.errors import BuildBusyError, LockBusyError, NoWriteAccessError, RegistryError
from tests.helpers.builders import FakeBuilder

ROOT = os.getuid() == 0
needs_non_root = pytest.mark.skipif(ROOT, reason="root may write anywhere: os.access cannot refuse it")


@pytest.fixture
def umask077() -> Iterator[None]:
    """The maintainer's restrictive umask, for the duration of a test."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def setgid_dir(tmp_path: Path) -> Path:
    """A group directory like /project/def-pi: setgid, 2770, of a group this user is in (their own)."""
    d = tmp_path / "project"
    d.mkdir()
    os.chmod(d, 0o2770)
    return d


def modes(root: Path) -> dict[str, str]:
    """``{relative path: 'drwxr-s---'}`` of everything under ``root``."""
    return {str(p.relative_to(root)): stat.filemode(p.lstat().st_mode) for p in sorted(root.rglob("*"))}


def kernel_registry(tmp_path: Path, images: Path | None = None) -> Path:
    image = tmp_path / "x.sif"
    image.write_bytes(b"sif")
    path = tmp_path / "reg" / "kernels.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"kernels:\n  sci:\n    image: {image}\n")
    return path


# ----------------------------------------------------------------------------- modes


def test_kernelspec_in_a_group_directory_is_the_groups_whatever_the_umask(setgid_dir: Path, tmp_path: Path,
                                                                          umask077: None) -> None:
    """Before: drwx------ (the member's `jupyter kernelspec list` said "No kernels available")."""
    reg = registry.load_file(kernel_registry(tmp_path))
    kernelspec.install(reg.get("sci"), specdirs.Target(user=False, prefix=str(setgid_dir / "grp")), reg.path)
    assert modes(setgid_dir / "grp") == {
        "share": "drwxrws---", "share/jupyter": "drwxrws---", "share/jupyter/kernels": "drwxrws---",
        "share/jupyter/kernels/sci": "drwxrws---", "share/jupyter/kernels/sci/kernel.json": "-rw-r-----",
        "share/jupyter/kernels/sci/logo-64x64.png": "-rw-r-----",
        "share/jupyter/kernels/sci/logo-svg.svg": "-rw-r-----"}


def test_outside_a_group_directory_the_umask_still_decides(tmp_path: Path, umask077: None) -> None:
    reg = registry.load_file(kernel_registry(tmp_path))
    prefix = tmp_path / "mine"
    kernelspec.install(reg.get("sci"), specdirs.Target(user=False, prefix=str(prefix)), reg.path)
    assert modes(prefix / "share/jupyter/kernels") == {"sci": "drwx------", "sci/kernel.json": "-rw-------",
                                                       "sci/logo-64x64.png": "-rw-------",
                                                       "sci/logo-svg.svg": "-rw-------"}


def test_a_read_only_group_directory_gets_read_only_directories(setgid_dir: Path, umask077: None) -> None:
    tree = setgid_dir / "t"
    tree.mkdir()
    os.chmod(tree, 0o2750)
    fsutil.atomic_write(tree / "a/b/file.txt", "x", 0o755)
    assert modes(tree) == {"a": "drwxr-s---", "a/b": "drwxr-s---", "a/b/file.txt": "-rwxr-x---"}


def test_existing_private_directories_of_ours_are_opened_to_the_group(setgid_dir: Path, umask077: None) -> None:
    os.makedirs(setgid_dir / "old/sub")  # umask 077: 0700, as an older version left them
    os.chmod(setgid_dir / "old", 0o702)  # and world-writable, which nothing of ours may stay
    fsutil.atomic_write(setgid_dir / "old/sub/f", "x")
    assert modes(setgid_dir) == {"old": "drwxr-s---", "old/sub": "drwxr-s---", "old/sub/f": "-rw-r-----"}


def test_module_files_in_a_group_directory(setgid_dir: Path, tmp_path: Path, umask077: None) -> None:
    config = modulefile_lua.ModuleConfig(tree=setgid_dir / "modulefiles", prefix=setgid_dir,
                                     program=Path("/usr/bin/true"))
    modulefile.write(modulefile.plan(config))
    got = modes(setgid_dir)
    assert got["modulefiles/container-kernels"] == "drwxrws---" and got["bin"] == "drwxrws---"
    assert got[f"modulefiles/container-kernels/{config.version}.lua"] == "-rw-r-----"
    assert got["bin/hpc-kernels"] == "-rwxr-x---"


@pytest.fixture
def built_entry(setgid_dir: Path, make_registry: Any) -> model.KernelEntry:
    (setgid_dir / "images").mkdir()
    path = make_registry(f"defaults: {{images_dir: {setgid_dir / 'images'}}}\nkernels:\n  sci: {{def: sci.def}}\n",
                         {"sci.def": "Bootstrap: localimage\nFrom: base.sif\n"})
    return registry.load_file(path).get("sci")


def test_built_image_lock_and_record_in_a_group_directory(built_entry: model.KernelEntry, umask077: None) -> None:
    """Before: the lock file was 0600/0644 and stayed: a member could not open it to build."""
    seen: list[str] = []

    class Watching(FakeBuilder):
        def build(self, recipe: Path, dest: Path, options: list[str], on_line: Any) -> None:
            lock = orchestrator.lock_path(built_entry.image)
            seen.append(stat.filemode(lock.stat().st_mode))
            assert paths.hostname() in dest.parent.name  # temporaries are unique across nodes
            super().build(recipe, dest, options, on_line)
            os.chmod(dest, 0o700)  # as Apptainer writes it with umask 077

    assert orchestrator.build(built_entry, builder=Watching()).action == "built"
    assert seen == ["-rw-r-----"]
    assert modes(built_entry.image.parent) == {"sci.sif": "-rwxr-x---", "sci.sif.hpck.json": "-rw-r-----"}
    data = json.loads(stamps.stamp_path(built_entry.image).read_text())
    assert data["generator"] == "hpc-kernels"


# ----------------------------------------------------------------------------- cluster_lock


def _hold(path: str, ready: Any, release: Any) -> None:
    with locks.cluster_lock(Path(path)):
        ready.set()
        release.wait(30)


def test_cluster_lock_excludes_and_names_the_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    lock = tmp_path / "x.lock"
    holder = ctx.Process(target=_hold, args=(str(lock), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        record = locks.LockRecord.read(lock)
        assert record is not None and record.pid == holder.pid and record.host == paths.hostname()
        with pytest.raises(LockBusyError) as caught, locks.cluster_lock(lock, wait=False):
            pass
        assert f"pid {holder.pid} on {paths.hostname()}, since " in str(caught.value)
        waited: list[object] = []
        release.set()
        with locks.cluster_lock(lock, on_wait=waited.append) as mine:
            assert locks.LockRecord.read(lock) == mine
    finally:
        release.set()
        holder.join(10)
    assert not lock.exists() and list(tmp_path.iterdir()) == []  # nothing left: no lock, no temporary


def _record(host: str, pid: int, start: int | None = None, token: str = "t0") -> locks.LockRecord:
    return locks.LockRecord(host, pid, start, procfs.boot_id(), os.getuid() + 1, "someone", time.time(), token)


def test_a_lock_of_a_dead_process_on_this_node_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=lambda: None)
    dead.start()
    dead.join()
    lock.write_text(_record(paths.hostname(), dead.pid or 1).to_text())  # killed holder (SIGKILL: no release)
    with locks.cluster_lock(lock, wait=False) as mine:
        assert locks.LockRecord.read(lock) == mine


def test_a_reused_pid_or_another_boot_is_not_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    parent = procfs.proc_ref(os.getppid())
    assert parent is not None
    start = parent.start
    lock.write_text(_record(paths.hostname(), os.getppid(), start + 1).to_text())  # same pid, other process
    with locks.cluster_lock(lock, wait=False):
        pass
    stale = _record(paths.hostname(), os.getppid(), start)
    lock.write_text(locks.LockRecord(**{**stale.__dict__, "boot": "an-earlier-boot"}).to_text())
    with locks.cluster_lock(lock, wait=False):
        pass


def test_a_lock_of_another_node_counts_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    """Another node's pid cannot be checked: the lock holds while its file is touched (the heartbeat),
    measured against the file system's clock; after LOCK_STALE_AFTER without a touch it is taken over."""
    lock = tmp_path / "x.lock"
    lock.write_text(_record("cn-elsewhere", 4242).to_text())
    with pytest.raises(LockBusyError, match="held by pid 4242 of user someone on cn-elsewhere"), \
            locks.cluster_lock(lock, wait=False):
        pass
    # A process of ours waits for it (here: as long as it is fresh)...
    waited: list[object] = []
    with pytest.raises(LockBusyError), locks.cluster_lock(lock, wait=False, on_wait=waited.append):
        pass
    old = time.time() - locks.LOCK_STALE_AFTER - 5
    os.utime(lock, (old, old))
    with locks.cluster_lock(lock, wait=False) as mine:
        assert locks.LockRecord.read(lock) == mine
    assert list(tmp_path.iterdir()) == []


def test_the_heartbeat_keeps_the_lock_fresh_and_release_spares_a_lock_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with locks.cluster_lock(lock, heartbeat=0.05):
        old = time.time() - 1000
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5
        # Someone decided we were dead and took the lock: ours must not remove theirs at release.
        lock.unlink()
        lock.write_text(_record("cn-other", 7).to_text())
    theirs = locks.LockRecord.read(lock)
    assert theirs is not None and (theirs.host, theirs.pid) == ("cn-other", 7)


def test_waiting_for_another_nodes_build_names_it(built_entry: model.KernelEntry) -> None:
    lock = orchestrator.lock_path(built_entry.image)
    lock.write_text(_record("cn-7", 99).to_text())
    with pytest.raises(BuildBusyError, match=r"another process is building 'sci' .*: pid 99 of user someone "
                                             r"on cn-7, since"):
        orchestrator.build(built_entry, builder=FakeBuilder(), wait=False)


# ----------------------------------------------------------------------------- refusing


@needs_non_root
def test_no_write_access_is_one_sentence_with_who_can(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = kernel_registry(tmp_path)
    prefix = tmp_path / "theirs"
    (prefix / "share/jupyter/kernels").mkdir(parents=True)
    os.chmod(prefix / "share/jupyter/kernels", 0o555)
    try:
        assert cli.main(["install", "sci", "--prefix", str(prefix), "--registry", str(reg)]) == 1
    finally:
        os.chmod(prefix / "share/jupyter/kernels", 0o755)
    (line,) = capsys.readouterr().err.strip().splitlines()
    me = _me()
    assert line == (f"hpc-kernels: error: you ({me}) cannot install the kernelspec 'sci' in "
                    f"{prefix}/share/jupyter/kernels: in {prefix}/share/jupyter/kernels only {me} can write; "
                    "nothing was changed; pass --user to install your own copy.")


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@needs_non_root
def test_the_refusal_names_the_group_tree_and_its_maintainer(setgid_dir: Path) -> None:
    done = group.init(setgid_dir / "kernels")
    os.chmod(done.tree.root / "images", 0o2550)
    try:
        with pytest.raises(NoWriteAccessError) as caught:
            group.ensure_writable(done.tree.root / "images", "build 'x'")
    finally:
        os.chmod(done.tree.root / "images", 0o2750)
    assert f"it is the group {done.tree.group}'s install in {done.tree.root}, where only {_me()} can write" \
        in str(caught.value)
    assert f"'extends: {done.tree.registry}'" in str(caught.value)


# ----------------------------------------------------------------------------- group init


def test_group_init_creates_the_tree_and_repairs_it(setgid_dir: Path, umask077: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = setgid_dir / "kernels"
    assert cli.main(["group", "init", str(root)]) == 0
    out = capsys.readouterr().err
    assert f"module use {root}/modulefiles && module load container-kernels" in out
    assert modes(root) == {
        ".hpc-kernels-group.json": "-rw-r-----", "defs": "drwxr-s---", "images": "drwxr-s---",
        "kernels.yaml": "-rw-r-----", "modulefiles": "drwxr-s---", "share": "drwxr-s---",
        "share/jupyter": "drwxr-s---", "share/jupyter/kernels": "drwxr-s---"}
    assert stat.filemode(root.stat().st_mode) == "drwxr-s---"
    tree = grouptree.find_tree(root / "images" / "x.sif")
    assert tree is not None and tree.root == root and not tree.members_write and tree.maintainer == _me()
    assert registry.load_file(root / "kernels.yaml").kernels == ()
    # Written later with umask 077 (an editor, a cp): the repair gives the group its access.
    (root / "defs/x.def").write_text("x")
    (root / "venv/bin").mkdir(parents=True)
    assert cli.main(["group", "init", str(root), "--members", "write"]) == 0
    got = modes(root)
    assert got["defs/x.def"] == "-rw-r-----" and got["venv/bin"] == "drwxrws---" and got["images"] == "drwxrws---"
    tree = grouptree.find_tree(root)
    assert tree is not None and tree.members_write
    assert cli.main(["group", "init", str(root)]) == 0  # the tree's choice is kept when not given again
    assert modes(root)["images"] == "drwxrws---"


def test_group_init_needs_a_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["group", "init", str(tmp_path / "k")]) == 1
    assert "is not a group directory (no setgid bit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the group's registry


@pytest.fixture
def tree(setgid_dir: Path, tmp_path: Path) -> grouptree.GroupTree:
    done = group.init(setgid_dir / "kernels")
    image = tmp_path / "x.sif"
    image.write_bytes(b"sif")
    done.tree.registry.write_text(f"kernels:\n  sci: {{image: {image}}}\n  tools: {{image: {image}}}\n")
    return done.tree


def test_install_with_a_group_registry_publishes_kernelspecs_and_module(tree: grouptree.GroupTree,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", "--all", "--registry", str(tree.registry)]) == 0
    err = capsys.readouterr().err
    assert specdirs.is_ours(tree.prefix / "share/jupyter/kernels/sci")
    lua = tree.modulefiles / "container-kernels" / f"{modulefile_lua.ModuleConfig(tree.root, tree.root, Path('/x')).version}.lua"
    assert modulefile.is_ours(lua) and "kernels.yaml" in lua.read_text()
    assert f"members: module use {tree.modulefiles} && module load container-kernels" in err
    assert not (Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels/sci").exists()
    # ...and uninstall with that registry removes them from the tree.
    assert cli.main(["uninstall", "sci", "--registry", str(tree.registry)]) == 0
    assert not (tree.prefix / "share/jupyter/kernels/sci").exists()


def test_a_registry_extends_the_groups(tree: grouptree.GroupTree, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"extends: {tree.registry}\nkernels:\n  sci: {{image: {tmp_path / 'x.sif'}, display_name: "
                    "Mine}\n  own: {image: " + str(tmp_path / "x.sif") + "}\n")
    reg = registry.load_file(mine)
    assert [e.name for e in reg.kernels] == ["sci", "own", "tools"]
    assert reg.get("sci").display_name == "Mine" and reg.overridden == ("sci",)
    assert reg.origin(reg.get("tools")) == tree.registry and reg.origin(reg.get("own")) == mine
    assert [e.name for e in reg.select([], True)] == ["sci", "own"]  # --all: your own
    assert cli.main(["list", "--registry", str(mine)]) == 0
    out, err = capsys.readouterr()
    assert "yours, over the group" in out and f"extending {tree.registry}" in err
    assert "sci: yours, from" in err
    assert cli.main(["list", "--json", "--registry", str(mine)]) == 0
    rows = {r["kernel"]: r for r in json.loads(capsys.readouterr().out)["kernels"]}
    assert rows["sci"]["overrides"] == str(tree.registry) and rows["tools"]["registry"] == str(tree.registry)


def test_extends_mistakes_name_the_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("kernels: {}\nextends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(RegistryError, match=r"b.yaml:1: 'extends: .*a.yaml' makes a loop \(.*a.yaml -> .*b.yaml -> "):
        registry.load_file(a)
    b.write_text("extends: [x]\n")
    with pytest.raises(RegistryError, match=r"b.yaml:1: 'extends' must be the path of another registry"):
        registry.load_file(a)
    a.write_text("extends: missing.yaml\n")
    with pytest.raises(RegistryError, match=r"missing.yaml: registry file not found \(found via 'extends' at "):
        registry.load_file(a)


def test_a_members_module_loads_the_groups_first(tree: grouptree.GroupTree, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"extends: {tree.registry}\nkernels:\n  own: {{image: {tmp_path / 'x.sif'}}}\n")
    assert cli.main(["module", "install", "--all", "--registry", str(mine), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["module"].startswith("my-kernels/") and data["over_module"] == "container-kernels"
    assert data["installed_kernelspecs"] == ["own"]
    text = Path(data["modulefile"]).read_text()
    assert f'prepend_path("MODULEPATH", "{tree.modulefiles}")\ndepends_on("container-kernels")' in text
    assert text.index("depends_on") < text.index('prepend_path("JUPYTER_PATH"')
    assert cli.main(["module", "show", "--registry", str(mine), "--name", "container-kernels"]) == 2
    assert "Lmod loads only one module of a name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- doctor and states


def test_doctor_group_check_says_how_to_load_the_module(tree: grouptree.GroupTree,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = registry.load_file(tree.registry)
    found = installchecks.check_group(reg, base.Context(environ={}))
    assert [f.status for f in found] == ["warn"]
    assert found[0].fix.startswith(f"module use {tree.modulefiles} && module load container-kernels")
    env = {"JUPYTER_PATH": str(tree.prefix / "share/jupyter"), "MODULEPATH": str(tree.modulefiles)}
    assert [f.status for f in installchecks.check_group(reg, base.Context(environ=env))] == ["ok"]
    (tree.root / "defs/private.def").write_text("x")
    os.chmod(tree.root / "defs/private.def", 0o600)
    found = installchecks.check_group(reg, base.Context(environ=env))
    assert found[0].status == "warn" and "1 entries of it are not readable by the group" in found[0].message
    assert f"'hpc-kernels group init {tree.root}'" in found[0].fix


@needs_non_root
def test_an_image_this_user_cannot_read_is_unreadable_not_a_traceback(built_entry: model.KernelEntry) -> None:
    orchestrator.build(built_entry, builder=FakeBuilder())
    os.chmod(built_entry.image, 0o000)
    try:
        assert stamps.image_state(built_entry).status == "unreadable"
        finding = kernelchecks.check_image(built_entry)
        assert finding.status == "fail" and "it is yours, but its mode does not allow that" in finding.message
    finally:
        os.chmod(built_entry.image, 0o750)
    assert built_entry.recipe is not None
    os.chmod(built_entry.recipe, 0o000)
    try:
        assert stamps.image_state(built_entry).status == "unchecked"
    finally:
        os.chmod(built_entry.recipe, 0o644)


def test_group_init_warns_when_members_cannot_run_this_hpc_kernels(setgid_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernelspecs run the Python that installed them: one in the maintainer's 0700 home starts for nobody else."""
    home = tmp_path / "home"
    (home / "venv/bin").mkdir(parents=True)
    python = home / "venv/bin/python"
    python.write_text("")
    os.chmod(python, 0o755)
    os.chmod(home, 0o700)
    monkeypatch.setattr("sys.executable", str(python))
    done = group.init(setgid_dir / "kernels")
    assert len(done.warnings) == 1
    # (the first closed directory on the way: pytest's own base directory is 0700 too)
    assert f"cannot reach the Python that runs hpc-kernels ({python}): " in done.warnings[0]
    assert " is drwx------, so kernelspecs and the module you publish would not start for them" in done.warnings[0]
    assert f"python3 -m venv {setgid_dir / 'kernels/venv'}" in done.warnings[0]


def test_group_marker_values_are_plain_names(setgid_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["group", "init", str(setgid_dir / "k"), "--module-name", "bad name"]) == 2
    assert "--module-name 'bad name' must be" in capsys.readouterr().err
    done = group.init(setgid_dir / "k")
    marker = done.tree.root / grouptree.MARKER
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "maintainer": "evil\x1b[2J", "module": "x\ny"}))
    tree = grouptree.find_tree(done.tree.root)
    assert tree is not None and tree.maintainer == _me() and tree.module_name == "container-kernels"


@needs_non_root
def test_gc_leaves_a_kernelspec_whose_image_it_may_not_look_at(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A member's gc must not take a group's image it cannot see for a missing one (and remove the kernelspec)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.sif").write_bytes(b"sif")
    reg = tmp_path / "k.yaml"
    reg.write_text(f"kernels:\n  sci: {{image: {images / 'x.sif'}}}\n")
    assert cli.main(["install", "sci", "--registry", str(reg)]) == 0
    os.chmod(images, 0o000)
    try:
        from hpc_kernels import gc

        found = gc.sweep_kernelspecs()
    finally:
        os.chmod(images, 0o755)
    assert [(f.action, f.reason.split(":")[0]) for f in found] == [
        ("left alone", f"cannot tell whether its image {images / 'x.sif'} exists")]
    assert specdirs.installed_ours()["sci"].is_dir()
