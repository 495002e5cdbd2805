"""The generated module under the real Lmod: `module use` + `module load container-kernels` lists our
kernels to a real jupyter_client and a real Jupyter server, a kernel started from that environment runs
in Apptainer, `module unload` restores the environment, and the Apptainer-module dependency works.

Module commands go through tests/helpers/lmod.py (``$LMOD_CMD python ...``, parsed and applied to
a dict): each test holds a shell-like environment and runs real programs in it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from hpc_kernels import cli
from tests.helpers import lmod

pytestmark = pytest.mark.lmod

REGISTRY = """\
kernels:
  demo:
    display_name: Demo (container)
    image: {image}
    command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
"""
#: Variables copied into the module shell from the test's isolated environment (never the real home).
KEEP = ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "JUPYTER_DATA_DIR",
        "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "PYDEVD_DISABLE_FILE_VALIDATION")


class Shell:
    """A login-shell-like environment that module commands change, as ``module`` would in bash."""

    def __init__(self, tool: lmod.Lmod, **extra: str) -> None:
        self.tool = tool
        # No apptainer on this PATH: only a (fake) site module provides one.
        self.env = {k: os.environ[k] for k in KEEP if k in os.environ}
        self.env.update(PATH="/usr/bin:/bin", MODULEPATH="", LANG="C.UTF-8")
        self.env.update(extra)

    def module(self, *args: str) -> str:
        """Run ``module ARGS``; fail the test on an Lmod error; return Lmod's messages."""
        result = self.tool.evaluate(args, self.env)
        assert result.ok, f"module {' '.join(args)} failed: {result.messages}"
        self.env = result.apply(self.env)
        return result.messages

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a program in this environment."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def kernelspecs(self) -> dict[str, Any]:
        """``jupyter kernelspec list --json`` (the real jupyter_client app) in this environment."""
        done = self.run([sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"])
        assert done.returncode == 0, done.stderr
        specs: dict[str, Any] = json.loads(done.stdout)["kernelspecs"]
        return specs


@pytest.fixture
def make_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Path]:
    """``hpc-kernels module install demo`` into a group directory <grp>/{modulefiles,share/jupyter,bin}."""

    def make(image: str = "/nonexistent/demo.sif", *extra: str) -> Path:
        grp = tmp_path / "grp"
        grp.mkdir(exist_ok=True)
        (grp / "kernels.yaml").write_text(REGISTRY.format(image=image))
        rc = cli.main(["module", "install", "demo", "--registry", str(grp / "kernels.yaml"),
                       "--dir", str(grp / "modulefiles"), "--prefix", str(grp), "--json", *extra])
        assert rc == 0, capsys.readouterr().err
        capsys.readouterr()
        return grp

    return make


def fake_site_module(root: Path, name: str, body: str) -> Path:
    """A site module tree holding ``name`` (e.g. ``apptainer/1.4.5``); returns the tree."""
    path = root / f"{name}.lua"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return root


def test_load_lists_kernels_and_unload_restores_exactly(lmod_tool: lmod.Lmod, make_group: Callable[..., Path]
                                                       ) -> None:
    grp = make_group()
    sh = Shell(lmod_tool, JUPYTER_PATH="/opt/site/jupyter")
    sh.module("use", str(grp / "modulefiles"))
    before = dict(sh.env)
    assert "demo" not in sh.kernelspecs()

    sh.module("load", "container-kernels")
    assert sh.env["JUPYTER_PATH"] == f"{grp}/share/jupyter:/opt/site/jupyter"
    assert sh.env["PATH"] == f"{grp}/bin:/usr/bin:/bin"
    assert sh.env["HPC_KERNELS_REGISTRY"] == f"{grp}/kernels.yaml"
    spec = sh.kernelspecs()["demo"]
    assert spec["resource_dir"] == f"{grp}/share/jupyter/kernels/demo"
    assert spec["spec"]["display_name"] == "Demo (container)"
    # The hpc-kernels on PATH is our wrapper, and it finds the registry the module set.
    listed = sh.run(["hpc-kernels", "list", "--json"])
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["registry"] == f"{grp}/kernels.yaml" and data["found_via"] == "$HPC_KERNELS_REGISTRY"
    assert [(k["kernel"], k["installed"]) for k in data["kernels"]] == [("demo", spec["resource_dir"])]

    sh.module("unload", "container-kernels")
    for var in ("PATH", "JUPYTER_PATH", "HPC_KERNELS_REGISTRY", "LOADEDMODULES"):
        assert sh.env.get(var) == before.get(var), var
    assert "demo" not in sh.kernelspecs()


def test_module_function_in_a_real_bash(lmod_tool: lmod.Lmod, make_group: Callable[..., Path]) -> None:
    """The same through Lmod's own shell function (init/bash), as a user's terminal does it."""
    grp = make_group()
    script = f"""
set -eu
source {lmod_tool.init_bash}
before="$PATH|${{JUPYTER_PATH-unset}}"
module use {grp}/modulefiles
module load container-kernels
{sys.executable} -m jupyter_client.kernelspecapp list | grep -q "demo *{grp}/share/jupyter/kernels/demo"
command -v hpc-kernels
module unload container-kernels
test "$PATH|${{JUPYTER_PATH-unset}}" = "$before" && echo restored
"""
    env = {k: os.environ[k] for k in KEEP if k in os.environ}
    env.update(PATH="/usr/bin:/bin", LANG="C.UTF-8")
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"{grp}/bin/hpc-kernels", "restored"]


def test_unload_restores_the_users_own_registry(lmod_tool: lmod.Lmod, make_group: Callable[..., Path]) -> None:
    """A user with their own HPC_KERNELS_REGISTRY gets it back on unload (pushenv), not an unset variable."""
    grp = make_group()
    sh = Shell(lmod_tool, HPC_KERNELS_REGISTRY="/home/me/my-kernels.yaml")
    sh.module("use", str(grp / "modulefiles"))
    sh.module("load", "container-kernels")
    assert sh.env["HPC_KERNELS_REGISTRY"] == f"{grp}/kernels.yaml"
    sh.module("unload", "container-kernels")
    assert sh.env.get("HPC_KERNELS_REGISTRY") == "/home/me/my-kernels.yaml"


def test_generated_tree_passes_check_module_tree_syntax(lmod_tool: lmod.Lmod, make_group: Callable[..., Path],
                                                        tmp_path: Path) -> None:
    grp = make_group()
    assert lmod_tool.check_tree(grp / "modulefiles") == []
    assert lmod_tool.check_tree(Path(__file__).resolve().parents[2] / "modulefiles") == []  # the example
    # The checker does find errors (so the empty list above means something).
    broken = fake_site_module(tmp_path / "broken", "bad/1.0", 'setenv("A",\n')
    problems = lmod_tool.check_tree(broken)
    assert any("bad/1.0" in p for p in problems), problems


def test_group_tree_reached_through_another_path(lmod_tool: lmod.Lmod, make_group: Callable[..., Path],
                                                 tmp_path: Path) -> None:
    grp = make_group()
    alias = tmp_path / "project-link"  # like DRAC's /project/def-pi -> /lustre0X/project/NNN
    alias.symlink_to(grp)
    sh = Shell(lmod_tool)
    sh.module("use", str(alias / "modulefiles"))
    sh.module("load", "container-kernels")
    assert sh.env["JUPYTER_PATH"] == f"{alias}/share/jupyter"
    assert sh.env["HPC_KERNELS_REGISTRY"] == f"{alias}/kernels.yaml"
    assert sh.kernelspecs()["demo"]["resource_dir"] == f"{alias}/share/jupyter/kernels/demo"


def test_site_apptainer_module_is_loaded_and_released(lmod_tool: lmod.Lmod, make_group: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    grp = make_group("/nonexistent/demo.sif", "--apptainer-module", "apptainer-ce")
    site = fake_site_module(tmp_path / "site", "apptainer-ce/1.4.5", 'setenv("FAKE_APPTAINER", "1.4.5")\n')
    sh = Shell(lmod_tool)
    sh.module("use", str(site))
    sh.module("use", str(grp / "modulefiles"))
    before = dict(sh.env)
    messages = sh.module("load", "container-kernels")
    assert "no 'apptainer-ce' module" not in messages
    assert sh.env["FAKE_APPTAINER"] == "1.4.5"
    assert sh.env["LOADEDMODULES"].split(":") == ["apptainer-ce/1.4.5", "container-kernels/0.1.0"]
    sh.module("unload", "container-kernels")
    assert "FAKE_APPTAINER" not in sh.env and sh.env.get("LOADEDMODULES") == before.get("LOADEDMODULES")
    # Loaded by the user first: it stays when our module goes.
    sh.module("load", "apptainer-ce", "container-kernels")
    sh.module("unload", "container-kernels")
    assert sh.env["LOADEDMODULES"] == "apptainer-ce/1.4.5"


def test_missing_apptainer_module_loads_with_a_clear_message(lmod_tool: lmod.Lmod,
                                                              make_group: Callable[..., Path],
                                                              tmp_path: Path) -> None:
    grp = make_group()
    empty = tmp_path / "empty-bin"  # a PATH surely without apptainer (even where /usr/bin has one)
    empty.mkdir()
    sh = Shell(lmod_tool, PATH=str(empty))
    sh.module("use", str(grp / "modulefiles"))
    messages = sh.module("load", "container-kernels")
    flat = " ".join(messages.split())
    assert "there is no 'apptainer' module here and no apptainer or singularity on PATH" in flat
    assert "demo" in sh.kernelspecs()  # degraded, not broken: the kernels are still listed
    sh.module("unload", "container-kernels")
    # Apptainer on PATH without a module (a site that installs it system-wide): nothing to say.
    bindir = tmp_path / "sysbin"
    bindir.mkdir()
    (bindir / "apptainer").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "apptainer").chmod(0o755)
    sh.env["PATH"] = f"{bindir}:{sh.env['PATH']}"
    assert "no 'apptainer' module" not in sh.module("load", "container-kernels")


def test_sticky_under_jupyterhub(lmod_tool: lmod.Lmod, make_group: Callable[..., Path],
                                 tmp_path: Path) -> None:
    grp = make_group()
    site = fake_site_module(tmp_path / "site", "apptainer/1.4.5", 'setenv("FAKE_APPTAINER", "1.4.5")\n')
    sh = Shell(lmod_tool, JUPYTERHUB_API_TOKEN="t0ken")
    sh.module("use", str(site))
    sh.module("use", str(grp / "modulefiles"))
    sh.module("load", "container-kernels")
    sh.module("purge")
    # Still there after `module purge`, and so is the Apptainer module new kernels need.
    assert sh.env["JUPYTER_PATH"] == f"{grp}/share/jupyter"
    assert sh.env["LOADEDMODULES"] == "apptainer/1.4.5:container-kernels/0.1.0"
    sh.module("--force", "purge")
    assert "JUPYTER_PATH" not in sh.env and "FAKE_APPTAINER" not in sh.env
    plain = Shell(lmod_tool)
    plain.module("use", str(grp / "modulefiles"))
    plain.module("load", "container-kernels")
    plain.module("purge")
    assert "JUPYTER_PATH" not in plain.env


@pytest.mark.apptainer
def test_kernel_started_from_the_module_environment_runs(lmod_tool: lmod.Lmod,
                                                         make_group: Callable[..., Path], base_sif: Path,
                                                         apptainer_bin: str, tmp_path: Path) -> None:
    grp = make_group(str(base_sif))
    # The site's apptainer module is what puts apptainer on PATH (as on DRAC).
    site = fake_site_module(tmp_path / "site", "apptainer/1.4.5",
                            f'prepend_path("PATH", "{Path(apptainer_bin).parent}")\n')
    sh = Shell(lmod_tool)
    sh.module("use", str(site))
    sh.module("use", str(grp / "modulefiles"))
    sh.module("load", "container-kernels")
    script = """
import json
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="demo", startup_timeout=90)
try:
    out = []
    hook = lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None
    reply = kc.execute_interactive("print(open('/etc/hpck-test-image').read())", timeout=60, output_hook=hook)
    print(json.dumps({"status": reply["content"]["status"], "out": "".join(out),
                      "spec": km.kernel_spec.resource_dir}))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""
    done = sh.run([sys.executable, "-c", script], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": "ok", "out": "hpc-kernels test image (debian bookworm)\n\n",
                      "spec": f"{grp}/share/jupyter/kernels/demo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def jupyter_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ``jupyter server`` (127.0.0.1, random port, token) in a given environment; killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *extra: str) -> str:
        port, token = _free_port(), secrets.token_hex(16)
        log = (tmp_path / "server.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", *extra, "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={tmp_path}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        ))
        return f"http://127.0.0.1:{port}/api/kernelspecs?token={token}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _get_json(url: str, deadline: float, server_log: Path) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url, timeout=5) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                log = server_log.read_text(errors="replace")[-2000:] if server_log.exists() else ""
                raise AssertionError(f"jupyter server did not answer: {exc}\n{log}") from exc
            time.sleep(0.3)


def test_jupyter_server_started_after_load_lists_our_kernels(lmod_tool: lmod.Lmod,
                                                             make_group: Callable[..., Path],
                                                             jupyter_server: Callable[..., str],
                                                             tmp_path: Path) -> None:
    pytest.importorskip("jupyter_server", reason="jupyter_server is in the 'test' extra")
    grp = make_group()
    sh = Shell(lmod_tool)
    sh.module("use", str(grp / "modulefiles"))
    sh.module("load", "container-kernels")
    url = jupyter_server(sh.env)
    data = _get_json(url, time.monotonic() + 60, tmp_path / "server.log")
    assert data["kernelspecs"]["demo"]["spec"]["display_name"] == "Demo (container)"
    assert data["kernelspecs"]["demo"]["spec"]["metadata"]["hpc_kernels"]["kernel"] == "demo"


def _rest(url: str, method: str = "GET", body: Any = None) -> Any:
    """One Jupyter REST call (``url`` carries ``?token=``); the JSON answer, or None."""
    base, _, query = url.partition("?")
    token = query.removeprefix("token=")
    request = urllib.request.Request(
        base, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


@pytest.mark.apptainer
def test_jupyterlab_software_modules_panel_loads_our_kernels(lmod_tool: lmod.Lmod,
                                                             make_group: Callable[..., Path],
                                                             base_sif: Path, apptainer_bin: str,
                                                             jupyter_server: Callable[..., str],
                                                             tmp_path: Path) -> None:
    """DRAC's flow: a running server with jupyter-lmod (the "Software Modules" panel's server side) loads
    the module, our kernels appear in /api/kernelspecs, one started from the menu runs in Apptainer
    (which the site's apptainer module put on PATH), and unloading removes them again."""
    if importlib.util.find_spec("jupyterlmod") is None:
        pytest.skip("jupyterlmod (jupyter-lmod) is not installed: it is in the 'test' extra")
    from jupyter_client import BlockingKernelClient

    grp = make_group(str(base_sif))
    site = fake_site_module(tmp_path / "site", "apptainer/1.4.5",
                            f'prepend_path("PATH", "{Path(apptainer_bin).parent}")\n')
    sh = Shell(lmod_tool, LMOD_CMD=str(lmod_tool.command))
    sh.module("use", str(site))
    sh.module("use", str(grp / "modulefiles"))
    config = tmp_path / "server-config.json"
    config.write_text(json.dumps({"ServerApp": {"jpserver_extensions": {"jupyterlmod": True}}}))
    url = jupyter_server(sh.env, f"--config={config}")
    specs = _get_json(url, time.monotonic() + 60, tmp_path / "server.log")["kernelspecs"]
    assert "demo" not in specs
    root = url.split("/api/", 1)[0]
    token = url.partition("?")[2]

    _rest(f"{root}/module?{token}", "POST", {"modules": ["container-kernels"]})
    assert _rest(f"{root}/module?{token}") == ["apptainer/1.4.5", "container-kernels/0.1.0"]
    assert "demo" in _rest(f"{root}/api/kernelspecs?{token}")["kernelspecs"]

    kernel = _rest(f"{root}/api/kernels?{token}", "POST", {"name": "demo"})
    client = BlockingKernelClient(
        connection_file=f"{sh.env['JUPYTER_RUNTIME_DIR']}/kernel-{kernel['id']}.json")
    client.load_connection_file()
    # No heartbeat channel: without a manager, one missed beat while the container starts reads as
    # "died"; kernel_info's bounded wait is the readiness check.
    client.start_channels(hb=False)
    try:
        client.wait_for_ready(timeout=90)
        out: list[str] = []
        reply = client.execute_interactive(
            "print(open('/etc/hpck-test-image').read())", timeout=60,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
    finally:
        client.stop_channels()
        _rest(f"{root}/api/kernels/{kernel['id']}?{token}", "DELETE")
    assert reply["content"]["status"] == "ok" and out == ["hpc-kernels test image (debian bookworm)\n\n"]

    _rest(f"{root}/module?{token}", "DELETE", {"modules": ["container-kernels"]})
    assert "demo" not in _rest(f"{root}/api/kernelspecs?{token}")["kernelspecs"]
