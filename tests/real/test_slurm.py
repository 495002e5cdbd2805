"""``build --slurm`` and ``jobs`` on a real single-node Slurm (``.ci/lmod-slurm-setup.sh``) with real
Apptainer builds inside the jobs. Every wait is bounded: the CLI runs under a subprocess timeout,
and any job of ours still queued at the end of a test is cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import slurm_records

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
#: Small jobs: the CI node has 2 CPUs, and a 3-task array should run 2 tasks at once.
SMALL = ["--time", "10", "--cpus", "1", "--mem", "2G"]
JOB_TIMEOUT = 240


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, apptainer_bin: str) -> Iterator[None]:
    """A Slurm controller that answers, apptainer first on PATH; cancels our leftover jobs after."""
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (bash .ci/lmod-slurm-setup.sh installs and starts it)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        said = ping.stdout.strip() or ping.stderr.strip()
        pytest.skip(f"slurmctld does not answer (scontrol ping: {said})")
    monkeypatch.setenv("PATH", f"{Path(apptainer_bin).parent}{os.pathsep}{os.environ['PATH']}")
    yield
    ids = [r.job_id for r in slurm_records.load_records()]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def hpck(*args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (as a user would) with this test's environment."""
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def kernelspec_dir(name: str) -> Path:
    return Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / name


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.lmod
def test_prebuild_job_builds_image_then_installs_and_kernel_starts(
    cluster: None, base_sif: Path, make_registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not LMOD_INIT.is_file():
        pytest.skip("Lmod is not installed (bash .ci/lmod-slurm-setup.sh installs it)")
    # A DRAC-like 'apptainer' module: loading it sets APPTAINER_BIND, which breaks a build's %post
    # (the bind source does not exist) unless the job clears it as DRAC advises.
    modules = tmp_path / "modules" / "apptainer"
    modules.mkdir(parents=True)
    (modules / "1.4.lua").write_text('setenv("APPTAINER_BIND", "/nonexistent-hpck-bind")\n')
    monkeypatch.setenv("MODULEPATH", str(modules.parent))
    reg = make_registry(
        """\
        defaults:
          images_dir: images
          compression: lz4
          command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
        kernels:
          sci:
            def: sci.def
        """,
        {"sci.def": f"""\
            Bootstrap: localimage
            From: {base_sif}
            %post
                echo built-in-a-slurm-job > /etc/hpck-slurm-marker
            """},
    )
    done = hpck("build", "sci", "--slurm", "--then-install", "--wait", "--json", *SMALL,
                "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    rows = {r["kind"]: r for r in json.loads(done.stdout)}
    assert rows["build"]["state"] == "COMPLETED" and rows["install"]["state"] == "COMPLETED"
    assert "submitted build job" in done.stderr and "log: " in done.stderr
    image = reg.parent / "images" / "sci.sif"
    assert image.is_file() and (reg.parent / "images" / "sci.sif.hpck.json").is_file()
    build_log = Path(rows["build"]["log"]).read_text()
    assert "hpc-kernels: loaded module apptainer" in build_log and "built " in build_log
    # The install job ran only after the build job succeeded (afterok).
    records = {r.kind: r for r in slurm_records.load_records()}
    assert records["install"].depends_on == records["build"].job_id
    assert f"--dependency=afterok:{records['build'].job_id}" in records["install"].sbatch_args
    assert (kernelspec_dir("sci") / "kernel.json").is_file()

    # The kernel starts from the image the job built.
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="sci")
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=90)
            seen: list[str] = []
            reply = kc.execute_interactive(
                "print(open('/etc/hpck-slurm-marker').read().strip())", timeout=60,
                output_hook=lambda m: seen.append(m["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok"
            assert "built-in-a-slurm-job" in "".join(seen)
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=False)


@pytest.mark.slurm
@pytest.mark.apptainer
def test_three_kernels_build_in_one_job_array(cluster: None, make_registry: Any) -> None:
    files = {}
    for name in ("k1", "k2", "k3"):
        files[f"{name}.txt"] = f"payload of {name}\n"
        files[f"{name}.def"] = f"Bootstrap: scratch\n%files\n    {name}.txt /payload.txt\n"
    reg = make_registry(
        "defaults:\n  images_dir: images\nkernels:\n"
        + "".join(f"  {n}:\n    def: {n}.def\n" for n in ("k1", "k2", "k3")),
        files,
    )
    # Payload-only images, not kernels: --no-check (it travels into the job) lets them be built.
    done = hpck("build", "k1", "k2", "k3", "--slurm", "--no-check", "--wait", "--json", *SMALL,
                "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    (record,) = slurm_records.load_records()
    job = record.job_id
    assert record.array is True
    assert [t.task_id for t in record.tasks] == [f"{job}_0", f"{job}_1", f"{job}_2"]
    assert "submitted build job array" in done.stderr
    for name in ("k1", "k2", "k3"):
        assert (reg.parent / "images" / f"{name}.sif").is_file()
    listed = hpck("jobs", "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    states = {r["task_id"]: (r["kernel"], r["state"]) for r in json.loads(listed.stdout)}
    assert states == {f"{job}_0": ("k1", "COMPLETED"), f"{job}_1": ("k2", "COMPLETED"),
                      f"{job}_2": ("k3", "COMPLETED")}
    # Incremental: up-to-date images get no job at all.
    again = hpck("build", "k1", "k2", "k3", "--slurm", "--json", *SMALL, "--registry", str(reg), timeout=60)
    assert again.returncode == 0 and json.loads(again.stdout) == []
    assert again.stderr.count("up to date") == 3 and len(slurm_records.load_records()) == 1


@pytest.mark.slurm
@pytest.mark.apptainer
def test_failing_recipe_fails_the_job_and_jobs_shows_the_log_tail(cluster: None, make_registry: Any,
                                                                  base_sif: Path) -> None:
    # (A recipe whose own inputs are missing is refused before any job is submitted: test_build.py.)
    reg = make_registry(
        "kernels:\n  broken:\n    def: broken.def\n    image: images/broken.sif\n",
        {"broken.def": f"Bootstrap: localimage\nFrom: {base_sif}\n%post\n    echo cannot-build-this-kernel\n    exit 3\n"},
    )
    done = hpck("build", "broken", "--slurm", "--then-install", "--wait", *SMALL, "--registry", str(reg))
    assert done.returncode == 1
    assert "hpc-kernels: error: 2 of 2 job(s) did not succeed (job " in done.stderr
    assert ", build of broken: FAILED); see 'hpc-kernels jobs'." in done.stderr
    assert "Traceback" not in done.stderr
    assert not (reg.parent / "images" / "broken.sif").exists()
    assert not kernelspec_dir("broken").exists()  # afterok: the install job never ran

    listed = hpck("jobs", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "FAILED" in listed.stdout and "CANCELLED" in listed.stdout
    assert "last lines of" in listed.stdout
    assert "cannot-build-this-kernel" in listed.stdout  # the build's own output, from the job log
    rows = {r["kind"]: r for r in json.loads(hpck("jobs", "--json", timeout=60).stdout)}
    assert rows["build"]["state"] == "FAILED" and rows["build"]["exit_code"] == "1"
    assert "cannot-build-this-kernel" in rows["build"]["log_tail"]
    assert rows["install"]["state"] == "CANCELLED"


@pytest.mark.slurm
def test_bad_time_is_one_clear_sentence(cluster: None, make_registry: Any) -> None:
    reg = make_registry("kernels:\n  one:\n    def: one.def\n", {"one.def": "Bootstrap: scratch\n"})
    # A --time that is not one of Slurm's formats is refused before sbatch sees it (the registry's rule).
    done = hpck("build", "one", "--slurm", "--time", "soon", "--registry", str(reg), timeout=60)
    assert done.returncode == 2
    assert done.stderr.endswith(
        "hpc-kernels: error: --time must be minutes or [D-]HH:MM:SS, e.g. 60, \"1:00:00\" or \"1-00:00:00\", "
        "not 'soon'.\n"
    )
    # What only sbatch knows (a partition this cluster does not have) is its sentence, with the fix.
    done = hpck("build", "one", "--slurm", "--partition", "nope", "--registry", str(reg), timeout=60)
    assert done.returncode == 1
    assert done.stderr == (
        "hpc-kernels: error: sbatch rejected the job: invalid partition specified: nope "
        "(list the partitions with 'sinfo -s', or drop --partition).\n"
    )
    assert slurm_records.load_records() == []


def scontrol_fields(job: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (first value of each key)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         timeout=30).stdout
    fields: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


@pytest.mark.slurm
def test_registry_settings_reach_the_job_and_wait_timeout_gives_up(
    cluster: None, make_registry: Any,
) -> None:
    """The registry's slurm: settings are the job's resources; --wait-timeout gives up on a job that is
    still going (here: its build waits for the image lock this test holds), which keeps running."""
    from hpc_kernels.build.orchestrator import lock_path
    from hpc_kernels.locks import cluster_lock

    reg = make_registry(
        """\
        defaults:
          images_dir: images
          slurm: {time: "0:07:00", mem: 300M, modules: []}
        kernels:
          held:
            def: held.def
            slurm: {cpus: 1, extra_args: ["--comment=hpck-registry-settings"]}
        """,
        {"held.def": "Bootstrap: scratch\n"},
    )
    images = reg.parent / "images"
    images.mkdir()
    job = ""
    with cluster_lock(lock_path(images / "held.sif")):
        try:
            done = hpck("build", "held", "--slurm", "--wait-timeout", "3", "--registry", str(reg), timeout=120)
            (record,) = slurm_records.load_records()
            job = record.job_id
            assert done.returncode == 1, done.stderr
            assert f"hpc-kernels: error: gave up waiting after 3 s; still not finished: {job} (build of held: " \
                in done.stderr
            assert f"The job(s) keep running (see 'hpc-kernels jobs'; cancel with 'scancel {job}')." \
                in done.stderr.replace("\n", " ")
            assert "Traceback" not in done.stderr
            # The job outlives the CLI that gave up on it, with the registry's resources.
            fields = scontrol_fields(job)
            assert fields["JobState"] in ("PENDING", "RUNNING"), fields
            assert fields["TimeLimit"] == "00:07:00" and fields["NumCPUs"] == "1"
            assert fields["MinMemoryNode"] == "300M" and fields["Comment"] == "hpck-registry-settings"
            assert dict(record.options) == {"time": "0:07:00", "mem": "300M", "cpus": 1, "account": None,
                                         "partition": None, "modules": [], "extra_args":
                                         ["--comment=hpck-registry-settings"]}
        finally:
            if job:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)
    listed = json.loads(hpck("jobs", "--json", timeout=60).stdout)
    assert [r["task_id"] for r in listed] == [job]


@pytest.mark.slurm
def test_registry_module_that_does_not_load_fails_the_job(cluster: None, make_registry: Any) -> None:
    reg = make_registry(
        "kernels:\n  mod:\n    def: mod.def\n    image: images/mod.sif\n"
        "    slurm: {time: 5, cpus: 1, mem: 300M, modules: [hpck-no-such-module]}\n",
        {"mod.def": "Bootstrap: scratch\n"},
    )
    done = hpck("build", "mod", "--slurm", "--wait", "--wait-timeout", "120", "--registry", str(reg))
    assert done.returncode == 1, done.stderr
    assert ", build of mod: FAILED); see 'hpc-kernels jobs'." in done.stderr
    assert "hpc-kernels: error: cannot load module 'hpck-no-such-module' (listed in the registry's slurm: " \
        "modules)" in done.stderr
    assert "building kernel" not in done.stderr  # the build never started
