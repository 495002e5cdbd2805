"""Staging on the test bed: prebuild jobs that work where compute nodes have no internet.

The login node (this host) reaches a container registry that these tests serve on loopback (Debian's
``docker-registry``, started and stopped here, holding the test bed's Debian image: Docker Hub is not reachable)
and the package index pip is configured with. The compute node (slurmd in network namespace ``hkc``) reaches
neither. ``build --slurm`` stages the base image and the wheels here, then the job builds from them offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import slurm, slurm_records
from tests.helpers import oci_registry
from tests.helpers.kernels import run_cell, start_ready_kernel
from tests.helpers.testbed import CACHE
from tests.real.test_slurm import SMALL, cluster, kernelspec_dir  # noqa: F401 - `cluster` is a fixture

ROOTFS = Path(os.environ.get("HPCK_TEST_ROOTFS_TAR", CACHE / "rootfs.tar"))
REPOSITORY, TAG = "hpck/debian", "bookworm"
#: The same image with pip in it (a second layer), like the python:3.12-slim of defs/science.def.
WITH_PIP = "hpck/debian-pip"
COMMAND = '[python3, -m, ipykernel_launcher, -f, "{connection_file}"]'


@pytest.fixture(scope="session")
def loopback_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[oci_registry.Registry]:
    """A real registry on 127.0.0.1 (a free port) holding the test image as hpck/debian:bookworm; stopped after."""
    binary, skopeo = oci_registry.tools()
    if binary is None or skopeo is None:
        pytest.skip("docker-registry and skopeo are not installed (.ci/run installs them: apt-get install "
                    "docker-registry skopeo)")
    if not ROOTFS.is_file():
        pytest.skip(f"the test image's {ROOTFS} is missing (bash .ci/build-test-image.sh builds it)")
    root = tmp_path_factory.mktemp("registry")
    wheels = root / "pip"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "--python-version", "3.11", "--dest", str(wheels), "pip"],
                         capture_output=True, text=True, timeout=300)
    if got.returncode != 0:
        pytest.skip(f"pip cannot download from its index here: {got.stderr.strip()[-300:]}")
    pip_tar = oci_registry.pip_layer(next(wheels.glob("pip-*.whl")), root / "pip-layer.tar")
    with oci_registry.serve(root / "server", binary) as registry:
        for name, extra in ((REPOSITORY, ()), (WITH_PIP, (pip_tar,))):
            layout = oci_registry.oci_layout(ROOTFS, root / "layout", TAG, extra)
            oci_registry.push(layout, TAG, f"{registry.host}/{name}:{TAG}", skopeo)
            subprocess.run(["rm", "-rf", str(layout)], check=True)  # 250 MB we no longer need
        yield registry


def hpck(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it, with this test's environment."""
    return subprocess.run([sys.executable, "-m", "hpc_kernels", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def staging_leftovers() -> list[str]:
    """Temporaries of the staging cache (a failed staging must leave none)."""
    root = Path(os.environ["XDG_CACHE_HOME"]) / "hpc-kernels" / "staging"
    return sorted(str(p) for p in root.rglob("*") if re.search(r"\.(tmp|pull)-\d+|\.tmp$", p.name)) \
        if root.is_dir() else []


def one_line(stderr: str) -> str:
    """The error: one line, the last (progress lines of the staging come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("hpc-kernels: error:")]
    assert errors == lines[-1:] and "Traceback" not in stderr, stderr
    assert all(ln.startswith("… k: ") for ln in lines[:-1]), stderr
    return errors[0]


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.timeout(900)
def test_a_prebuild_job_builds_offline_from_a_base_and_wheels_staged_on_the_login_node(
    cluster: None, loopback_registry: oci_registry.Registry, make_registry: Any,  # noqa: F811
) -> None:
    host = loopback_registry.host
    reg = make_registry(
        f"defaults:\n  images_dir: images\n  command: {COMMAND}\n"
        "kernels:\n  offl:\n    def: offl.def\n    requirements: requirements.txt\n"
        "  sci:\n    def: sci.def\n",
        {"offl.def": f"Bootstrap: docker\nFrom: {host}/{REPOSITORY}:{TAG}\n\n"
                     "%post\n    echo built-offline > /etc/hpck-staged-marker\n",
         "requirements.txt": "attrs\n",
         # The shape of defs/science.def: its own %post installs a requirement file it copies in, with the
         # image's pip (Debian's Python is externally managed, hence --break-system-packages).
         "sci.def": f"Bootstrap: docker\nFrom: {host}/{WITH_PIP}:{TAG}\n\n%files\n"
                    "    sci-requirements.txt /build/requirements.txt\n\n%post\n"
                    "    python3 -m pip install --break-system-packages --no-cache-dir -r /build/requirements.txt\n"
                    "    rm -rf /build\n",
         "sci-requirements.txt": "six==1.15.0\nattrs\n"},  # the image has six 1.16.0
    )
    done = hpck("build", "offl", "sci", "--slurm", "--then-install", "--wait", "--json", *SMALL,
                "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    digest = loopback_registry.manifest_digest(REPOSITORY, TAG)
    # Staged here, on the login node, before the job was submitted.
    assert f"offl: staged base docker://{host}/{REPOSITORY}:{TAG}@{digest[:19]}" in done.stderr
    assert "wheel(s) for Python 3.11 (fetched base docker://" in done.stderr
    assert f"sci: staged base docker://{host}/{WITH_PIP}:{TAG}@" in done.stderr
    records = {r.kind: r for r in slurm_records.load_records()}
    script = Path(records["build"].script).read_text()
    assert f'"$kernel" --registry {reg} --offline' in script and records["build"].array is True
    assert {(r["kind"], r["state"]) for r in json.loads(done.stdout)} == {("build", "COMPLETED"),
                                                                          ("install", "COMPLETED")}

    # sci: the recipe's own `pip install -r` ran in the job, offline, from the wheels staged for that file.
    sci = json.loads((reg.parent / "images" / "sci.sif.hpck.json").read_text())
    sci_recipe = Path(sci["derived_recipe"]).read_text()
    assert "export PIP_NO_INDEX=1\n    export PIP_FIND_LINKS=/.hpck/wheels\n" in sci_recipe
    assert "six==1.15.0" in sci["packages"] and any(p.startswith("attrs==") for p in sci["packages"])

    # The job built the derived recipe: the staged SIF as its base, the wheels copied in, pip without an index.
    stamp = json.loads((reg.parent / "images" / "offl.sif.hpck.json").read_text())
    derived = Path(stamp["derived_recipe"]).read_text()
    assert "\nBootstrap: localimage\nFrom: " in derived and digest.replace(":", "-") + ".sif" in derived
    assert "export PIP_NO_INDEX=1" in derived
    assert (reg.parent / "offl.def").read_text().startswith("Bootstrap: docker\n")  # never written over
    labels = stamp["labels"]
    assert labels["org.hpc-kernels.base"] == f"docker://{host}/{REPOSITORY}:{TAG}"
    assert labels["org.hpc-kernels.base-digest"] == digest and labels["org.hpc-kernels.staged"] == "yes"
    attrs = [p for p in stamp["packages"] if p.lower().startswith("attrs==")]
    assert len(attrs) == 1, stamp["packages"]

    # The kernel starts from that image and imports the staged package.
    from jupyter_client.manager import KernelManager

    assert (kernelspec_dir("offl") / "kernel.json").is_file()
    km, kc = start_ready_kernel(lambda: KernelManager(kernel_name="offl"))
    try:
        reply, out = run_cell(kc, "import attrs; print('attrs', attrs.__version__, attrs.__file__); "
                                  "print(open('/etc/hpck-staged-marker').read().strip())")
        assert reply["status"] == "ok", reply
        assert f"attrs {attrs[0].split('==')[1]} /usr/local/lib/python3.11/dist-packages/attrs/" in out
        assert "built-offline" in out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)

    # `show` prints what the image says it holds (read from the image's own labels).
    shown = hpck("show", "offl", "--registry", str(reg), timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "; from its image labels):" in shown.stdout
    assert f"  base:                docker://{host}/{REPOSITORY}:{TAG}\n" in shown.stdout
    assert f"  base digest:         {digest}\n" in shown.stdout
    assert f"  recipe:              {reg.parent / 'offl.def'}\n" in shown.stdout
    assert "  staged:              yes\n" in shown.stdout and "  hpc-kernels:         0.1.0\n" in shown.stdout
    assert re.search(r"  packages \(\d+\): +.*\b" + re.escape(attrs[0]) + r"\b", shown.stdout)
    assert f"  build id:            {stamp['build_id']}\n" in shown.stdout


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.timeout(600)
def test_the_same_recipe_without_staging_fails_in_the_job_and_says_why(
    cluster: None, loopback_registry: oci_registry.Registry, make_registry: Any,  # noqa: F811
) -> None:
    reg = make_registry(
        "defaults:\n  images_dir: images\n  staging: never\nkernels:\n  online:\n    def: online.def\n",
        {"online.def": f"Bootstrap: docker\nFrom: {loopback_registry.host}/{REPOSITORY}:{TAG}\n\n"
                       "%post\n    true\n"},
    )
    done = hpck("build", "online", "--slurm", "--wait", *SMALL, "--registry", str(reg))
    assert done.returncode == 1
    assert "staged" not in done.stderr.split("submitted build job")[0]  # nothing staged before submitting
    # The job (on the compute node, no route to this registry) failed, and its log says what that means.
    assert "hint: this node could not reach the network" in done.stderr, done.stderr
    assert "'hpc-kernels build online --slurm' does when the registry's 'staging:' is 'auto'" in done.stderr
    assert "this kernel builds with 'staging: never'" in done.stderr
    assert not (reg.parent / "images" / "online.sif").exists()


@pytest.fixture
def shared_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One staging cache for the tests that only need a staged base (pulled once, not once per test)."""
    root = Path(str(tmp_path_factory.getbasetemp())) / "shared-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


BAD = {
    "unresolvable": ("    base: {base}\n    requirements: req.txt\n", {"req.txt": "six\nhpck-no-such-package-xyz==1.0\n"},
                     r"no job submitted: kernel 'k': {dir}/req.txt:2: pip found no wheel of "
                     r"'hpck-no-such-package-xyz==1.0' for Python 3.11 on manylinux_2_36_x86_64 \(versions with "
                     r"wheels: none\): check the name and version; packages published only as source cannot be "
                     r"staged\."),
    "missing-base": ("    def: k.def\n", {"k.def": "Bootstrap: docker\nFrom: {host}/hpck/nope:1\n"},
                     r"no job submitted: kernel 'k': {dir}/k.def:2: the image hpck/nope:1 does not exist in the "
                     r"registry {host} \(it answered: manifest unknown\): check the name and tag\."),
    "lock-for-3.12": ("    base: {base}\n    requirements: req.txt\n", {"req.txt": "six\n", "kernels.locks/k.txt":
                      "# hpc-kernels-lock: 1\n# kernel: k\n# python: 3.12\nsix==1.17.0\n"},
                      r"no job submitted: the lock {dir}/kernels.locks/k.txt was made for Python 3.12, but the base "
                      r"image of kernel 'k' has Python 3.11: build with --lock again to resolve for 3.11, or use a "
                      r"base with Python 3.12\."),
}


@pytest.mark.apptainer
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_sentence_at_staging_time_and_nothing_is_written(
    case: str, base_sif: Path, loopback_registry: oci_registry.Registry, make_registry: Any,
    shared_cache: Path,
) -> None:
    body, files, pattern = BAD[case]
    host = loopback_registry.host
    reg = make_registry(f"defaults:\n  images_dir: images\n  command: {COMMAND}\nkernels:\n  k:\n"
                        + body.format(base=base_sif),
                        {name: text.format(host=host) for name, text in files.items()})
    before = {p: p.read_bytes() for p in reg.parent.rglob("*") if p.is_file()}
    done = hpck("build", "k", "--slurm", "--registry", str(reg), timeout=300)
    assert done.returncode == 1
    message = one_line(done.stderr)
    assert re.fullmatch("hpc-kernels: error: " + pattern.format(dir=re.escape(str(reg.parent)),
                                                                host=re.escape(host)), message), message
    # Nothing was submitted, and nothing written: no job record, no image, no lock, no half-staged cache entry.
    assert slurm_records.load_records() == [] and not slurm.jobs_dir().exists()
    assert {p: p.read_bytes() for p in reg.parent.rglob("*") if p.is_file()} == before
    assert staging_leftovers() == []


@pytest.mark.apptainer
@pytest.mark.timeout(900)
def test_a_lock_pins_the_versions_of_every_later_build(
    loopback_registry: oci_registry.Registry, make_registry: Any,
) -> None:
    host = loopback_registry.host
    reg = make_registry(
        f"defaults:\n  images_dir: images\n  command: {COMMAND}\n"
        f"kernels:\n  ana:\n    base: {host}/{REPOSITORY}:{TAG}\n    requirements: req.txt\n    staging: always\n",
        {"req.txt": "attrs\n"},
    )

    def packages() -> list[str]:
        shown = hpck("show", "ana", "--json", "--registry", str(reg), timeout=120)
        assert shown.returncode == 0, shown.stderr
        image = json.loads(shown.stdout)["image"]
        assert image["source"] == "image labels"
        return list(image["packages"])

    # A kernel from a requirement file, no recipe: staged (the base from the registry, attrs from the index).
    done = hpck("build", "ana", "--lock", "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    lock = reg.parent / "kernels.locks" / "ana.txt"
    text = lock.read_text()
    newest = re.search(r"^attrs==(\S+) \\\n    --hash=sha256:[0-9a-f]{64}$", text, re.M)
    assert newest is not None, text
    assert "# python: 3.11\n" in text and f"# base-digest: {loopback_registry.manifest_digest(REPOSITORY, TAG)}" in text
    assert f"attrs=={newest.group(1)}" in packages()

    # Next year: the lock (here pinned to an older attrs) decides, not the newest release on the index.
    lock.write_text(text.replace(newest.group(0), "attrs==23.1.0"))
    done = hpck("build", "ana", "--registry", str(reg))
    assert done.returncode == 0 and "ana: built " in done.stderr, done.stderr
    first = packages()
    assert "attrs==23.1.0" in first and f"attrs=={newest.group(1)}" not in first
    # A rebuild from the lock installs the very same versions.
    done = hpck("build", "ana", "--force", "--registry", str(reg))
    assert done.returncode == 0, done.stderr
    assert packages() == first
