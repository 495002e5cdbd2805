"""Job kernels without a cluster: the registry's ``job:``, the kernelspec's display name and launch spec, the
job script, the relay and the agent's proof of the key (tests/real/test_job_kernels.py runs them on Slurm)."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import kernelspec, registry
from hpc_kernels.errors import HpcKernelsError, RegistryError
from hpc_kernels.launchspec import KernelSpecError, from_json
from hpc_kernels.model import JobRequest, LaunchSpec, human_time
from hpc_kernels.runtimes.job import script as job_script
from hpc_kernels.runtimes.job import session as job_session
from hpc_kernels.runtimes.job import sweep as job_sweep
from hpc_kernels.runtimes.job import wire as job_wire

DEF = {"a.def": "Bootstrap: localimage\nFrom: base.sif\n"}


def load(make_registry: Any, text: str) -> registry.Registry:
    return registry.load_file(make_registry(text, DEF))


def problems(make_registry: Any, text: str) -> list[str]:
    with pytest.raises(RegistryError) as info:
        load(make_registry, text)
    return [re.sub(r"^.*kernels\.yaml:", "", p) for p in info.value.problems]


# ----------------------------------------------------------------------------- the registry


def test_job_block_with_precedence_over_slurm_and_builtin_defaults(make_registry: Any) -> None:
    reg = load(make_registry, """\
        defaults:
          slurm: {account: def-lab, partition: cpu, time: "3:00:00", mem: 8G}
        kernels:
          torch-gpu:
            def: a.def
            job:
              gpus: 1
              time: "2:00:00"
              mem: 32G
              account: def-someprof
          small:
            def: a.def
            slurm: {partition: short}
            job: {}
          plain:
            def: a.def
        """)
    gpu, small, plain = reg.kernels
    assert gpu.job == JobRequest(time="2:00:00", mem="32G", cpus=1, gpus="1", account="def-someprof",
                                 partition="cpu")
    # Only account and partition come from slurm: (a build job's time and memory are not a kernel's).
    assert small.job == JobRequest(time="1:00:00", mem="4G", cpus=1, gpus="", account="def-lab",
                                   partition="short")
    assert plain.job is None


def test_bad_job_settings_name_file_and_line(make_registry: Any) -> None:
    found = problems(make_registry, """\
        kernels:
          a:
            def: a.def
            job:
              gpu: 1
              time: 2 hours
              mem: lots
              cpus: 0
              gpus: many
              account: "def lab"
              extra_args: ["--qos=debug", "--gres=gpu:2", "-J", "x"]
          b:
            def: a.def
            job:
          c:
            def: a.def
            runtime: docker
            job: {time: 10}
        """)
    assert found == [
        "5: unknown key 'gpu' in the job settings of kernel 'a' (did you mean 'gpus'?).",
        "6: 'job: time' in kernel 'a' must be minutes or [D-]HH:MM:SS, e.g. 60, \"1:00:00\" or \"1-00:00:00\", "
        "not '2 hours'.",
        "7: 'job: mem' in kernel 'a' must be a size like \"4G\", \"500M\" or 4000 (megabytes), not 'lots'.",
        "8: 'job: cpus' in kernel 'a' must be a whole number of CPUs (>= 1), not 0.",
        "9: 'job: gpus' in kernel 'a' must be a number of GPUs (e.g. 1) or type:count (e.g. \"h100:1\"), "
        "not 'many'.",
        "10: 'job: account' in kernel 'a' must be a name without spaces, quotes, backslashes, '#' or control "
        "characters, not 'def lab'.",
        "11: 'job: extra_args' in kernel 'a' cannot set --gres: use the 'gpus' key.",
        "11: 'job: extra_args' in kernel 'a' cannot set -J: hpc-kernels names the job.",
        "14: 'job' in kernel 'b' is empty: write 'job: {}' for the default resources (1 CPU, 4G, 1:00:00), or "
        "give its keys (gpus, time, mem, cpus, account, partition, extra_args).",
        "18: kernel 'c' cannot run in a Slurm job of its own: 'job' needs runtime apptainer and mode exec "
        "(it has docker, exec).",
    ]


# ----------------------------------------------------------------------------- the kernelspec


def test_display_name_shows_the_resources_and_the_spec_carries_them(make_registry: Any, tmp_path: Path) -> None:
    reg = load(make_registry, """\
        kernels:
          torch-gpu:
            def: a.def
            display_name: PyTorch
            job: {gpus: "h100:2", cpus: 8, time: "1-12:00:00", mem: 64G, partition: gpu}
          one:
            def: a.def
            job: {gpus: 1, time: 90}
        """)
    torch, one = reg.kernels
    assert kernelspec.display_name(torch) == "PyTorch [job: 2 h100 GPUs, 8 CPUs, 64G, 1 d 12 h]"
    assert kernelspec.display_name(one) == "Python (one) [job: 1 GPU, 4G, 1 h 30 min]"
    data = kernelspec.kernel_json(torch, tmp_path / "kernel.json")
    assert data["display_name"] == "PyTorch [job: 2 h100 GPUs, 8 CPUs, 64G, 1 d 12 h]"
    spec = from_json(json.loads(json.dumps(data["metadata"]["hpc_kernels"])))
    assert spec.job == torch.job


@pytest.mark.parametrize(("value", "shown"), [("2:00:00", "2 h"), ("30", "30 min"), ("90", "1 h 30 min"),
                                               ("1-00:00:00", "1 d"), ("0:45:00", "45 min"), ("soon", "soon")])
def test_human_time(value: str, shown: str) -> None:
    assert human_time(value) == shown


@pytest.mark.parametrize("job", [{"time": "1 h"}, {"cpus": 0}, {"gpus": "x"}, {"extra_args": ["--a b"]},
                                 {"nodes": 2}, {"account": "a\nb"}, "1 GPU"])
def test_a_damaged_job_in_kernel_json_is_one_sentence(job: Any) -> None:
    data = LaunchSpec("k", "apptainer", "exec", "/i.sif", ("python", "{connection_file}")).to_json()
    data["job"] = job
    with pytest.raises(KernelSpecError, match=r"^'job' must be null or an object with the keys gpus, time, "
                                              r"mem, cpus, account, partition, extra_args holding Slurm values, "
                                              r"not .*; reinstall with 'hpc-kernels install k'\.$"):
        from_json(data)


# ----------------------------------------------------------------------------- the job script


def test_job_script_has_the_resources_and_runs_the_agent(tmp_path: Path) -> None:
    job = JobRequest(time="2:00:00", mem="32G", cpus=4, gpus="h100:1", account="def-prof", partition="gpu",
                     extra_args=("--qos=normal",))
    spec = LaunchSpec("torch", "apptainer", "exec", "/i.sif", ("python", "{connection_file}"), job=job)
    script, args = job_script.sbatch_plan(spec, "0123456789abcdef", tmp_path / "my session.json")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "Generated by hpc-kernels" in lines[1]
    for line in ("#SBATCH --job-name=hpck-kernel-torch-01234567", "#SBATCH --time=2:00:00", "#SBATCH --mem=32G",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --signal=B:USR1@60", "#SBATCH --account=def-prof",
                 "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=h100:1"):
        assert line in lines
    assert lines[-1].startswith("exec ") and lines[-1].endswith(f"/job/agent.py '{tmp_path}/my session.json'")
    assert args == ["--qos=normal"]


def test_job_script_refuses_a_value_sbatch_would_misread(tmp_path: Path) -> None:
    spec = LaunchSpec("k", "apptainer", "exec", "/i.sif", ("python", "{connection_file}"),
                      job=JobRequest(account="a b"))
    with pytest.raises(HpcKernelsError, match="cannot be written on an #SBATCH line"):
        job_script.sbatch_plan(spec, "0" * 16, tmp_path / "s.json")


def test_sbatch_rejections_name_the_job_key_to_fix() -> None:
    from hpc_kernels.adapters.slurm import JOB_HINTS, rejection_sentence

    said = "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: x"
    assert rejection_sentence(said, JOB_HINTS) == (
        "sbatch rejected the job: invalid partition specified: nope (set job: partition to one that "
        "'sinfo -s' lists, or leave it out).")
    said = "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    assert rejection_sentence(said, JOB_HINTS).endswith("(ask for less with the kernel's job: cpus and job: mem).")
    said = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination"
    assert rejection_sentence(said, JOB_HINTS).endswith(
        "(set job: account (or slurm: account) to one of yours, e.g. def-yourpi).")


# ----------------------------------------------------------------------------- the connection file


def test_connection_file_checks(tmp_path: Path) -> None:
    base = {"ip": "127.0.0.1", "key": "k", "transport": "tcp", "signature_scheme": "hmac-sha256",
            **{f"{c}_port": 5000 + i for i, c in enumerate(job_wire.CHANNELS)}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base))
    conn = job_session.read_connection(str(path))
    assert conn.ports == {"shell": 5000, "iopub": 5001, "stdin": 5002, "control": 5003, "hb": 5004}
    assert conn.extra == {}
    for change, message in (({"key": ""}, "a job kernel needs a signed connection"),
                            ({"transport": "ipc"}, "a job kernel needs the tcp transport"),
                            ({"hb_port": "x"}, "has no valid hb_port")):
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(HpcKernelsError, match=message):
            job_session.read_connection(str(path))


def test_session_id_is_stable_per_kernel_and_key() -> None:
    assert job_session.session_id("a", "key1") == job_session.session_id("a", "key1")
    assert len({job_session.session_id("a", "key1"), job_session.session_id("a", "key2"),
                job_session.session_id("b", "key1")}) == 3


def test_the_agent_accepts_only_a_proof_of_the_key() -> None:
    answer = job_wire.proof(b"secret", "nonce")
    assert job_wire.proof_ok(b"secret", "nonce", answer)
    assert not job_wire.proof_ok(b"other", "nonce", answer)
    assert not job_wire.proof_ok(b"secret", "other nonce", answer)
    assert not job_wire.proof_ok(b"secret", "nonce", None)


# ----------------------------------------------------------------------------- the relay


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Echo:
    """A backend that echoes every byte, on a loopback port."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_relay_holds_early_connections_then_forwards_bytes_both_ways() -> None:
    loop = job_wire.Loop()
    ports = {c: free_port() for c in job_wire.CHANNELS}
    relay = job_wire.Relay(loop, "127.0.0.1", ports)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    echo = Echo()
    try:
        early = socket.create_connection(("127.0.0.1", ports["shell"]), timeout=5)
        early.sendall(b"greeting sent while the job is queued")
        loop.call_later(0.3, lambda: relay.point_at({c: ("127.0.0.1", echo.port) for c in job_wire.CHANNELS}))
        assert recv_exactly(early, 37) == b"greeting sent while the job is queued"
        late = socket.create_connection(("127.0.0.1", ports["hb"]), timeout=5)
        payload = bytes(range(256)) * 4096  # 1 MiB: larger than one recv, exercises the buffers
        threading.Thread(target=late.sendall, args=(payload,), daemon=True).start()
        assert recv_exactly(late, len(payload)) == payload
        # Pointing at another kernel (a restart) closes connections to the old one: ZMQ reconnects.
        loop.call_later(0, lambda: relay.point_at(None))
        late.settimeout(5)
        assert late.recv(10) == b""
    finally:
        loop.call_later(0, loop.stop)
        thread.join(5)
        relay.close()
        echo.sock.close()
    # Every listening port is released (a relay can bind them again at once, as a restart's does).
    for port in ports.values():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_relay_refuses_a_port_that_is_taken() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    ports = {c: free_port() for c in job_wire.CHANNELS}
    ports["control"] = taken.getsockname()[1]
    with pytest.raises(OSError):
        job_wire.Relay(job_wire.Loop(), "127.0.0.1", ports)
    taken.close()
    for channel, port in ports.items():  # the ones it had bound are released again
        if channel != "control":
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))


def test_gc_without_job_kernels_asks_slurm_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels.adapters import slurm

    def boom(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("Slurm was asked")

    monkeypatch.setattr(slurm.Slurm, "named", boom)
    assert job_sweep.sweep(dry_run=True) == []


def test_show_prints_a_job_kernels_script_and_install_names_its_resources(
    make_registry: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    from hpc_kernels import cli

    reg = make_registry("kernels:\n  gpu:\n    image: /nonexistent/gpu.sif\n"
                        "    job: {gpus: 1, time: \"2:00:00\", mem: 32G, account: def-prof}\n")
    assert cli.main(["show", "gpu", "--json", "--registry", str(reg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kernel_json"]["display_name"] == "Python (gpu) [job: 1 GPU, 32G, 2 h]"
    script = shown["job_script"]
    assert script.startswith("# submitted with: sbatch --parsable\n#!/bin/bash\n")
    assert "#SBATCH --account=def-prof\n" in script and "#SBATCH --gpus-per-node=1\n" in script
    assert "#SBATCH --job-name=hpck-kernel-gpu-<sid>\n" in script
    assert cli.main(["install", "gpu", "--registry", str(reg)]) == 0
    assert "installed kernelspec 'gpu' (Python (gpu) [job: 1 GPU, 32G, 2 h])" in " ".join(
        capsys.readouterr().err.split())
