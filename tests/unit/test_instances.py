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

from hpc_kernels import cli, gc, kernelspec, paths, procfs, registry, specdirs
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.leftovers import Leftover
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.apptainer import cli as apptainer
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.apptainer import reaper as app_reaper
from hpc_kernels.runtimes.apptainer import records as app_records
from hpc_kernels.runtimes.apptainer import status as app_status
from hpc_kernels.runtimes.apptainer import sweep as app_sweep

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
    argv, env, warnings = apptainer.instance_start_command(
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
    argv, env = apptainer.instance_exec_command(spec(), "NAME", "/rt/kernel-1.json", BIN, HOST_ENV,
                                           {app_instance.ENV_INSTANCE: "NAME", app_instance.ENV_ATTACHMENT: "7-9"})
    assert argv == [BIN, "-q", "exec", "--cleanenv", "--no-eval", "instance://NAME",
                    "python3", "-m", "ipykernel_launcher", "-f", "/rt/kernel-1.json"]
    assert env["APPTAINERENV_HPC_KERNELS_INSTANCE"] == "NAME"
    assert env["APPTAINERENV_HPC_KERNELS_ATTACHMENT"] == "7-9"
    assert "APPTAINERENV_PYTHONPATH" not in env and env["PYTHONPATH"] == "/leak"  # the runtime's own env


def test_singularity_gets_its_own_prefix() -> None:
    _argv, env = apptainer.instance_exec_command(spec(), "N", "/rt/k.json", "/usr/bin/singularity", HOST_ENV, {})
    assert env["SINGULARITYENV_A"] == "1" and "APPTAINERENV_A" not in env


def test_list_and_stop_argv() -> None:
    assert apptainer.instance_list_command(BIN) == [BIN, "instance", "list", "--json"]
    assert apptainer.instance_list_command(BIN, "n") == [BIN, "instance", "list", "--json", "n"]
    assert apptainer.instance_stop_command(BIN, "n") == [BIN, "instance", "stop", "n"]
    assert apptainer.instance_stop_command(BIN, "n", force=True) == [BIN, "instance", "stop", "--force", "n"]


def test_parse_instance_list() -> None:
    text = json.dumps({"instances": [{"instance": "a", "pid": 12, "img": "/x.sif", "ip": ""},
                                     {"instance": "b", "pid": "?", "img": "/y.sif"}, {"bogus": 1}]})
    assert apptainer.parse_instance_list(text) == [apptainer.ListedInstance("a", 12, "/x.sif"),
                                              apptainer.ListedInstance("b", 0, "/y.sif")]
    assert apptainer.parse_instance_list("not json") == []
    assert apptainer.parse_instance_list("") == []


# ----------------------------------------------------------------------------- names and identity


def test_name_has_user_kernel_host_job_and_fits_apptainer() -> None:
    ident = app_instance.Identity("alice", "py-3.11", "node-1", "123", "ab12", "0123abcd")
    assert ident.name == "hpck-py-3.11-alice-node_1-j123-ab120123abcd"
    weird = app_instance.Identity("a b@c", "k" * 300, "n:1", "", "ab12", "0123abcd")
    assert app_instance.NAME_RE.match(weird.name) and len(weird.name) <= app_instance.NAME_MAX
    assert weird.name.endswith("-a_b_c-n_1-ab120123abcd")


def test_identity_changes_with_image_rebuild_and_start_options(tmp_path: Path) -> None:
    image = tmp_path / "k.sif"
    image.write_bytes(b"one")
    s = spec(image=str(image))

    def ident(sp: LaunchSpec, cdir: str = "/rt", env: dict[str, str] = HOST_ENV) -> app_instance.Identity:
        argv, _env, _w = apptainer.instance_start_command(sp, "NAME", cdir, "/any/pid", BIN, env)
        return app_instance.identity(sp, argv, env)

    first = ident(s)
    assert ident(s) == first
    # The pid file and the placeholder name are not part of what the instance is.
    argv, _e, _w = apptainer.instance_start_command(s, "OTHER", "/rt", "/elsewhere/pid", BIN, HOST_ENV)
    assert app_instance.identity(s, argv, HOST_ENV) == first
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
    mine = app_instance.owner_tag()
    monkeypatch.setenv("HPC_KERNELS_STATE", str(tmp_path / "elsewhere"))
    assert app_instance.owner_tag() != mine
    owner = app_instance.owner_tag()
    pattern = app_sweep.our_name_pattern("alice", "node-1", owner)

    def name(user: str, host: str, job: str, tag: str) -> str:
        return app_instance.Identity(user, "py-k", host, job, tag, "0123abcd").name

    assert pattern.match(name("alice", "node-1", "", owner))
    assert pattern.match(name("alice", "node-1", "7", owner))
    assert not pattern.match(name("alice", "node-1", "", mine))
    assert not pattern.match(name("bob", "node-1", "", owner))
    assert not pattern.match(name("alice", "node-2", "", owner))


def test_connection_dir_refuses_what_binds_cannot_express() -> None:
    assert app_instance.connection_dir("/rt/kernel-1.json") == "/rt"
    with pytest.raises(HpcKernelsError, match="JUPYTER_RUNTIME_DIR"):
        app_instance.connection_dir("/a:b/kernel.json")


def test_instance_dirs_are_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    a = app_instance.root()
    monkeypatch.setattr(paths, "hostname", lambda: "othernode")
    assert app_instance.root() != a and app_instance.root().parent.name == "othernode"
    with pytest.raises(HpcKernelsError):
        app_instance.instance_dir("../escape")


# ----------------------------------------------------------------------------- processes and records


def test_proc_ref_pins_the_start_time() -> None:
    me = procfs.proc_ref(os.getpid())
    assert me is not None and me.alive()
    assert not procfs.ProcRef(me.pid, me.start + 1).alive()
    child = subprocess.Popen(["true"])
    child.wait()
    assert procfs.proc_ref(child.pid) is None


def test_prune_drops_dead_attachments_only(tmp_path: Path) -> None:
    d = app_instance.instance_dir("hpck-unit")
    me = procfs.proc_ref(os.getpid())
    assert me is not None
    child = subprocess.Popen(["true"])
    child.wait()
    live = app_records.Attachment(f"{me.pid}-{me.start}", me.pid, me.start, "/rt/a.json", 1.0)
    dead = app_records.Attachment(f"{child.pid}-1", child.pid, 1, "/rt/b.json", 1.0)
    (d / app_instance.KERNELS).mkdir(parents=True)
    for att in (live, dead):
        (d / app_instance.KERNELS / f"{att.id}.json").write_text(json.dumps(asdict(att)))
    (d / app_instance.KERNELS / "junk.json").write_text("{}")
    assert app_reaper.prune(d, "hpck-unit") == [live]
    assert [a.id for a in app_records.attachments(d)] == [live.id]


def test_record_round_trip_and_status(tmp_path: Path) -> None:
    d = app_instance.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = procfs.proc_ref(os.getpid())
    assert me is not None
    rec = app_records.InstanceRecord("hpck-unit", "py", "/i.sif", "u", "h", "", me.pid, me.start, 100.0, 5.0,
                                   BIN)
    (d / app_instance.RECORD).write_text(json.dumps(asdict(rec)))
    assert app_records.read_record(d) == rec
    st = app_status.status(d)
    assert st is not None and st.state == "running" and st.kernels == 0 and st.idle_since == 100.0
    assert st.idle_for(now=110.0) == 10.0 and st.to_json(now=110.0)["idle_for"] == 10.0
    (d / app_instance.RECORD).write_text("{broken")
    assert app_records.read_record(d) is None and app_status.status(d) is None


def test_status_with_an_idle_mark_that_is_not_text(tmp_path: Path) -> None:
    d = app_instance.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = procfs.proc_ref(os.getpid())
    assert me is not None
    rec = app_records.InstanceRecord("hpck-unit", "py", "/i.sif", "u", "h", "", me.pid, me.start, 100.0, 5.0,
                                   BIN)
    (d / app_instance.RECORD).write_text(json.dumps(asdict(rec)))
    (d / app_instance.IDLE).write_bytes(b"\xff\xfe\x00garbage")
    st = app_status.status(d)
    assert st is not None and st.idle_since == 100.0


def test_lock_is_exclusive_and_survives_unlink(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with app_records._lock(path) as held:
        assert held
        with app_records._lock(path, blocking=False) as again:
            assert not again
    with app_records._lock(path, blocking=False) as free:
        assert free


def test_poll_interval_is_bounded() -> None:
    assert app_reaper.poll_interval(0) == 0.25
    assert app_reaper.poll_interval(2) == 0.5
    assert app_reaper.poll_interval(300) == 2.0


# ----------------------------------------------------------------------------- gc plumbing and CLI


def test_gc_runs_registered_sweepers_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def one(dry_run: bool) -> list[Leftover]:
        calls.append(("one", dry_run))
        return [Leftover("one", "t", "removed", "why")]

    monkeypatch.setattr(gc, "_test_one", one, raising=False)
    assert gc.sweep(True, ("hpc_kernels.gc:_test_one",)) == [Leftover("one", "t", "removed", "why")]
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
        kernelspec.install(entry, specdirs.Target(), path)
    assert gc.sweep_kernelspecs(dry_run=True) == [
        Leftover("kernelspecs", "gone", "removed", f"its image {tmp_path / 'missing.sif'} is gone")]
    assert set(specdirs.installed_ours()) == {"gone", "here"}
    assert [f.target for f in gc.sweep_kernelspecs()] == ["gone"]
    assert set(specdirs.installed_ours()) == {"here"}


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


def test_only_the_table_s_runtimes_launch() -> None:
    """Shared instances are Apptainer's: the runtime table sends a podman kernel to Podman's plugin, and
    refuses a runtime it does not know."""
    from hpc_kernels import launch
    from hpc_kernels.runtimes import table

    assert table.get("podman").name == "podman" and table.get("apptainer").name == "apptainer"
    with pytest.raises(HpcKernelsError, match="runtime 'nope' cannot be launched"):
        launch.launch(spec(runtime="nope"), "/rt/kernel.json")


def _record(name: str, pid: int, start: int) -> app_records.InstanceRecord:
    return app_records.InstanceRecord(name, "py", "/i.sif", "u", paths.hostname(), "", pid, start,
                                    1.0, 0.5, BIN)


def test_reaper_clears_a_dead_instance_and_kills_what_it_left() -> None:
    name = app_instance.Identity("u", "py", "h", "", app_instance.owner_tag(), "deadbeef").name
    d = app_instance.instance_dir(name)
    (d / app_instance.KERNELS).mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (d / app_instance.RECORD).write_text(json.dumps(asdict(_record(name, gone.pid, 1))))
    left = subprocess.Popen(["sleep", "60"], env={**os.environ, app_instance.ENV_INSTANCE: name})
    try:
        assert app_reaper.reap(d) == 0
        assert left.wait(timeout=10) < 0  # killed
        assert app_records.read_record(d) is None
        assert not app_records.reaper_running(d)
        assert app_reaper.reap(d) == 0  # nothing recorded: returns at once
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


def test_a_second_reaper_leaves_at_once() -> None:
    d = app_instance.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    me = procfs.proc_ref(os.getpid())
    assert me is not None
    (d / app_instance.RECORD).write_text(json.dumps(asdict(_record("hpck-unit", me.pid, me.start))))
    with app_records._lock(d / "reaper.lock"):
        assert app_records.reaper_running(d)
        assert app_reaper._take_reaper_lock(d, attempts=2) is None
        assert app_reaper.reap(d) == 0
    assert app_records.read_record(d) is not None  # untouched


# ----------------------------------------------------------------------------- what dies with a kernel


def test_prune_ends_a_kernel_whose_jupyter_process_died() -> None:
    """The process that started a kernel is gone (a server crash, a JupyterHub time limit): nobody can use
    the kernel any more, so the reaper ends it (SIGTERM to its runtime process)."""
    d = app_instance.instance_dir("hpck-unit")
    (d / app_instance.KERNELS).mkdir(parents=True)
    kernel = subprocess.Popen(["sleep", "60"])  # stands for the kernel's `apptainer exec instance://`
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        me, k = procfs.proc_ref(os.getpid()), procfs.proc_ref(kernel.pid)
        assert me is not None and k is not None
        orphan = app_records.Attachment(f"{k.pid}-{k.start}", k.pid, k.start, "/rt/a.json", 1.0, gone.pid, 1)
        kept = app_records.Attachment(f"{me.pid}-{me.start}", me.pid, me.start, "/rt/b.json", 1.0, me.pid, me.start)
        old = {"id": "1-1", "pid": me.pid, "pid_start": me.start, "connection_file": "/rt/c.json",
               "attached_at": 1.0}  # written by an earlier version: no parent recorded, never orphaned
        for att in (orphan, kept):
            (d / app_instance.KERNELS / f"{att.id}.json").write_text(json.dumps(asdict(att)))
        (d / app_instance.KERNELS / "1-1.json").write_text(json.dumps(old))
        assert [a.id for a in app_reaper.prune(d, "hpck-unit")] == ["1-1", kept.id]
        assert kernel.wait(timeout=10) == -signal.SIGTERM
        assert sorted(p.name for p in (d / app_instance.KERNELS).iterdir()) == ["1-1.json", f"{kept.id}.json"]
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
        ref = procfs.proc_ref(starter.pid)
        assert ref is not None
        name = app_instance.Identity("u", "py", "h", "", app_instance.owner_tag(), "0badcafe").name
        d = app_instance.instance_dir(name)
        d.mkdir(parents=True)
        gone = subprocess.Popen(["true"])
        gone.wait()
        record = replace(_record(name, gone.pid, 1), starter_pid=ref.pid, starter_start=ref.start)
        (d / app_instance.RECORD).write_text(json.dumps(asdict(record)))
        starter.kill()  # SIGKILL of Apptainer's starter: its helper is left behind
        starter.wait()
        yield d, starter, found[0]
    finally:
        for p in procfs.session(starter.pid):
            os.kill(p.pid, signal.SIGKILL)


def test_reaper_kills_the_helpers_a_killed_starter_left(dead_instance: tuple[Path, Any, int]) -> None:
    d, _starter, helper = dead_instance
    assert app_reaper.reap(d) == 0
    deadline = time.monotonic() + 5
    while procfs.proc_ref(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procfs.proc_ref(helper) is None
    assert not d.exists()


def test_gc_names_and_kills_the_helpers_a_killed_starter_left(dead_instance: tuple[Path, Any, int]) -> None:
    d, _starter, helper = dead_instance
    dry = [(f.sweeper, f.target, f.action) for f in app_sweep.sweep_state(dry_run=True)]
    assert ("orphans", f"pid {helper}", "killed") in dry and ("instances", d.name, "removed stale state") in dry
    assert procfs.proc_ref(helper) is not None and d.exists()
    assert [(f.sweeper, f.target, f.action) for f in app_sweep.sweep_state()] == dry
    deadline = time.monotonic() + 5
    while procfs.proc_ref(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procfs.proc_ref(helper) is None and not d.exists()


def test_records_of_an_earlier_version_still_load() -> None:
    d = app_instance.instance_dir("hpck-unit")
    d.mkdir(parents=True)
    data = asdict(_record("hpck-unit", 1, 1))
    del data["starter_pid"], data["starter_start"]
    (d / app_instance.RECORD).write_text(json.dumps(data))
    record = app_records.read_record(d)
    assert record is not None and record.starter is None and app_records.helpers_left(record) == []
