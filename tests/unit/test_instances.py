"""Unit tests of shared instances: names, identity, exact argv, records, pruning, gc plumbing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, gc, instances, kernelspec, procfs, registry
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.launchspec import LaunchSpec
from hpc_kernels.runtimes import apptainer as appt

BIN = "/opt/apptainer/bin/apptainer"


def spec(image: str = "/img/k.sif", **kw: object) -> LaunchSpec:
    base = LaunchSpec(kernel="py", runtime="apptainer", mode="instance", image=image,
                      command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                      binds=("/project", "/scratch:/scratch:ro"), env=(("A", "1"),), pass_env=("KEEP_*",),
                      gpu="none", runtime_args=("--writable-tmpfs",), idle_timeout=30.0)
    return replace(base, **kw)  # type: ignore[arg-type]


HOST_ENV = {"PATH": "/usr/bin", "HOME": "/home/u", "PYTHONPATH": "/leak", "KEEP_ME": "yes",
            "SLURM_JOB_ID": "42", "APPTAINERENV_STRAY": "x"}


# ----------------------------------------------------------------------------- argv


def test_instance_start_argv_binds_connection_dir_and_registry_binds() -> None:
    argv, env, warnings = appt.instance_start_command(
        spec(), "NAME", "/run/user/1/jupyter", "/state/pid", BIN, {**HOST_ENV, "SLURM_TMPDIR": "/local/tmp"})
    assert argv == [BIN, "-q", "instance", "start", "--cleanenv", "--no-eval", "--pid-file", "/state/pid", "-W", "/local/tmp",
                    "--home", "/home/u",  # $HOME differs from the passwd home of the user running the test
                    "--bind", "/run/user/1/jupyter:/run/user/1/jupyter:rw",
                    "--bind", "/project", "--bind", "/scratch:/scratch:ro",
                    "--writable-tmpfs", "/img/k.sif", "NAME"]
    assert warnings == []
    # Same clean-environment rules as exec mode: the allowlist, pass_env, env; no stray injections.
    assert env["APPTAINERENV_KEEP_ME"] == "yes" and env["APPTAINERENV_A"] == "1"
    assert env["APPTAINERENV_PYTHONNOUSERSITE"] == "1" and env["APPTAINERENV_SLURM_JOB_ID"] == "42"
    assert "APPTAINERENV_PYTHONPATH" not in env and "APPTAINERENV_STRAY" not in env


def test_instance_exec_argv_keeps_host_connection_path_and_sets_markers() -> None:
    argv, env = appt.instance_exec_command(spec(), "NAME", "/rt/kernel-1.json", BIN, HOST_ENV,
                                           {instances.ENV_INSTANCE: "NAME", instances.ENV_ATTACHMENT: "7-9"})
    assert argv == [BIN, "-q", "exec", "--cleanenv", "--no-eval", "instance://NAME",
                    "python3", "-m", "ipykernel_launcher", "-f", "/rt/kernel-1.json"]
    assert env["APPTAINERENV_HPC_KERNELS_INSTANCE"] == "NAME"
    assert env["APPTAINERENV_HPC_KERNELS_ATTACHMENT"] == "7-9"
    assert "APPTAINERENV_PYTHONPATH" not in env and env["PYTHONPATH"] == "/leak"  # the runtime's own env


def test_singularity_gets_its_own_prefix() -> None:
    _argv, env = appt.instance_exec_command(spec(), "N", "/rt/k.json", "/usr/bin/singularity", HOST_ENV, {})
    assert env["SINGULARITYENV_A"] == "1" and "APPTAINERENV_A" not in env


def test_list_and_stop_argv() -> None:
    assert appt.instance_list_command(BIN) == [BIN, "instance", "list", "--json"]
    assert appt.instance_list_command(BIN, "n") == [BIN, "instance", "list", "--json", "n"]
    assert appt.instance_stop_command(BIN, "n") == [BIN, "instance", "stop", "n"]
    assert appt.instance_stop_command(BIN, "n", force=True) == [BIN, "instance", "stop", "--force", "n"]


def test_parse_instance_list() -> None:
    text = json.dumps({"instances": [{"instance": "a", "pid": 12, "img": "/x.sif", "ip": ""},
                                     {"instance": "b", "pid": "?", "img": "/y.sif"}, {"bogus": 1}]})
    assert appt.parse_instance_list(text) == [appt.ListedInstance("a", 12, "/x.sif"),
                                              appt.ListedInstance("b", 0, "/y.sif")]
    assert appt.parse_instance_list("not json") == []
    assert appt.parse_instance_list("") == []


# ----------------------------------------------------------------------------- names and identity


def test_name_has_user_kernel_host_job_and_fits_apptainer() -> None:
    ident = instances.Identity("alice", "py-3.11", "node-1", "123", "ab12", "0123abcd")
    assert ident.name == "hpck-py-3.11-alice-node_1-j123-ab120123abcd"
    weird = instances.Identity("a b@c", "k" * 300, "n:1", "", "ab12", "0123abcd")
    assert instances.NAME_RE.match(weird.name) and len(weird.name) <= instances.NAME_MAX
    assert weird.name.endswith("-a_b_c-n_1-ab120123abcd")


def test_identity_changes_with_image_rebuild_and_start_options(tmp_path: Path) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"one")
    s = spec(image=str(image))

    def ident(sp: LaunchSpec, cdir: str = "/rt", env: dict[str, str] = HOST_ENV) -> instances.Identity:
        argv, _env, _w = appt.instance_start_command(sp, "NAME", cdir, "/any/pid", BIN, env)
        return instances.identity(sp, argv, env)

    first = ident(s)
    assert ident(s) == first
    # The pid file and the placeholder name are not part of what the instance is.
    argv, _e, _w = appt.instance_start_command(s, "OTHER", "/rt", "/elsewhere/pid", BIN, HOST_ENV)
    assert instances.identity(s, argv, HOST_ENV) == first
    assert first.job == "42" and "-j42-" in first.name
    assert ident(s, cdir="/other").name != first.name
    assert ident(replace(s, binds=())).name != first.name
    # A rebuild replaces the file atomically (new inode): a new name.
    new = tmp_path / "k.sif.new"
    new.write_bytes(b"one")
    os.replace(new, image)
    assert ident(s).name != first.name
    with pytest.raises(HpcKernelsError, match="cannot read the image"):
        ident(spec(image=str(tmp_path / "missing.sif")))


def test_owner_tag_follows_the_state_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mine = instances.owner_tag()
    monkeypatch.setenv("HPC_KERNELS_STATE", str(tmp_path / "elsewhere"))
    assert instances.owner_tag() != mine
    owner = instances.owner_tag()
    pattern = instances.our_name_pattern("alice", "node-1", owner)

    def name(user: str, host: str, job: str, tag: str) -> str:
        return instances.Identity(user, "py-k", host, job, tag, "0123abcd").name

    assert pattern.match(name("alice", "node-1", "", owner))
    assert pattern.match(name("alice", "node-1", "7", owner))
    assert not pattern.match(name("alice", "node-1", "", mine))
    assert not pattern.match(name("bob", "node-1", "", owner))
    assert not pattern.match(name("alice", "node-2", "", owner))


def test_connection_dir_refuses_what_binds_cannot_express() -> None:
    assert instances.connection_dir("/rt/kernel-1.json") == "/rt"
    with pytest.raises(HpcKernelsError, match="JUPYTER_RUNTIME_DIR"):
        instances.connection_dir("/a:b/kernel.json")


def test_instance_dirs_are_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    a = instances.root()
    monkeypatch.setattr(instances.paths, "hostname", lambda: "othernode")
    assert instances.root() != a and instances.root().parent.name == "othernode"
    with pytest.raises(HpcKernelsError):
        instances.instance_dir("../escape")


# ----------------------------------------------------------------------------- processes and records


def test_proc_ref_pins_the_start_time() -> None:
    me = instances.proc_ref(os.getpid())
    assert me is not None and me.alive()
    assert not instances.ProcRef(me.pid, me.start + 1).alive()
    child = subprocess.Popen(["true"])
    child.wait()
    assert instances.proc_ref(child.pid) is None


def test_prune_drops_dead_attachments_only(tmp_path: Path) -> None:
    d = instances.instance_dir("hpck-unit")
    me = instances.proc_ref(os.getpid())
    assert me is not None
    child = subprocess.Popen(["true"])
    child.wait()
    live = instances.Attachment(f"{me.pid}-{me.start}", me.pid, me.start, "/rt/a.json", 1.0)
    dead = instances.Attachment(f"{child.pid}-1", child.pid, 1, "/rt/b.json", 1.0)
    (d / instances.KERNELS).mkdir(parents=True)
    for att in (live, dead):
        (d / instances.KERNELS / f"{att.id}.json").write_text(json.dumps(asdict(att)))
    (d / instances.KERNELS / "junk.json").write_text("{}")
    assert instances.prune(d, "hpck-unit") == [live]
    assert [a.id for a in instances.attachments(d)] == [live.id]


def test_record_round_trip_and_status(tmp_path: Path) -> None:
    d = instances.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = instances.proc_ref(os.getpid())
    assert me is not None
    rec = instances.InstanceRecord("hpck-unit", "py", "/i.sif", "u", "h", "", me.pid, me.start, 100.0, 5.0,
                                   BIN)
    (d / instances.RECORD).write_text(json.dumps(asdict(rec)))
    assert instances.read_record(d) == rec
    st = instances.status(d)
    assert st is not None and st.state == "running" and st.kernels == 0 and st.idle_since == 100.0
    assert st.idle_for(now=110.0) == 10.0 and st.to_json(now=110.0)["idle_for"] == 10.0
    (d / instances.RECORD).write_text("{broken")
    assert instances.read_record(d) is None and instances.status(d) is None


def test_status_with_an_idle_mark_that_is_not_text(tmp_path: Path) -> None:
    d = instances.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = instances.proc_ref(os.getpid())
    assert me is not None
    rec = instances.InstanceRecord("hpck-unit", "py", "/i.sif", "u", "h", "", me.pid, me.start, 100.0, 5.0,
                                   BIN)
    (d / instances.RECORD).write_text(json.dumps(asdict(rec)))
    (d / instances.IDLE).write_bytes(b"\xff\xfe\x00garbage")
    st = instances.status(d)
    assert st is not None and st.idle_since == 100.0


def test_lock_is_exclusive_and_survives_unlink(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with instances._lock(path) as held:
        assert held
        with instances._lock(path, blocking=False) as again:
            assert not again
    with instances._lock(path, blocking=False) as free:
        assert free


def test_poll_interval_is_bounded() -> None:
    assert instances.poll_interval(0) == 0.25
    assert instances.poll_interval(2) == 0.5
    assert instances.poll_interval(300) == 2.0


# ----------------------------------------------------------------------------- gc plumbing and CLI


def test_gc_runs_registered_sweepers_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def one(dry_run: bool) -> list[gc.Finding]:
        calls.append(("one", dry_run))
        return [gc.Finding("one", "t", "removed", "why")]

    monkeypatch.setattr(gc, "_test_one", one, raising=False)
    assert gc.sweep(True, ("hpc_kernels.gc:_test_one",)) == [gc.Finding("one", "t", "removed", "why")]
    assert calls == [("one", True)]
    assert all(callable(gc.resolve(name)) for name in gc.SWEEPERS)


def test_gc_sweeps_kernelspecs_without_image(make_registry: Callable[..., Path], tmp_path: Path) -> None:
    present = tmp_path / "here.sif"
    present.write_bytes(b"x")
    path = make_registry(f"""
        kernels:
          gone: {{image: {tmp_path / 'missing.sif'}}}
          here: {{image: {present}}}
        """)
    for entry in registry.load_file(path).kernels:
        kernelspec.install(entry, kernelspec.Target(), path)
    assert gc.sweep_kernelspecs(dry_run=True) == [
        gc.Finding("kernelspecs", "gone", "removed", f"its image {tmp_path / 'missing.sif'} is gone")]
    assert set(kernelspec.installed_ours()) == {"gone", "here"}
    assert [f.target for f in gc.sweep_kernelspecs()] == ["gone"]
    assert set(kernelspec.installed_ours()) == {"here"}


def test_cli_with_no_instances(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["instances", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == []
    assert cli.main(["instances"]) == 0
    assert "no shared instances" in capsys.readouterr().err
    assert cli.main(["stop"]) == 2
    assert "--all" in capsys.readouterr().err
    assert cli.main(["stop", "nope"]) == 1
    assert "no instance or kernel named 'nope'" in capsys.readouterr().err
    assert cli.main(["stop", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"stopped": []}


def test_launch_refuses_other_runtimes() -> None:
    with pytest.raises(HpcKernelsError, match="runtime 'podman'"):
        instances.launch(spec(runtime="podman"), "/rt/kernel.json")


def _record(name: str, pid: int, start: int) -> instances.InstanceRecord:
    return instances.InstanceRecord(name, "py", "/i.sif", "u", instances.paths.hostname(), "", pid, start,
                                    1.0, 0.5, BIN)


def test_reaper_clears_a_dead_instance_and_kills_what_it_left() -> None:
    name = instances.Identity("u", "py", "h", "", instances.owner_tag(), "deadbeef").name
    d = instances.instance_dir(name)
    (d / instances.KERNELS).mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (d / instances.RECORD).write_text(json.dumps(asdict(_record(name, gone.pid, 1))))
    left = subprocess.Popen(["sleep", "60"], env={**os.environ, instances.ENV_INSTANCE: name})
    try:
        assert instances.reap(d) == 0
        assert left.wait(timeout=10) < 0  # killed
        assert instances.read_record(d) is None
        assert not instances.reaper_running(d)
        assert instances.reap(d) == 0  # nothing recorded: returns at once
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


def test_a_second_reaper_leaves_at_once() -> None:
    d = instances.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = instances.proc_ref(os.getpid())
    assert me is not None
    (d / instances.RECORD).write_text(json.dumps(asdict(_record("hpck-unit", me.pid, me.start))))
    with instances._lock(d / "reaper.lock"):
        assert instances.reaper_running(d)
        assert instances._take_reaper_lock(d, attempts=2) is None
        assert instances.reap(d) == 0
    assert instances.read_record(d) is not None  # untouched


# ----------------------------------------------------------------------------- what dies with a kernel


def test_prune_ends_a_kernel_whose_jupyter_process_died() -> None:
    """The process that started a kernel is gone (a server crash, a JupyterHub time limit): nobody can use
    the kernel any more, so the reaper ends it (SIGTERM to its runtime process)."""
    d = instances.instance_dir("hpck-unit")
    (d / instances.KERNELS).mkdir(parents=True)
    kernel = subprocess.Popen(["sleep", "60"])  # stands for the kernel's `apptainer exec instance://`
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        me, k = instances.proc_ref(os.getpid()), instances.proc_ref(kernel.pid)
        assert me is not None and k is not None
        orphan = instances.Attachment(f"{k.pid}-{k.start}", k.pid, k.start, "/rt/a.json", 1.0, gone.pid, 1)
        kept = instances.Attachment(f"{me.pid}-{me.start}", me.pid, me.start, "/rt/b.json", 1.0, me.pid, me.start)
        old = {"id": "1-1", "pid": me.pid, "pid_start": me.start, "connection_file": "/rt/c.json",
               "attached_at": 1.0}  # written by an earlier version: no parent recorded, never orphaned
        for att in (orphan, kept):
            (d / instances.KERNELS / f"{att.id}.json").write_text(json.dumps(asdict(att)))
        (d / instances.KERNELS / "1-1.json").write_text(json.dumps(old))
        assert [a.id for a in instances.prune(d, "hpck-unit")] == ["1-1", kept.id]
        assert kernel.wait(timeout=10) == -signal.SIGTERM
        assert sorted(p.name for p in (d / instances.KERNELS).iterdir()) == ["1-1.json", f"{kept.id}.json"]
    finally:
        if kernel.poll() is None:
            kernel.kill()
            kernel.wait()


@pytest.fixture
def dead_instance(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes], int]]:
    """An instance record whose process and starter are dead, the starter's helper (a stand-in named
    squashfuse_ll, in the starter's session) still running: what a SIGKILL of Apptainer's starter leaves."""
    helper = tmp_path / "squashfuse_ll"
    helper.symlink_to("/bin/sleep")  # the process is named after the path it was run by
    starter = subprocess.Popen(["sh", "-c", f"{helper} 300 & wait"], start_new_session=True)
    try:
        found: list[int] = []
        deadline = time.monotonic() + 5
        while not found and time.monotonic() < deadline:
            found = [p.pid for p in procfs.session(starter.pid) if p.comm == "squashfuse_ll"]
            time.sleep(0.05)
        assert found
        ref = instances.proc_ref(starter.pid)
        assert ref is not None
        name = instances.Identity("u", "py", "h", "", instances.owner_tag(), "0badcafe").name
        d = instances.instance_dir(name)
        d.mkdir(parents=True)
        gone = subprocess.Popen(["true"])
        gone.wait()
        record = replace(_record(name, gone.pid, 1), starter_pid=ref.pid, starter_start=ref.start)
        (d / instances.RECORD).write_text(json.dumps(asdict(record)))
        starter.kill()  # SIGKILL of Apptainer's starter: its helper is left behind
        starter.wait()
        yield d, starter, found[0]
    finally:
        for p in procfs.session(starter.pid):
            os.kill(p.pid, signal.SIGKILL)


def test_reaper_kills_the_helpers_a_killed_starter_left(dead_instance: tuple[Path, Any, int]) -> None:
    d, _starter, helper = dead_instance
    assert instances.reap(d) == 0
    deadline = time.monotonic() + 5
    while procfs.proc_ref(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procfs.proc_ref(helper) is None
    assert not d.exists()


def test_gc_names_and_kills_the_helpers_a_killed_starter_left(dead_instance: tuple[Path, Any, int]) -> None:
    d, _starter, helper = dead_instance
    dry = [(f.sweeper, f.target, f.action) for f in instances.sweep_state(dry_run=True)]
    assert ("orphans", f"pid {helper}", "killed") in dry and ("instances", d.name, "removed stale state") in dry
    assert procfs.proc_ref(helper) is not None and d.exists()
    assert [(f.sweeper, f.target, f.action) for f in instances.sweep_state()] == dry
    deadline = time.monotonic() + 5
    while procfs.proc_ref(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procfs.proc_ref(helper) is None and not d.exists()


def test_records_of_an_earlier_version_still_load() -> None:
    d = instances.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    data = asdict(_record("hpck-unit", 1, 1))
    del data["starter_pid"], data["starter_start"]
    (d / instances.RECORD).write_text(json.dumps(data))
    record = instances.read_record(d)
    assert record is not None and record.starter is None and instances.helpers_left(record) == []
