"""Shared instances end to end: real Apptainer, real jupyter_client kernels, the real CLI.

Every wait is bounded; every instance, kernel and reaper a test starts is gone when it ends.
The idle timeout is short (2 s) so the idle stop is observed within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, kernelspec, paths, registry, specdirs
from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.runtimes.apptainer import cli as apptainer
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.apptainer import records as app_records
from hpc_kernels.runtimes.apptainer import status as app_status
from hpc_kernels.runtimes.apptainer import sweep as app_sweep
from tests.helpers.proctree import wait_for

pytestmark = pytest.mark.apptainer

IDLE = 2.0
#: Idle stop must happen within the timeout plus the reaper's poll, plus slack for a busy machine.
IDLE_MARGIN = 20.0
READY_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- helpers




def apptainer_names(binary: str) -> set[str]:
    """Names of this test's instances, as Apptainer lists them (other tests' are not ours to count)."""
    ours = app_sweep.our_name_pattern(app_instance.user_name(), paths.hostname(),
                                      app_instance.owner_tag())
    return {i.name for i in apptainer.list_instances(binary) if ours.match(i.name)}


def cli_json(*argv: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run the CLI in-process and parse its JSON output."""
    capsys.readouterr()
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def shared_kernel(make_registry: Callable[..., Path], base_sif: Path, apptainer_bin: str,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An installed instance-mode kernelspec 'shared' (idle timeout 2 s); stops what it leaves."""
    monkeypatch.setenv("PATH", f"{os.path.dirname(apptainer_bin)}{os.pathsep}{os.environ['PATH']}")
    path = make_registry(f"""
        kernels:
          shared:
            image: {base_sif}
            mode: instance
            idle_timeout: {IDLE}
            command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
        """)
    entry = registry.load_file(path).get("shared")
    assert entry.interrupt_mode == "message"
    kernelspec.install(entry, specdirs.Target(), path)
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    runtime.mkdir(parents=True, exist_ok=True)
    try:
        yield "shared"
    finally:
        _cleanup()


def _cleanup() -> None:
    """Stop this test's instances and end its reapers (found by their state dir, by pid)."""
    for st in app_status.list_instances():
        with contextlib.suppress(HpcKernelsError):  # its reaper may stop it first
            app_status.stop(st.name)
    for pid in reaper_pids(app_instance.root()):
        os.kill(pid, signal.SIGKILL)


def reaper_pids(d: Path) -> list[int]:
    """Pids of reapers serving instance dir ``d`` (its path is on their command line)."""
    # `python -I -S -c "...run_module('hpc_kernels.runtimes.apptainer.reaper'...)" reap DIR` (selfexec.module_argv)
    out = subprocess.run(["pgrep", "-f", f"hpc_kernels.runtimes.apptainer.reaper.* reap {d}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def only_instance() -> app_status.InstanceStatus:
    """The one instance of this test (the state root is per test)."""
    found = app_status.list_instances()
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------- async kernel helpers


class Kernel:
    """A kernel started through jupyter_client's AsyncKernelManager, as a notebook server would."""

    def __init__(self, name: str) -> None:
        from jupyter_client import AsyncKernelManager

        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        connection_file = str(runtime / f"kernel-{uuid.uuid4()}.json")
        self.km = AsyncKernelManager(kernel_name=name, connection_file=connection_file)
        self.kc: Any = None

    async def start(self) -> Kernel:
        await self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=READY_TIMEOUT)
        return self

    @property
    def pid(self) -> int:
        """The kernel's runtime process (the launcher, exec'd into ``apptainer exec``)."""
        return int(self.km.provisioner.pid)  # type: ignore[union-attr]

    async def run(self, code: str, timeout: float = 60.0) -> tuple[dict[str, Any], str]:
        """Execute ``code``; the reply content and its stdout."""
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = await self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(out)

    async def interrupt_sleep(self) -> dict[str, Any]:
        """Run ``time.sleep(30)``, interrupt it once it runs, and return the cell's reply content."""
        msg_id = self.kc.execute("import time; time.sleep(30)")
        while True:  # bounded by get_iopub_msg's timeout
            msg = await self.kc.get_iopub_msg(timeout=30)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "busy"):
                break
        await asyncio.sleep(0.3)  # inside the sleep, not before it
        await self.km.interrupt_kernel()
        while True:
            reply = await self.kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        while True:  # ipykernel 6.17 aborts a request that arrives before it is idle again
            msg = await self.kc.get_iopub_msg(timeout=30)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                break
        await asyncio.sleep(1.0)
        return dict(reply["content"])

    async def stop(self, now: bool = False) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if await self.km.is_alive():
            await self.km.shutdown_kernel(now=now)
        else:
            await self.km.cleanup_resources()


async def start_kernels(name: str, n: int) -> list[Kernel]:
    """Start ``n`` kernels at once (their launchers race for the instance)."""
    kernels = [Kernel(name) for _ in range(n)]
    results = await asyncio.gather(*(k.start() for k in kernels), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(k.stop(now=True) for k in kernels), return_exceptions=True)
        raise failed[0]
    return kernels


# ----------------------------------------------------------------------------- tests


SAME_CONTAINER = ("import os; "
                  "print(os.readlink('/proc/self/ns/pid'), os.getpid(), os.environ['HPC_KERNELS_INSTANCE'])")
DAEMON = "import subprocess; p = subprocess.Popen(['sleep', '1000'], start_new_session=True); print(p.pid)"


def test_eight_racing_kernels_share_one_instance_interrupt_and_idle_stop(
    shared_kernel: str, apptainer_bin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 concurrent launches → one instance; same container; interrupts work; idle stop."""
    async def scenario() -> None:
        kernels = await start_kernels(shared_kernel, 8)
        try:
            st = only_instance()
            assert st.state == "running" and st.kernels == 8
            assert apptainer_names(apptainer_bin) == {st.name}

            seen = []
            for k in kernels:
                reply, out = await k.run(SAME_CONTAINER)
                assert reply["status"] == "ok", reply
                seen.append(out.split())
            assert {s[0] for s in seen} == {seen[0][0]}, "all kernels are in one PID namespace"
            assert {s[2] for s in seen} == {st.name}
            # ... and each one sees the 8 kernel processes of the others in that namespace.
            pids = sorted(int(s[1]) for s in seen)
            reply, out = await kernels[-1].run(
                "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
            assert set(pids) <= set(json.loads(out)), (pids, out)

            for k in kernels:
                reply = await k.interrupt_sleep()
                assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
                reply, out = await k.run("print('next cell', 6 * 7)")
                assert reply["status"] == "ok" and "next cell 42" in out, (reply, out)
                assert await k.km.is_alive()

            listed = cli_json("instances", capsys=capsys)["instances"]
            assert [(i["name"], i["kernels"], i["idle_for"]) for i in listed] == [(st.name, 8, None)]
        finally:
            await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)

    asyncio.run(scenario())
    assert wait_for(lambda: not app_status.list_instances(), IDLE + IDLE_MARGIN), app_status.list_instances()
    assert apptainer_names(apptainer_bin) == set()
    assert app_status.instance_dirs() == []  # its state is forgotten, not left to pile up
    assert wait_for(lambda: not reaper_pids(app_instance.root()), 10)
    assert "idle for 2 s: stopped" in (app_instance.root() / "reaper.log").read_text()


def test_sigkill_of_a_launcher_group_leaves_no_kernel_process(shared_kernel: str, apptainer_bin: str) -> None:
    """SIGKILL of a kernel's process group: its processes (even a daemonised child) are reaped."""

    async def scenario() -> None:
        a, b = await start_kernels(shared_kernel, 2)
        try:
            name = only_instance().name
            # A child that leaves the kernel's process group and would outlive it in the instance.
            reply, out = await a.run(DAEMON)
            assert reply["status"] == "ok", reply
            d = app_instance.instance_dir(name)
            a_att = next(att.id for att in app_records.attachments(d) if att.pid == a.pid)
            marked = [p for p, att in app_records.marked_processes(name) if att == a_att]
            assert len(marked) >= 2, marked  # the kernel and its sleep

            os.killpg(os.getpgid(a.pid), signal.SIGKILL)
            # The reaper notices the dead runtime process and kills what carried its attachment.
            assert wait_for(lambda: all(att != a_att for _p, att in app_records.marked_processes(name)), 30), \
                app_records.marked_processes(name)
            st = only_instance()
            assert st.state == "running" and st.kernels == 1  # b keeps the instance up
            reply, out = await b.run("print('b still works')")
            assert reply["status"] == "ok" and "b still works" in out

            os.killpg(os.getpgid(b.pid), signal.SIGKILL)
            assert wait_for(lambda: not app_status.list_instances(), IDLE + IDLE_MARGIN)
            assert app_records.marked_processes(name) == []
            assert name not in apptainer_names(apptainer_bin)
        finally:
            await asyncio.gather(a.stop(now=True), b.stop(now=True), return_exceptions=True)

    asyncio.run(scenario())


def test_stop_kills_attached_kernels_and_next_launch_starts_fresh(
    shared_kernel: str, apptainer_bin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hpc-kernels stop` under running kernels kills them; a dead instance is replaced on launch."""

    async def scenario() -> None:
        kernels = await start_kernels(shared_kernel, 2)
        fresh: list[Kernel] = []
        try:
            first = only_instance()
            stopped = cli_json("stop", first.name, capsys=capsys)["stopped"]
            assert stopped == [{"name": first.name, "was_running": True, "kernels": 2}]
            for k in kernels:
                assert await _wait_dead(k, 15)
            assert app_records.marked_processes(first.name) == []
            assert first.name not in apptainer_names(apptainer_bin)
            assert cli_json("instances", capsys=capsys)["instances"] == []
            assert app_status.instance_dirs() == []

            # Next launch: a fresh instance (same name: same identity), and it works.
            fresh.append(await Kernel(shared_kernel).start())
            second = only_instance()
            assert second.name == first.name and second.pid != first.pid and second.kernels == 1
            reply, out = await fresh[0].run(SAME_CONTAINER)
            assert reply["status"] == "ok" and second.name in out

            # Killed behind our back (as a node reboot or `apptainer instance stop` would): detected.
            assert apptainer.stop_instance(apptainer_bin, second.name)
            assert await _wait_dead(fresh[0], 15)
            fresh.append(await Kernel(shared_kernel).start())
            third = only_instance()
            assert third.pid not in (first.pid, second.pid) and third.state == "running"
            reply, out = await fresh[1].run("print(1 + 1)")
            assert reply["status"] == "ok" and "2" in out
        finally:
            await asyncio.gather(*(k.stop(now=True) for k in kernels + fresh), return_exceptions=True)

    asyncio.run(scenario())


async def _wait_dead(k: Kernel, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await k.km.is_alive():
            return True
        await asyncio.sleep(0.2)
    return not await k.km.is_alive()


def test_rebuilt_image_gets_a_new_instance(make_registry: Callable[..., Path], base_sif: Path,
                                           apptainer_bin: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel started after its image was replaced does not attach to the old image's instance."""
    monkeypatch.setenv("PATH", f"{os.path.dirname(apptainer_bin)}{os.pathsep}{os.environ['PATH']}")
    image = tmp_path / "img.sif"
    os.symlink(base_sif, image)
    path = make_registry(f"""
        kernels:
          rebuilt:
            image: {image}
            mode: instance
            idle_timeout: {IDLE}
            command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
        """)
    kernelspec.install(registry.load_file(path).get("rebuilt"), specdirs.Target(), path)
    Path(os.environ["JUPYTER_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)

    async def scenario() -> None:
        started: list[Kernel] = []
        try:
            started.append(await Kernel("rebuilt").start())
            old = only_instance()
            # "Rebuild": a new file replaces the image atomically, as `hpc-kernels build` does.
            new_file = tmp_path / "img.sif.new"
            subprocess.run(["cp", "--reflink=auto", str(base_sif), str(new_file)], check=True)
            os.replace(new_file, image)
            started.append(await Kernel("rebuilt").start())
            names = {s.name for s in app_status.list_instances()}
            assert old.name in names and len(names) == 2
            for k in started:
                reply, _out = await k.run("print(1)")
                assert reply["status"] == "ok"
        finally:
            await asyncio.gather(*(k.stop(now=True) for k in started), return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        _cleanup()


def test_gc_sweeps_stale_state_orphans_untracked_instances_and_dead_kernelspecs(
    make_registry: Callable[..., Path], base_sif: Path, apptainer_bin: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hpc-kernels gc` for real: each kind of leftover is found, removed, and gone afterwards."""
    monkeypatch.setenv("PATH", f"{os.path.dirname(apptainer_bin)}{os.pathsep}{os.environ['PATH']}")
    user, host = app_instance.user_name(), paths.hostname()
    tag = uuid.uuid4().hex[:10]
    # 1. Stale state: a record whose instance process is long gone.
    owner = app_instance.owner_tag()
    stale = app_instance.Identity(user, "stale", host, "", owner, tag[:8]).name
    d = app_instance.instance_dir(stale)
    d.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = app_records.InstanceRecord(stale, "stale", str(base_sif), user, host, "", dead.pid, 1, 0.0, IDLE,
                                      apptainer_bin)
    (d / app_instance.RECORD).write_text(json.dumps(dataclasses.asdict(record)))
    # 2. An orphan: a process carrying the marker of an instance we have no record of.
    forgotten = app_instance.Identity(user, "forgotten", host, "", owner, tag[1:9]).name
    orphan = subprocess.Popen(["sleep", "300"], env={**os.environ, app_instance.ENV_INSTANCE: forgotten,
                                                     app_instance.ENV_ATTACHMENT: "1-1"})
    # 3. An instance named like ours but untracked (its state was lost).
    untracked = app_instance.Identity(user, "lost", host, "", owner, tag[2:]).name
    apptainer.start_instance([apptainer_bin, "instance", "start", str(base_sif), untracked], os.environ)
    # 4. A kernelspec of ours whose image is gone, and one whose image exists.
    path = make_registry(f"""
        kernels:
          gone:
            image: {tmp_path / 'missing.sif'}
          here:
            image: {base_sif}
        """)
    reg = registry.load_file(path)
    for entry in reg.kernels:
        kernelspec.install(entry, specdirs.Target(), path)
    try:
        dry = cli_json("gc", "--dry-run", capsys=capsys)["findings"]
        assert untracked in apptainer_names(apptainer_bin) and orphan.poll() is None and d.exists()
        real = cli_json("gc", capsys=capsys)["findings"]
        assert [(f["sweeper"], f["target"]) for f in dry] == [(f["sweeper"], f["target"]) for f in real]
        targets = {(f["sweeper"], f["target"], f["action"]) for f in real}
        assert ("instances", stale, "removed stale state") in targets
        assert ("instances", untracked, "stopped") in targets
        assert ("orphans", f"pid {orphan.pid}", "killed") in targets
        assert ("kernelspecs", "gone", "removed") in targets
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert untracked not in apptainer_names(apptainer_bin)
        assert not d.exists()
        assert set(specdirs.installed_ours()) == {"here"}
        assert cli_json("gc", capsys=capsys)["findings"] == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        if untracked in apptainer_names(apptainer_bin):
            apptainer.stop_instance(apptainer_bin, untracked, force=True)


def test_reaper_runs_detached_from_the_launcher(shared_kernel: str) -> None:
    """The reaper has its own session: jupyter_client's kill of the kernel's group cannot reach it."""

    async def scenario() -> None:
        k = await Kernel(shared_kernel).start()
        try:
            d = app_instance.instance_dir(only_instance().name)
            pids = reaper_pids(d)
            assert len(pids) == 1, pids
            assert os.getsid(pids[0]) != os.getsid(k.pid) and os.getpgid(pids[0]) != os.getpgid(k.pid)
        finally:
            await k.stop()

    asyncio.run(scenario())
