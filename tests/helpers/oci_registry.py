"""A real container registry (Debian's ``docker-registry``, the CNCF distribution registry) that a test serves
on loopback only, started and stopped by the test itself, and the test image pushed into it with ``skopeo``
(Docker Hub is not reachable from the test bed: this stands in for it).

The image is the test bed's Debian rootfs (``rootfs.tar``) as a one-layer OCI image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


@dataclass(frozen=True)
class Registry:
    """A running loopback registry."""

    host: str  # 127.0.0.1:PORT
    process: subprocess.Popen[bytes]

    def manifest_digest(self, repository: str, tag: str) -> str:
        """The digest the registry serves for ``repository:tag`` (what a staged base must record)."""
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repository}/manifests/{tag}", method="HEAD",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                               "application/vnd.docker.distribution.manifest.v2+json"})
        with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
            return str(response.headers["Docker-Content-Digest"])


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(root: Path, binary: str, attempts: int = 3) -> Iterator[Registry]:
    """Run ``docker-registry`` on a free 127.0.0.1 port, storing under ``root``; stop it (and wait) afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(attempts):
        port = free_port()
        config = root / "config.yml"
        config.write_text(CONFIG.format(root=root / "storage", port=port))
        log = (root / "registry.log").open("ab")
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        host = f"127.0.0.1:{port}"
        try:
            if _ready(host, process):
                try:
                    yield Registry(host, process)
                    return
                finally:
                    _stop(process)
            last = (root / "registry.log").read_text(errors="replace")[-500:]
        finally:
            _stop(process)
    raise RuntimeError(f"docker-registry did not start: {last}")


def _ready(host: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=2) as response:  # loopback only
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def oci_layout(rootfs_tar: Path, dest: Path, tag: str, extra: tuple[Path, ...] = ()) -> Path:
    """An OCI image layout at ``dest``: ``rootfs_tar`` as its first layer, then the ``extra`` layer tars
    (uncompressed layers: no gzip of 250 MB)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers: list[tuple[str, int]] = []
    for tar in (rootfs_tar, *extra):
        h = hashlib.sha256()
        with tar.open("rb") as src, (blobs / "layer.tmp").open("wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        (blobs / "layer.tmp").rename(blobs / h.hexdigest())
        layers.append((h.hexdigest(), (blobs / h.hexdigest()).stat().st_size))

    def blob(data: dict[str, object]) -> tuple[str, int]:
        raw = json.dumps(data, separators=(",", ":")).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return digest, len(raw)

    config, config_size = blob({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}" for digest, _size in layers]},
        "history": [{"created_by": "hpc-kernels tests: the test bed's Debian rootfs"}],
    })
    manifest, manifest_size = blob({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config}",
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{digest}",
                    "size": size} for digest, size in layers],
    })
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{manifest}",
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def pip_layer(wheel: Path, dest: Path, site: str = "usr/local/lib/python3.11/dist-packages") -> Path:
    """A layer tar that installs the pip ``wheel`` (a zip) into the image's ``site`` directory: an image with
    ``python3 -m pip``, like most bases researchers start from."""
    import io
    import tarfile
    import zipfile

    with zipfile.ZipFile(wheel) as whl, tarfile.open(dest, "w") as tar:
        files = [m for m in whl.infolist() if not m.is_dir()]
        dirs = sorted({str(Path(site, m.filename).parent) for m in files} | {site})
        done: set[str] = set()
        for directory in dirs:  # parents first, each once
            parts = Path(directory).parts
            for n in range(1, len(parts) + 1):
                name = "/".join(parts[:n])
                if name not in done:
                    done.add(name)
                    info = tarfile.TarInfo(name)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
        for member in files:
            data = whl.read(member)
            info = tarfile.TarInfo(f"{site}/{member.filename}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return dest


def push(layout: Path, tag: str, target: str, skopeo: str) -> None:
    """``skopeo copy`` the layout's ``tag`` to ``docker://target`` over plain HTTP (loopback)."""
    env = dict(os.environ)
    subprocess.run([skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                    f"docker://{target}"], check=True, capture_output=True, timeout=600, env=env)


def tools() -> tuple[str | None, str | None]:
    """``docker-registry`` and ``skopeo``, where installed."""
    return shutil.which("docker-registry"), shutil.which("skopeo")
