"""A research group on the test bed: the maintainer (the user running the tests) publishes kernels in a group
tree under ``$HPCK_PROJECT`` (setgid, group ``$HPCK_GROUP``), the second user ``$HPCK_USER2`` (a member, reached
with ``sudo -n -u``) loads the module and uses them. Issue #17's proofs, each with real programs:

* the maintainer builds (here and with ``--slurm``), installs and publishes with umask 077; the member loads the
  module, sees the kernels in ``jupyter kernelspec list``, starts them (exec and instance modes), runs a cell;
* the maintainer rebuilds while the member's kernels run: they keep working, the next start gets the new image;
* both users build the same kernel at once (a tree members may write): one builds, the other waits; the image is
  valid;
* the member cannot break the install (uninstall, rebuild, install, module uninstall): one sentence, nothing
  changed; ``doctor`` explains a mode problem, an ACL, a missing membership and a module not loaded;
* the member layers a registry of their own over the group's: both in one menu, theirs winning.

The member's commands run with a throw-away home of their own; what they leave (processes, instances) is
checked like ``no_leftovers`` checks ours.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import leaks

REPO = Path(__file__).resolve().parents[2]
USER2 = os.environ.get("HPCK_USER2", "")
GROUP = os.environ.get("HPCK_GROUP", "")
PROJECT = os.environ.get("HPCK_PROJECT", "")

REGISTRY = """\
defaults:
  images_dir: images
kernels:
  demo:
    def: defs/demo.def
    display_name: Demo (group)
    command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
  shared:
    def: defs/demo.def
    display_name: Shared (group)
    mode: instance
    idle_timeout: 2
    command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
"""
RECIPE = "Bootstrap: localimage\nFrom: {base}\n%post\n  echo {tag} > /group-marker\n{extra}"
READ_MARKER = "print(open('/group-marker').read().strip())"
#: ``jupyter kernelspec list --json``, the venv's own (what the member would type).
JUPYTER_KERNELSPEC_LIST = [str(Path(sys.executable).parent / "jupyter"), "kernelspec", "list", "--json"]
#: Build jobs take one CPU: the test bed's compute node has two, which other tests' jobs may share.
SMALL_JOB = ("--time", "10", "--cpus", "1", "--mem", "1G")


# ----------------------------------------------------------------------------- the two users


@dataclass
class Member:
    """The second user, with a home of their own for the test."""

    user: str
    uid: int
    home: Path
    lmod_init: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, argv: Sequence[str], module: tuple[Path, str] | None = None) -> list[str]:
        """``sudo`` to the member, a clean environment, optionally after ``module use TREE && module load NAME``."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        cmd = list(argv)
        if module is not None:
            assert self.lmod_init is not None, "module commands need Lmod"
            script = ('set -e; source "$1" >/dev/null 2>&1; module use "$2"; module load "$3"; shift 3; '
                      'exec "$@"')
            cmd = ["bash", "--noprofile", "--norc", "-c", script, "bash", str(self.lmod_init), str(module[0]),
                   module[1], *cmd]
        return ["sudo", "-n", "-u", self.user, "env", "-i", *env, *cmd]

    def run(self, argv: Sequence[str], module: tuple[Path, str] | None = None, timeout: float = 180,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the member, from the repository (which they can read)."""
        return subprocess.run(self.argv(argv, module), capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, input=input_text, check=False)

    def hpck(self, *args: str, module: tuple[Path, str] | None = None, timeout: float = 180
             ) -> subprocess.CompletedProcess[str]:
        """The member's ``hpc-kernels ARGS`` (this venv's program, as the maintainer's wrapper runs it)."""
        return self.run([sys.executable, "-m", "hpc_kernels", *args], module, timeout)

    def kernels(self, module: tuple[Path, str] | None = None) -> Kernels:
        """A process of the member that starts kernels and runs cells (tests/helpers/member_kernels.py)."""
        proc = subprocess.Popen(self.argv([sys.executable, "-m", "tests.helpers.member_kernels"], module),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        return Kernels(proc)


class Kernels:
    """The member's kernels, driven one JSON line at a time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            _out, err = self.proc.communicate(timeout=60)
            raise AssertionError(f"the member's kernel process ended: {err[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer or not answer["error"], answer
        return answer

    def start(self, name: str) -> int:
        return int(self.ask(start=name)["id"])

    def cell(self, kernel: int, code: str = READ_MARKER) -> str:
        answer = self.ask(run=kernel, code=code)
        assert answer["status"] == "ok", answer
        return str(answer["out"]).strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def _member_things(member: Member) -> set[leaks.Thing]:
    found = leaks.processes(member.uid)
    apptainer = shutil.which("apptainer")
    if apptainer:
        out = member.run([apptainer, "instance", "list", "--json"], timeout=60).stdout
        try:
            rows = json.loads(out or "{}").get("instances") or []
        except ValueError:
            rows = []
        found |= {leaks.Thing("instance", str(r.get("instance")), str(r.get("img", ""))) for r in rows}
    return found


@pytest.fixture
def member() -> Iterator[Member]:
    """The second user (``$HPCK_USER2``, reached with ``sudo -n -u``), in the group ``$HPCK_GROUP`` like us."""
    if not (USER2 and GROUP and PROJECT):
        pytest.skip("HPCK_USER2, HPCK_GROUP and HPCK_PROJECT name the test bed's second user, their group and its "
                    "setgid /project directory (bash .ci/run sets them)")
    probe = subprocess.run(["sudo", "-n", "-u", USER2, "true"], capture_output=True, text=True, timeout=60,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot run commands as {USER2} with 'sudo -n -u {USER2}': {probe.stderr.strip()}")
    try:
        gid = grp.getgrnam(GROUP).gr_gid
        uid = pwd.getpwnam(USER2).pw_uid
    except KeyError as exc:
        pytest.skip(f"no such user or group on this machine: {exc}")
    if gid not in os.getgroups():
        pytest.skip(f"the user running the tests is not in {GROUP}")
    made = subprocess.run(["sudo", "-n", "-u", USER2, "mktemp", "-d", "/tmp/hpck-member-XXXXXX"],
                          capture_output=True, text=True, timeout=60, check=True)
    home = Path(made.stdout.strip())
    env = {"HOME": str(home), "USER": USER2, "LOGNAME": USER2, "LANG": "C.UTF-8",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), *_apptainer_dir(), "/usr/bin", "/bin"]),
           "XDG_RUNTIME_DIR": f"/run/user/{uid}", "PYTHONDONTWRITEBYTECODE": "1",
           "XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
           "XDG_STATE_HOME": f"{home}/.local/state", "XDG_CACHE_HOME": f"{home}/.cache",
           "JUPYTER_DATA_DIR": f"{home}/.local/share/jupyter", "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
           "JUPYTER_RUNTIME_DIR": f"{home}/.local/share/jupyter/runtime", "IPYTHONDIR": f"{home}/.ipython",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    lmod_init = None
    try:
        from tests.helpers import lmod

        lmod_init = lmod.find().init_bash
    except Exception:  # tests that need Lmod carry the lmod marker and its fixture
        lmod_init = None
    who = Member(USER2, uid, home, lmod_init, env)
    before = _member_things(who)
    try:
        yield who
    finally:
        deadline = time.monotonic() + 30  # instance reapers stop idle instances within idle_timeout
        left = _member_things(who) - before
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _member_things(who) - before
        for thing in left:
            if thing.kind in ("process", "squashfuse", "starter"):
                subprocess.run(["sudo", "-n", "-u", USER2, "kill", "-9", thing.ident.split("@")[0]],
                               capture_output=True, timeout=30, check=False)
            elif thing.kind == "instance":
                who.run([shutil.which("apptainer") or "apptainer", "instance", "stop", thing.ident], timeout=60)
        subprocess.run(["sudo", "-n", "-u", USER2, "rm", "-rf", str(home)], capture_output=True, timeout=60,
                       check=False)
        if left:
            pytest.fail(f"the member ({USER2}) was left with:\n  " + "\n  ".join(map(str, sorted(left))),
                        pytrace=False)


def _apptainer_dir() -> list[str]:
    found = shutil.which("apptainer")
    return [str(Path(found).parent)] if found else []


@pytest.fixture
def tree_root(member: Member) -> Iterator[Path]:
    """A fresh directory for a group tree in the group's /project; removed afterwards (the member's files
    first, by the member)."""
    root = Path(PROJECT) / f"hpck-test-{os.getpid()}-{secrets.token_hex(3)}"
    yield root
    member.run(["rm", "-rf", str(root)], timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def maintainer(*args: str, timeout: float = 300, umask: int = 0o077, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``hpc-kernels ARGS`` as the maintainer (us), with a restrictive umask unless told otherwise."""
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=lambda: os.umask(umask), env=env, check=False)


def publish(root: Path, base_sif: Path, tag: str = "v1", extra: str = "", members: str = "read") -> Path:
    """As the maintainer with umask 077: a group tree with the two kernels, built here and installed (which
    also writes the module). Returns the registry."""
    done = maintainer("group", "init", str(root), "--members", members)
    assert done.returncode == 0, done.stderr
    registry = root / "kernels.yaml"
    write_recipe(root, base_sif, tag, extra)
    registry.write_text(REGISTRY)
    os.chmod(registry, 0o600)  # an editor with umask 077: the build and install publish it to the group
    for args in (("build", "--all"), ("install", "--all")):
        done = maintainer(*args, "--registry", str(registry))
        assert done.returncode == 0, done.stderr
    return registry


def write_recipe(root: Path, base_sif: Path, tag: str, extra: str = "", mode: int = 0o600) -> None:
    """The recipe, written as an editor with umask 077 would (0600) unless ``mode`` says otherwise."""
    recipe = root / "defs" / "demo.def"
    recipe.write_text(RECIPE.format(base=base_sif, tag=tag, extra=extra))
    os.chmod(recipe, mode)


def snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """Every entry of the tree with its mode, owner, group, size, mtime and inode: "nothing changed"."""
    seen: dict[str, tuple[int, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.lstat(Path(directory) / name)
            seen[str(Path(directory) / name)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                                 st.st_ino)
    return seen


def assert_group_readable_only(root: Path) -> None:
    """Everything in the tree: the group's, readable (directories: enterable) by it, nothing for others."""
    gid = grp.getgrnam(GROUP).gr_gid
    bad = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            st = os.lstat(path)
            need = 0o050 if stat.S_ISDIR(st.st_mode) else 0o040
            if st.st_gid != gid or st.st_mode & need != need or st.st_mode & 0o007 or \
                    (stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_ISGID):
                bad.append(f"{stat.filemode(st.st_mode)} {grp.getgrgid(st.st_gid).gr_name} {path}")
    assert not bad, "not the group's, or not readable by it only:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the proofs


@pytest.mark.apptainer
@pytest.mark.lmod
def test_maintainer_publishes_and_member_runs_both_modes(member: Member, tree_root: Path, base_sif: Path,
                                                         lmod_tool: Any) -> None:
    publish(tree_root, base_sif)
    assert_group_readable_only(tree_root)  # with umask 077: the group reads everything, others nothing
    module = (tree_root / "modulefiles", "container-kernels")
    listed = member.run(JUPYTER_KERNELSPEC_LIST, module)
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)["kernelspecs"]
    for name in ("demo", "shared"):
        assert specs[name]["resource_dir"] == str(tree_root / "share/jupyter/kernels" / name)
    assert specs["demo"]["spec"]["display_name"] == "Demo (group)"
    kernels = member.kernels(module)
    try:
        exec_kernel, instance_kernel = kernels.start("demo"), kernels.start("shared")
        assert kernels.cell(exec_kernel) == "v1"
        assert kernels.cell(instance_kernel) == "v1"
        # The cells run as the member, inside the group's image.
        assert kernels.cell(exec_kernel, "import os; print(os.getuid())") == str(member.uid)
    finally:
        kernels.close()
    # The member's hpc-kernels sees the group's registry through the module, and everything is fine.
    doctor = member.hpck("doctor", "--json", module=module)
    report = json.loads(doctor.stdout)
    assert report["ok"], [f for f in report["findings"] if f["status"] != "ok"]
    assert any(f["check"] == "group" and f["status"] == "ok" for f in report["findings"])


@pytest.mark.apptainer
def test_a_plain_setgid_directory_works_for_the_second_user(member: Member, tree_root: Path,
                                                            base_sif: Path) -> None:
    """Issue #17's report, without 'group init': install --prefix and module install into a group-writable
    setgid directory with umask 077 (before: drwx------, "No kernels available", doctor's "Permission denied",
    "was not written by hpc-kernels"), and an image built with umask 022 that the member rebuilds (before: its
    lock file was the maintainer's 0644, "Permission denied (.demo.sif.lock)")."""
    tree_root.mkdir()
    os.chmod(tree_root, 0o2770)  # like the group's /project directory itself
    registry = tree_root / "kernels.yaml"
    registry.write_text(REGISTRY.split("  shared:")[0])
    (tree_root / "defs").mkdir()
    write_recipe(tree_root, base_sif, "plain", mode=0o640)
    os.chmod(registry, 0o640)
    done = maintainer("build", "demo", "--registry", str(registry), umask=0o022)
    assert done.returncode == 0, done.stderr
    for args in (("install", "demo", "--prefix", str(tree_root)),
                 ("module", "install", "--dir", str(tree_root / "modulefiles"), "--prefix", str(tree_root))):
        done = maintainer(*args, "--registry", str(registry))
        assert done.returncode == 0, done.stderr
    jupyter_path = f"JUPYTER_PATH={tree_root / 'share/jupyter'}"
    listed = member.run(["env", jupyter_path, *JUPYTER_KERNELSPEC_LIST])
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["kernelspecs"]["demo"]["resource_dir"] == str(
        tree_root / "share/jupyter/kernels/demo")
    doctor = member.run(["env", jupyter_path, sys.executable, "-m", "hpc_kernels", "doctor", "demo", "--json",
                         "--registry", str(registry)])
    assert "Traceback" not in doctor.stderr and json.loads(doctor.stdout)["ok"], doctor.stdout + doctor.stderr
    # The member may write here: replacing the kernelspec and rebuilding the image both work.
    done = member.hpck("install", "demo", "--prefix", str(tree_root), "--registry", str(registry))
    assert done.returncode == 0, done.stderr
    done = member.hpck("build", "demo", "--force", "--registry", str(registry))
    assert done.returncode == 0, done.stderr
    image = tree_root / "images/demo.sif"
    assert pwd.getpwuid(image.stat().st_uid).pw_name == USER2
    assert_group_readable_only(tree_root / "images")
    assert not list((tree_root / "images").glob(".demo.sif.*"))


@pytest.mark.apptainer
@pytest.mark.lmod
def test_rebuild_while_member_kernels_run(member: Member, tree_root: Path, base_sif: Path, lmod_tool: Any) -> None:
    registry = publish(tree_root, base_sif)
    module = (tree_root / "modulefiles", "container-kernels")
    kernels = member.kernels(module)
    try:
        old_exec, old_instance = kernels.start("demo"), kernels.start("shared")
        assert kernels.cell(old_exec) == "v1" and kernels.cell(old_instance) == "v1"
        write_recipe(tree_root, base_sif, "v2")
        done = maintainer("build", "--all", "--registry", str(registry))
        assert done.returncode == 0, done.stderr
        assert "built" in done.stderr
        # The running kernels keep their image (the old inode, still mounted) and keep working...
        assert kernels.cell(old_exec) == "v1" and kernels.cell(old_instance) == "v1"
        assert kernels.cell(old_exec, "print(sum(range(10)))") == "45"
        # ...and the next start gets the new one (a new instance for the new image).
        new_exec, new_instance = kernels.start("demo"), kernels.start("shared")
        assert kernels.cell(new_exec) == "v2" and kernels.cell(new_instance) == "v2"
        assert kernels.cell(old_instance) == "v1"
    finally:
        kernels.close()
    assert_group_readable_only(tree_root)


@pytest.mark.apptainer
def test_both_users_build_the_same_kernel_at_once(member: Member, tree_root: Path, base_sif: Path,
                                                  apptainer_bin: str) -> None:
    done = maintainer("group", "init", str(tree_root), "--members", "write")
    assert done.returncode == 0, done.stderr
    registry = tree_root / "kernels.yaml"
    registry.write_text(REGISTRY)
    # Both maintain this tree: the recipe is theirs to read from the start.
    write_recipe(tree_root, base_sif, "both", extra="  sleep 4\n", mode=0o640)
    ours = subprocess.Popen([sys.executable, "-m", "hpc_kernels", "build", "demo", "--registry", str(registry)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o077))
    theirs = subprocess.Popen(member.argv([sys.executable, "-m", "hpc_kernels", "build", "demo", "--registry",
                                           str(registry)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO)
    outputs = [p.communicate(timeout=300) for p in (ours, theirs)]
    assert [ours.returncode, theirs.returncode] == [0, 0], outputs
    errs = [err for _out, err in outputs]
    built = [e for e in errs if "demo: built" in e]
    waited = [e for e in errs if "waiting for another build of 'demo' to finish" in e and "demo: up to date" in e]
    assert len(built) == 1 and len(waited) == 1, errs
    # The one that waited was told by whom (another user's build, so their name).
    assert f"of user {pwd.getpwuid(os.getuid()).pw_name}" in waited[0] or f"of user {USER2}" in waited[0], waited
    image = tree_root / "images" / "demo.sif"
    check = subprocess.run([apptainer_bin, "exec", str(image), "cat", "/group-marker"], capture_output=True,
                           text=True, timeout=120, check=False)
    assert check.stdout.strip() == "both", check.stderr
    assert not list((tree_root / "images").glob(".demo.sif.*")), "a lock or temporary was left behind"
    assert_group_readable_only(tree_root)


@pytest.mark.apptainer
def test_member_cannot_change_the_group_install(member: Member, tree_root: Path, base_sif: Path) -> None:
    registry = publish(tree_root, base_sif)
    before = snapshot(tree_root)
    maintainer_name = pwd.getpwuid(os.getuid()).pw_name
    attempts = [("uninstall", "demo"), ("uninstall", "--all"), ("build", "demo", "--force"), ("install", "demo"),
                ("module", "uninstall"), ("module", "install")]
    for args in attempts:
        done = member.hpck(*args, "--registry", str(registry))
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert lines[0].startswith(f"hpc-kernels: error: you ({USER2}) cannot "), (args, lines)
        assert f"it is the group {GROUP}'s install in {tree_root}, where only {maintainer_name} can write; nothing " \
               f"was changed: ask {maintainer_name}" in lines[0], (args, lines)
    assert snapshot(tree_root) == before


@pytest.mark.apptainer
def test_member_doctor_explains_what_stops_a_group_kernel(member: Member, tree_root: Path, base_sif: Path) -> None:
    registry = publish(tree_root, base_sif)
    image = tree_root / "images" / "demo.sif"
    me = pwd.getpwuid(os.getuid()).pw_name

    def findings(*args: str) -> dict[str, dict[str, Any]]:
        done = member.hpck("doctor", "demo", "--json", "--registry", str(registry), *args)
        assert "Traceback" not in done.stderr, done.stderr
        report = json.loads(done.stdout)
        return {f["check"]: f for f in report["findings"] if f["status"] != "ok" and f["kernel"] in ("demo", None)}

    # The module is not loaded: the group check and the kernelspec check say how to load it.
    seen = findings()
    assert seen["group"]["status"] == "warn"
    assert f"module use {tree_root / 'modulefiles'} && module load container-kernels" in seen["group"]["fix"]
    assert seen["kernelspec"]["status"] == "fail" and "module load container-kernels" in seen["kernelspec"]["fix"]

    # A mode problem: the maintainer made the image private (as an older version or a cp would).
    os.chmod(image, 0o700)
    seen = findings()
    assert seen["image"]["status"] == "fail", seen
    assert f"you ({USER2}) cannot read {image}" in seen["image"]["message"]
    assert f"its mode does not let the group {GROUP} read it; {me} can fix that: 'hpc-kernels group init " \
           f"{tree_root}' repairs the modes of the tree" in seen["image"]["message"]
    assert "not readable by the group" in seen["group"]["message"]
    done = maintainer("group", "init", str(tree_root))  # the repair
    assert done.returncode == 0, done.stderr
    assert "image" not in findings()

    # An ACL that shuts the member out although the mode lets the group in.
    set_acl(image, {"user_obj": 0o7, "users": {member.uid: 0}, "group_obj": 0o4, "mask": 0o4, "other": 0})
    seen = findings()
    assert "its mode lets the group in, so an ACL must refuse you" in seen["image"]["message"], seen
    assert f"getfacl {image}" in seen["image"]["message"]
    os.removexattr(image, "system.posix_acl_access")

    # The kernelspec directory closed to the group: Jupyter would not list it; doctor says why.
    spec = tree_root / "share/jupyter/kernels/demo"
    os.chmod(spec, 0o700)
    env_path = str(tree_root / "share/jupyter")
    done = member.run(["env", f"JUPYTER_PATH={env_path}", sys.executable, "-m", "hpc_kernels", "doctor", "demo",
                       "--json", "--registry", str(registry)])
    report = json.loads(done.stdout)
    spec_finding = next(f for f in report["findings"] if f["check"] == "kernelspec")
    assert spec_finding["status"] == "fail"
    assert f"you ({USER2}) cannot enter {spec}" in spec_finding["message"], spec_finding
    os.chmod(spec, 0o2750)

    # Not a member of the tree's group: a tree that belongs to our own personal group.
    personal = grp.getgrgid(os.getgid()).gr_name
    other = tree_root.parent / f"{tree_root.name}-personal"
    try:
        done = maintainer("group", "init", str(other), "--group", personal)
        assert done.returncode == 0, done.stderr
        done = member.hpck("doctor", "--json", "--registry", str(other / "kernels.yaml"))
        report = json.loads(done.stdout)
        assert f"{other / 'kernels.yaml'}: cannot read the registry" in json.dumps(report), report
        assert f"you are not in the group {personal}" in json.dumps(report)
    finally:
        shutil.rmtree(other, ignore_errors=True)


def set_acl(path: Path, acl: dict[str, Any]) -> None:
    """A POSIX access ACL written as the kernel stores it (setfacl's job; the test bed has no acl package)."""
    tags = []
    tags.append((0x01, acl["user_obj"], 0xFFFFFFFF))
    tags += [(0x02, perm, uid) for uid, perm in acl["users"].items()]
    tags.append((0x04, acl["group_obj"], 0xFFFFFFFF))
    tags.append((0x10, acl["mask"], 0xFFFFFFFF))
    tags.append((0x20, acl["other"], 0xFFFFFFFF))
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *t) for t in tags)
    os.setxattr(path, "system.posix_acl_access", data)


@pytest.mark.lmod
def test_member_layers_their_registry_over_the_groups(member: Member, tree_root: Path, lmod_tool: Any,
                                                      tmp_path: Path) -> None:
    """Their kernels and the group's in one menu, their own name winning, and ``list`` says which is whose."""
    done = maintainer("group", "init", str(tree_root))
    assert done.returncode == 0, done.stderr
    group_registry = tree_root / "kernels.yaml"
    group_registry.write_text("defaults: {images_dir: images}\nkernels:\n"
                              "  demo: {image: /nonexistent/demo.sif, display_name: Demo (group)}\n"
                              "  tools: {image: /nonexistent/tools.sif, display_name: Tools (group)}\n")
    done = maintainer("install", "--all", "--registry", str(group_registry))
    assert done.returncode == 0, done.stderr
    mine = member.home / "kernels.yaml"
    member.run(["sh", "-c", f'cat > "{mine}"'], input_text=(
        f"extends: {group_registry}\nkernels:\n"
        "  demo: {image: /nonexistent/mine.sif, display_name: Demo (mine)}\n"
        "  own: {image: /nonexistent/own.sif, display_name: Own (mine)}\n"))
    listed = member.hpck("list", "--json", "--registry", str(mine))
    assert listed.returncode == 0, listed.stderr
    rows = {k["kernel"]: k for k in json.loads(listed.stdout)["kernels"]}
    assert list(rows) == ["demo", "own", "tools"]
    assert rows["demo"]["registry"] == str(mine) and rows["demo"]["overrides"] == str(group_registry)
    assert rows["tools"]["registry"] == str(group_registry) and rows["own"]["overrides"] is None
    table = member.hpck("list", "--registry", str(mine))
    assert "yours, over the group" in table.stdout and "the group" in table.stdout, table.stdout
    # Their module: loads the group's first, then puts theirs before it on JUPYTER_PATH.
    done = member.hpck("module", "install", "--all", "--registry", str(mine))
    assert done.returncode == 0, done.stderr
    module = (member.home / "modulefiles", "my-kernels")
    listed = member.run(JUPYTER_KERNELSPEC_LIST, module)
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert specs["demo"]["spec"]["display_name"] == "Demo (mine)"
    assert specs["own"]["spec"]["display_name"] == "Own (mine)"
    assert specs["tools"]["spec"]["display_name"] == "Tools (group)"
    assert specs["tools"]["resource_dir"] == str(tree_root / "share/jupyter/kernels/tools")


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.lmod
def test_slurm_build_then_install_publishes_for_the_group(member: Member, tree_root: Path, base_sif: Path,
                                                          lmod_tool: Any) -> None:
    """``build --all --slurm --then-install`` as in the issue: images, kernelspecs and the module land in the
    tree (built on the compute node, umask 077), and the member uses them."""
    done = maintainer("group", "init", str(tree_root))
    assert done.returncode == 0, done.stderr
    registry = tree_root / "kernels.yaml"
    registry.write_text(REGISTRY.split("  shared:")[0])  # one kernel: one job, then the install job
    write_recipe(tree_root, base_sif, "from-slurm")
    done = maintainer("build", "--all", "--registry", str(registry), "--slurm", "--then-install", "--wait",
                      *SMALL_JOB, timeout=900)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tree_root / "modulefiles/container-kernels").is_dir()
    assert_group_readable_only(tree_root)
    module = (tree_root / "modulefiles", "container-kernels")
    kernels = member.kernels(module)
    try:
        assert kernels.cell(kernels.start("demo")) == "from-slurm"
    finally:
        kernels.close()


@pytest.mark.slurm
@pytest.mark.apptainer
def test_builds_on_the_compute_node_and_here_exclude_each_other(member: Member, tree_root: Path, base_sif: Path,
                                                                apptainer_bin: str) -> None:
    """The build lock across nodes (where Lustre's flock may be node-local): the maintainer's build job on the
    compute node holds it, its record says so, and the member's build on the login node waits for it, by name,
    then finds the image up to date."""
    from hpc_kernels import locks, paths

    done = maintainer("group", "init", str(tree_root), "--members", "write")
    assert done.returncode == 0, done.stderr
    registry = tree_root / "kernels.yaml"
    registry.write_text(REGISTRY.split("  shared:")[0])
    write_recipe(tree_root, base_sif, "cross-node", extra="  sleep 8\n", mode=0o640)
    job = subprocess.Popen([sys.executable, "-m", "hpc_kernels", "build", "demo", "--registry", str(registry),
                            "--slurm", "--wait", *SMALL_JOB], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0o077))
    try:
        lock = tree_root / "images" / ".demo.sif.build-lock"
        deadline = time.monotonic() + 180
        record = None
        while time.monotonic() < deadline and record is None and job.poll() is None:
            record = locks.LockRecord.read(lock)
            time.sleep(0.2)
        assert record is not None, "the build job never took the lock"
        assert record.host != paths.hostname() and record.user == pwd.getpwuid(os.getuid()).pw_name
        theirs = member.hpck("build", "demo", "--registry", str(registry), timeout=300)
        assert theirs.returncode == 0, theirs.stderr
        assert (f"waiting for another build of 'demo' to finish (pid {record.pid} of user {record.user} on "
                f"{record.host}, since ") in theirs.stderr
        assert "demo: up to date" in theirs.stderr
    finally:
        out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err + out
    check = subprocess.run([apptainer_bin, "exec", str(tree_root / "images/demo.sif"), "cat", "/group-marker"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.stdout.strip() == "cross-node", check.stderr
    assert not list((tree_root / "images").glob(".demo.sif.*"))
