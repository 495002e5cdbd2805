"""Security rules (issue #11): values never become code in generated files, text printed is never
markup, recipes never package what they did not name, and other users cannot stall our kernels."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, modulefile_lua, registry, slurm, slurm_records, slurm_submit, templates
from hpc_kernels.errors import HpcKernelsError, UsageError
from hpc_kernels.runtimes.apptainer import attach as app_attach
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.apptainer import records as app_records
from hpc_kernels.runtimes.apptainer import status as app_status
from tests.helpers.builders import FakeBuilder as RecordingBuilder

REG = """\
defaults:
  images_dir: images
kernels:
  one:
    def: one.def
"""
DEF = {"one.def": "Bootstrap: scratch\n%files\n    one.def /one.def\n"}
INJECTED = "def-x\ntouch /tmp/p"


def one_sentence(err: str) -> str:
    """The error line of a CLI run that failed cleanly (no traceback, one line)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hpc-kernels: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- 2. generated files


@pytest.mark.parametrize("flag, value", [
    ("--account", INJECTED), ("--partition", "cpu\n#SBATCH --wrap=id"), ("--time", "1:00:00\nid"),
    ("--mem", "4G\rid"), ("--account", "def-x #comment"), ("--account", "def-\x1b[31mx"),
])
def test_slurm_flags_are_validated_like_the_registry(
    make_registry: Any, capsys: pytest.CaptureFixture[str], flag: str, value: str,
) -> None:
    path = make_registry(REG, DEF)
    rc = cli.main(["build", "one", "--slurm", "--dry-run", flag, value, "--registry", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert one_sentence(err).startswith(f"hpc-kernels: error: {flag} must be ")
    assert not slurm.jobs_dir().exists() and not slurm.logs_dir().exists()


def test_the_reported_injection_runs_nothing(make_registry: Any, tmp_path: Path) -> None:
    path = make_registry(REG, DEF)
    marker = tmp_path / "p"
    done = subprocess.run([sys.executable, "-m", "hpc_kernels", "build", "one", "--slurm", "--dry-run",
                           "--account", f"def-x\ntouch {marker}", "--registry", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and not marker.exists()
    assert "--account must be a name" in one_sentence(done.stderr)


@pytest.mark.parametrize("key, value", [
    ("account", '"def-x\\u0007"'), ("partition", '"a\\u2028b"'), ("modules", '["apptainer\\nid"]'),
    ("extra_args", '["--qos=x\\nid"]'), ("account", '"x\\"y"'),
])
def test_registry_slurm_values_refuse_control_characters(make_registry: Any, key: str, value: str) -> None:
    path = make_registry(REG + f"    slurm: {{{key}: {value}}}\n", DEF)
    with pytest.raises(HpcKernelsError, match=f"kernels.yaml:6: 'slurm: {key}'"):
        registry.load(path)


def test_renderers_refuse_unsafe_values_themselves(make_registry: Any, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """Defence in depth: even a value that skipped validation cannot reach a generated file."""
    with pytest.raises(HpcKernelsError, match="line break or control character"):
        templates.render("singularity-shim.sh.tmpl", runtime="/bin/apptainer\nid")
    reg = registry.load(make_registry(REG, DEF))
    for bad in (slurm.JobOptions(account=INJECTED), slurm.JobOptions(partition="a b"),
                slurm.JobOptions(time="1\nid"), slurm.JobOptions(modules=("apptainer\nid",))):
        with pytest.raises(HpcKernelsError):
            slurm.plan_build(list(reg.kernels), reg.path, bad, apptainer_dir="")
    # A state directory (from the environment) that cannot be written on an #SBATCH line.
    monkeypatch.setenv("HPC_KERNELS_STATE", str(tmp_path / "st\nate"))
    with pytest.raises(HpcKernelsError, match="HPC_KERNELS_STATE"):
        slurm.plan_build(list(reg.kernels), reg.path, slurm.JobOptions(), apptainer_dir="")
    monkeypatch.setenv("HPC_KERNELS_STATE", str(tmp_path / "my state"))
    with pytest.raises(HpcKernelsError, match="HPC_KERNELS_STATE"):
        slurm.plan_install(["one"], reg.path, slurm.JobOptions())


def test_dry_run_submit_line_quotes_its_arguments(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry(REG + '    slurm: {extra_args: ["--comment=a b;id"]}\n', DEF)
    assert cli.main(["build", "one", "--slurm", "--dry-run", "--registry", str(path)]) == 0
    assert "# submit with: sbatch --parsable '--comment=a b;id' <this script>\n" in capsys.readouterr().out


def test_lua_strings_escape_every_control_character() -> None:
    text = modulefile_lua.lua_string("a\x00b\x1bc\x7fd\u2028e\tf")
    assert text == '"a\\0b\\27c\\127d\u2028e\\9f"'
    assert all(ord(c) >= 32 and c != "\x7f" for c in text)


@pytest.mark.parametrize("option", ["--prefix", "--dir"])
def test_module_install_refuses_a_path_with_a_newline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      option: str) -> None:
    bad = tmp_path / "a\nb"
    others = ["--dir", str(tmp_path / "mf")] if option == "--prefix" else ["--prefix", str(tmp_path / "p")]
    rc = cli.main(["module", "install", option, str(bad), *others])
    assert rc == 2
    assert "line break or control character" in one_sentence(capsys.readouterr().err)
    assert not any(tmp_path.rglob("*.lua")) and not any(tmp_path.rglob("hpc-kernels"))


def test_module_paths_that_cannot_go_on_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="':'"):
        modulefile_lua.ModuleConfig(tree=tmp_path / "mf", prefix=tmp_path / "a:b", program=Path("/v/bin/hpc-kernels"))
    with pytest.raises(UsageError, match="control character"):
        modulefile_lua.ModuleConfig(tree=tmp_path / "mf", prefix=tmp_path / "p", program=Path("/v/bin/hpc\tk"))
    with pytest.raises(UsageError, match="control character"):
        modulefile_lua.ModuleConfig(tree=tmp_path / "mf", prefix=tmp_path / "p", program=Path("/v/bin/hpc-kernels"),
                                registry=tmp_path / "k\r.yaml")



# ----------------------------------------------------------------------------- 3. text, not markup

#: A display name and a directory that rich would read as markup (a closing tag, a "style", an emoji code).
MARKUP_NAME = "Py [cuda/12.2] [/x] :smile: [bold]"
MARKUP_DIR = "imgs [/x] [cuda/12.2]"


@pytest.fixture
def markup_registry(make_registry: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COLUMNS", "1000")  # no table folding: the assertions look for whole strings
    path: Path = make_registry(
        f'defaults:\n  images_dir: "{MARKUP_DIR}"\nkernels:\n  one:\n    def: one.def\n'
        f'    display_name: "{MARKUP_NAME}"\n', DEF)
    return path


def test_user_text_is_printed_literally(markup_registry: Path, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    from hpc_kernels.build import stamps

    reg = str(markup_registry)
    prefix = str(tmp_path / "pfx [/x]")
    assert cli.main(["install", "one", "--registry", reg, "--prefix", prefix]) == 0
    err = capsys.readouterr().err
    assert f"({MARKUP_NAME})" in err and f"{prefix}/share/jupyter/kernels/one" in err
    assert f"its image {markup_registry.parent / MARKUP_DIR / 'one.sif'} does not exist yet" in err

    assert cli.main(["list", "--registry", reg]) == 0
    shown = capsys.readouterr()
    out = shown.out + shown.err  # the registry's name is on stderr, the rows on stdout
    assert str(markup_registry) in out and str(markup_registry.parent / MARKUP_DIR / "one.sif") in out

    # An image that is up to date: `build` says so, with its path.
    entry = registry.load(markup_registry).kernels[0]
    entry.image.parent.mkdir(parents=True)
    entry.image.write_text("image")
    stamps.stamp_path(entry.image).write_text(json.dumps({"digest": stamps.input_digest(entry)}))
    assert cli.main(["build", "one", "--registry", reg]) == 0
    assert f"one: up to date ({entry.image})" in capsys.readouterr().err

    assert cli.main(["uninstall", "one", "--prefix", prefix]) == 0
    assert f"({prefix}/share/jupyter/kernels/one)" in capsys.readouterr().err


def test_show_and_doctor_print_user_text_literally(markup_registry: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = str(markup_registry)
    assert cli.main(["install", "one", "--registry", reg]) == 0
    capsys.readouterr()
    assert cli.main(["show", "one", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "kernel.json[/]" not in out and f'"display_name": "{MARKUP_NAME}"' in out
    assert "/share/jupyter/kernels/one/kernel.json" in out
    cli.main(["doctor", "one", "--registry", reg])
    out = capsys.readouterr().out
    assert str(markup_registry.parent / MARKUP_DIR / "one.sif") in out


def test_build_progress_shows_log_lines_as_text(markup_registry: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A build's output lines are shown in the progress display: '[/x]' there must not crash it."""
    from hpc_kernels.build import orchestrator

    def fake_build(entry: Any, **kw: Any) -> Any:
        kw["on_line"]("copying [/x] [cuda/12.2]")
        kw["on_event"]("step [/y]")
        raise HpcKernelsError("building kernel 'one' failed: [/z] gone")

    monkeypatch.setattr(orchestrator, "build", fake_build)
    assert cli.main(["build", "one", "--registry", str(markup_registry)]) == 1
    assert "hpc-kernels: error: building kernel 'one' failed: [/z] gone" in capsys.readouterr().err


def test_jobs_table_prints_reasons_and_paths_literally(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels.commands import jobs

    monkeypatch.setenv("COLUMNS", "1000")
    row = slurm_records.TaskStatus(job_id="7", task_id="7", kind="build", kernel="one", state="FAILED",
                           reason="[/x] [red]boom", exit_code="1", log="/logs [/x]/build-7.out",
                           log_tail="line [/y]")
    jobs._print_table([row])
    jobs.print_failure(row)
    out = capsys.readouterr().out
    assert "[/x] [red]boom" in out and "/logs [/x]/build-7.out" in out and "line [/y]" in out


# ----------------------------------------------------------------------------- 4. recipes


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch) -> RecordingBuilder:
    from hpc_kernels.build import orchestrator

    fake = RecordingBuilder()
    monkeypatch.setattr(orchestrator, "default_builder", lambda entry: fake)
    return fake


@pytest.mark.parametrize("text, line, needle", [
    ("Bootstrap: localimage\n", 1, "'Bootstrap: localimage' needs 'From:' with a value"),
    ("Bootstrap: localimage\nFrom:\n%post\n    true\n", 2, "needs 'From:' with a value"),
    ("Bootstrap: localimage\nFrom: # base.sif\n", 2, "needs 'From:' with a value"),
    # spython reads comment lines; Apptainer does not: a From: in a comment names nothing.
    ("# From: base.sif\nBootstrap: localimage\n", 2, "needs 'From:'"),
    ("%post\n    echo hi\n", 1, "has no 'Bootstrap:' line"),
    ("\n# only comments\n\n", 1, "the recipe is empty"),
    ("Bootstrap: Docker\nFrom: debian:12\n", 1, "write 'Bootstrap: docker'"),
    ("Bootstrap: dockerr\nFrom: debian:12\n", 1, "no bootstrap agent 'dockerr'"),
    ("Bootstrap: debootstrap\nMirrorURL: http://deb.debian.org/debian/\n", 1, "needs 'OSVersion:'"),
    ("Bootstrap: docker\nFrom: debian:12\n%post\n  true\nBootstrap: localimage\n%files from 1\n  /a /a\n",
     5, "'Bootstrap: localimage' needs 'From:'"),
    ("Bootstrap: localimage\nFrom .\n", 2, "is not 'Key: value'"),
])
def test_incomplete_headers_are_refused_before_apptainer_runs(
    make_registry: Any, builder: RecordingBuilder, capsys: pytest.CaptureFixture[str],
    text: str, line: int, needle: str,
) -> None:
    path = make_registry(REG, {"one.def": text, "secret.txt": "do not package me"})
    rc = cli.main(["build", "one", "--registry", str(path)])
    err = one_sentence(capsys.readouterr().err)
    assert rc == 1 and builder.calls == []
    assert f"{path.parent / 'one.def'}:{line}: " in err and needle in err
    assert not (path.parent / "images" / "one.sif").exists()
    # build --slurm refuses it before submitting (or printing) a job
    rc = cli.main(["build", "one", "--slurm", "--dry-run", "--registry", str(path)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and needle in one_sentence(err)


def test_a_directory_is_a_base_only_when_it_is_a_sandbox(make_registry: Any, builder: RecordingBuilder,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry(REG, {"one.def": "Bootstrap: localimage\nFrom: .\n", "secret.txt": "private"})
    assert cli.main(["build", "one", "--registry", str(path)]) == 1
    err = one_sentence(capsys.readouterr().err)
    assert f"one.def:2: 'From: .' is a directory ({path.parent}), not an image" in err and builder.calls == []
    sandbox = path.parent / "sandbox"
    (sandbox / ".singularity.d").mkdir(parents=True)
    (path.parent / "one.def").write_text(f"Bootstrap: localimage\nFrom: {sandbox}\n")
    assert cli.main(["build", "one", "--registry", str(path)]) == 0
    (built,) = builder.recipe_files  # the recipe derived from one.def (labels added), with the sandbox as its base
    assert built.read_text().startswith(f"# Derived by hpc-kernels from {path.parent / 'one.def'};")
    assert f"\nFrom: {sandbox}\n" in built.read_text()


def test_complete_headers_build(make_registry: Any, builder: RecordingBuilder) -> None:
    from hpc_kernels.build import orchestrator, recipe

    path = make_registry(REG, {"one.def": "# Bootstrap: localimage in a comment\nBootstrap: docker\n"
                                          "From: python:3.12-slim  # the base\n%post\n    true\n"})
    entry = registry.load(path).kernels[0]
    assert orchestrator.build(entry).action == "built" and len(builder.calls) == 1
    stage, = recipe.stages((path.parent / "one.def").read_text())
    assert stage.get("from") == "python:3.12-slim" and stage.line_of("from") == 3
    shipped = Path(__file__).parents[2] / "defs" / "science.def"
    assert recipe.check(shipped)[0].get("bootstrap")


# ----------------------------------------------------------------------------- 5. private state, locks


@pytest.fixture
def umask_022() -> Any:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process that opens ``path`` read-only (enough for flock) and holds an exclusive flock."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_lock_held_elsewhere_is_reported_within_a_bounded_time(tmp_path: Path) -> None:
    from hpc_kernels.errors import LockBusyError
    from hpc_kernels.locks import locked

    path = tmp_path / "lock"
    path.write_text("")
    holder = hold_lock(path)
    try:
        start = time.monotonic()
        with pytest.raises(LockBusyError) as caught, locked(path, timeout=0.5):
            pass
        assert time.monotonic() - start < 5
        assert f"the lock {path} is held by another process (pid {holder.pid} (yours))" in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    with locked(path, timeout=0.5) as held:  # released: taken at once
        assert held


def test_another_users_lock_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels import locks
    from hpc_kernels.errors import LockBusyError

    path = tmp_path / "lock"
    path.write_text("")
    holder = hold_lock(path)
    real = locks.lock_holder
    seen = real(os.open(path, os.O_RDONLY))
    assert seen is not None and seen.pid == holder.pid and seen.uid == os.getuid()
    # As if the holder were another user's process: no wait at all, even without a time limit.
    monkeypatch.setattr(locks, "lock_holder", lambda fd: locks.LockHolder(holder.pid, os.getuid() + 1))
    try:
        start = time.monotonic()
        with pytest.raises(LockBusyError, match="held by another user's process"), locks.locked(path):
            pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_an_instance_lock_someone_holds_stalls_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels.runtimes.apptainer import instance as app_instance
    from hpc_kernels.runtimes.apptainer import status as app_status

    monkeypatch.setattr(app_records, "LOCK_TIMEOUT", 0.5, raising=False)
    d = app_instance.instance_dir("hpck-held")
    d.mkdir(parents=True)
    (d / "lock").write_text("")
    holder = hold_lock(d / "lock")
    outcome: list[BaseException] = []

    def stop() -> None:
        try:
            app_status.stop("hpck-held")
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    waiter = threading.Thread(target=stop, daemon=True)
    try:
        waiter.start()
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "stop still waits for the lock another process holds"
        (error,) = outcome
        from hpc_kernels.errors import LockBusyError

        assert isinstance(error, LockBusyError) and f"pid {holder.pid}" in str(error)
    finally:
        holder.kill()
        holder.wait()
        waiter.join(timeout=10)


def test_state_is_private_whatever_the_umask(umask_022: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             make_registry: Any, builder: RecordingBuilder) -> None:
    from hpc_kernels import paths
    from hpc_kernels.build import orchestrator
    from hpc_kernels.runtimes.apptainer import cli as apptainer

    # An instance directory left 0755/0644 by an older version, under a 0755 state tree.
    image = tmp_path / "k.sif"
    image.write_text("image")
    spec = _instance_spec(str(image))
    old = app_instance.root() / "hpck-old"
    old.mkdir(parents=True)
    (old / "lock").write_text("")
    (old / "lock").chmod(0o644)
    for directory in (paths.state_dir(), app_instance.root().parent, app_instance.root(), old):
        directory.chmod(0o755)

    class Launched(Exception):
        pass

    def start_instance(argv: list[str], env: Any, timeout: float = 0) -> None:
        Path(argv[argv.index("--pid-file") + 1]).write_text(f"{os.getpid()}\n")

    def execve(*_args: Any) -> None:
        raise Launched

    monkeypatch.setattr(apptainer, "find_binary", lambda **kw: "/opt/apptainer/bin/apptainer")
    monkeypatch.setattr(apptainer, "start_instance", start_instance)
    monkeypatch.setattr(app_attach, "ensure_reaper", lambda d: False)
    monkeypatch.setattr(app_attach.os, "execve", execve)
    with pytest.raises(Launched):
        app_attach.launch(spec, str(tmp_path / "runtime" / "kernel-1.json"))
    (d,) = [p for p in app_status.instance_dirs() if p != old]
    for directory in (paths.state_dir(), app_instance.root().parent, app_instance.root(), d, d / app_instance.KERNELS):
        assert mode(directory) == 0o700, directory
    for file in (d / "lock", d / app_instance.RECORD, *(d / app_instance.KERNELS).glob("*.json")):
        assert mode(file) == 0o600, file
    with app_records._lock(old / "lock"):  # an older lock file of ours is tightened when taken
        assert mode(old / "lock") == 0o600 and mode(old) == 0o700

    # A build's log, and the records of a Slurm job.
    path = make_registry(REG, DEF)
    entry = registry.load(path).kernels[0]
    log = orchestrator.build(entry).log_path
    assert log is not None and mode(log) == 0o600 and mode(log.parent) == 0o700

    class FakeSlurm:
        def submit(self, script: str, args: Any = ()) -> str:
            return "77"

    plan = slurm.plan_build([entry], path, slurm.JobOptions(), apptainer_dir="")
    job = slurm_submit.submit(plan, path, slurm=FakeSlurm())  # type: ignore[arg-type]
    assert mode(slurm.jobs_dir()) == 0o700 and mode(slurm.logs_dir()) == 0o700
    assert mode(job.record) == 0o600 and mode(slurm.jobs_dir() / "77.sbatch") == 0o600
    assert "umask 077" in plan.script


def _instance_spec(image: str) -> Any:
    from hpc_kernels.model import LaunchSpec

    return LaunchSpec(kernel="py", runtime="apptainer", mode="instance", image=image,
                      command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                      binds=(), env=(), pass_env=(), gpu="none", runtime_args=(), idle_timeout=30.0)
