"""Our kernels in a real JupyterLab, driven by Debian's headless Chromium through Playwright.

One JupyterLab start serves two kernels: one installed in the user's Jupyter dir by
`hpc-kernels install`, one installed with ``install --prefix`` + ``module install`` into a group tree
and made visible only by a real Lmod ``module use <tree>; module load container-kernels``: JupyterLab
is started with exactly the environment Lmod's own bash function leaves behind. The test checks
both launcher cards (their image is our logo, served from the kernelspec), opens a notebook with
each, runs a cell that reads a file only the container has, sees its output, and that no kernel
process is left. It saves a screenshot of the launcher (to docs/images/ when
``HPCK_DOCS_SCREENSHOTS=1``; always next to the test's temporary files).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli
from tests.helpers import lmod

pytestmark = [pytest.mark.browser, pytest.mark.lmod, pytest.mark.apptainer]

CHROMIUM = Path(os.environ.get("HPCK_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
MARKER_TEXT = "hpc-kernels test image"
USER_KERNEL = ("hpck-browser", "Python (container, user dir)")
MODULE_KERNEL = ("hpck-module", "Python (container, module)")
SERVER_START_TIMEOUT = 90.0
UI_TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer {url} within {SERVER_START_TIMEOUT:g} s")


@contextlib.contextmanager
def jupyterlab(root: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """A real JupyterLab on 127.0.0.1 (random port, token); yields its /lab URL; always stopped."""
    port, token = _free_port(), secrets.token_hex(16)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
            # CI runs as root; JupyterLab refuses that unless told (the test uses loopback and a token).
            *(["--allow-root"] if os.geteuid() == 0 else []),
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", proc,
                       time.monotonic() + SERVER_START_TIMEOUT)
            yield f"http://127.0.0.1:{port}/lab?token={token}"
        finally:
            # SIGTERM: the server shuts its kernels down; then make sure of the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def module_loaded_environment(tool: lmod.Lmod, tree: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment a user's bash has after ``module use TREE; module load container-kernels``.

    Lmod's own init script and shell function, not our evaluator: what a terminal (or a JupyterHub
    session started after the load) really gets, read back with ``env -0``.
    """
    script = "\n".join([
        "set -e",
        f"source {shlex.quote(str(tool.init_bash))}",
        f"module use {shlex.quote(str(tree))}",
        "module load container-kernels",
        "env -0",
    ])
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", script], env=env, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    loaded: dict[str, str] = {}
    for item in done.stdout.decode().split("\0"):
        key, sep, value = item.partition("=")
        if sep and key:
            loaded[key] = value
    return loaded


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Playwright driving Debian's Chromium (never a downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (bash .ci/browser-setup.sh installs Debian's chromium)")
    try:
        import jupyterlab  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"{exc.name} is not installed (bash .ci/browser-setup.sh installs it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Save a screenshot beside the test's files, and into docs/images/ when asked to."""
    page.screenshot(path=str(tmp_path / name))
    if os.environ.get("HPCK_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, DOCS_IMAGES / name)


def _check_logo(page: Any, card: Any, kernel: str) -> None:
    """The card shows our logo: the kernelspec's logo-svg.svg, byte for byte the package's."""
    image = card.locator(".jp-LauncherCard-icon img")
    image.wait_for()
    src = str(image.get_attribute("src"))
    assert src.split("?", 1)[0].endswith(f"/kernelspecs/{kernel}/logo-svg.svg"), src
    served = page.request.get(urllib.parse.urljoin(page.url, src))
    assert served.ok, f"{src}: HTTP {served.status}"
    assert served.body() == files("hpc_kernels").joinpath("resources", "logo-svg.svg").read_bytes()
    # Loaded and drawn, not a broken-image placeholder.
    assert image.evaluate("img => img.complete && img.naturalWidth > 0")


def _run_in_new_notebook(page: Any, display_name: str, code: str) -> str:
    """Click the launcher card, run ``code`` in the notebook it opens, return the output text."""
    page.locator(".jp-LauncherCard:visible", has_text=display_name).first.click()
    from playwright.sync_api import expect

    panel = page.locator(".jp-NotebookPanel:visible").last
    # The notebook opens at once and shows "No Kernel" until the session has started our kernel.
    expect(panel.locator(".jp-KernelName")).to_contain_text(display_name, timeout=UI_TIMEOUT_MS)
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=UI_TIMEOUT_MS)
    editor = panel.locator(".jp-Cell .cm-content").first
    editor.click()
    editor.fill(code)
    page.keyboard.press("Shift+Enter")
    output = panel.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=UI_TIMEOUT_MS)
    return str(output.inner_text())


def test_kernel_cards_and_cells_in_real_jupyterlab(
    apptainer_bin: str, base_sif: Path, make_registry: Callable[..., Path], chromium: Any,
    lmod_tool: lmod.Lmod,
    tmp_path: Path, isolated_home: Path,
) -> None:
    registry = make_registry(f"""
        kernels:
          {USER_KERNEL[0]}:
            display_name: "{USER_KERNEL[1]}"
            image: {base_sif}
            command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
          {MODULE_KERNEL[0]}:
            display_name: "{MODULE_KERNEL[1]}"
            image: {base_sif}
            command: [python3, -m, ipykernel_launcher, -f, "{{connection_file}}"]
        """)
    group = tmp_path / "group"
    assert cli.main(["install", "--registry", str(registry), USER_KERNEL[0]]) == 0
    # The module kernel goes only into the group tree: its kernelspec under <group>/share/jupyter, then
    # the modulefile that puts that directory on JUPYTER_PATH (docs/lmod-slurm.md's group recipe).
    assert cli.main(["install", "--registry", str(registry), "--prefix", str(group), MODULE_KERNEL[0]]) == 0
    assert cli.main(["module", "install", "--registry", str(registry),
                     "--dir", str(group / "modulefiles"), "--prefix", str(group)]) == 0

    base = dict(os.environ)
    base["PATH"] = f"{Path(apptainer_bin).parent}{os.pathsep}{base.get('PATH', '')}"
    base["MODULEPATH"] = ""  # only our tree: the machine's own modules play no part
    # No "get Jupyter news?" toast over the screenshot (and no fetch from the internet).
    settings = tmp_path / "lab-settings"
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    base["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    base["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "lab-workspaces")
    # Nothing but the module can show the second kernel: no JUPYTER_PATH, not in the user's dir.
    assert "JUPYTER_PATH" not in base
    assert not (Path(base["JUPYTER_DATA_DIR"]) / "kernels" / MODULE_KERNEL[0]).exists()
    # JupyterLab gets exactly the environment the real `module load` left (nothing added after).
    env = module_loaded_environment(lmod_tool, group / "modulefiles", base)
    assert env["JUPYTER_PATH"] == str(group / "share" / "jupyter")
    assert env["LOADEDMODULES"].startswith("container-kernels/")
    root = tmp_path / "notebooks"
    root.mkdir()
    log = tmp_path / "jupyterlab.log"

    try:
        with jupyterlab(root, env, log) as url:
            page = chromium.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(url)
            for name, display in (USER_KERNEL, MODULE_KERNEL):
                card = page.locator(".jp-LauncherCard", has_text=display).first
                card.wait_for()
                _check_logo(page, card, name)
            _screenshot(page, tmp_path, "launcher.png")

            code = "print(open('/etc/hpck-test-image').read())"
            assert MARKER_TEXT in _run_in_new_notebook(page, USER_KERNEL[1], code)
            _screenshot(page, tmp_path, "notebook.png")
            # Back to a launcher for the kernel that only the module load makes visible.
            page.locator(".lm-DockPanel-tabBar .lm-TabBar-addButton").first.click()
            assert MARKER_TEXT in _run_in_new_notebook(page, MODULE_KERNEL[1], code)
            page.close()
    except Exception:
        print(log.read_text(errors="replace")[-4000:])
        raise
    # (that the server stopped its kernels, leaving nothing, is checked by the no_leftovers fixture)
