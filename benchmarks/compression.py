"""The image's squashfs compression as a start-time lever.

Every ``apptainer exec`` mounts the SIF afresh, so the kernel's Python imports are decompressed anew on
each start. Here: (a) every ``compression:`` the registry accepts is built by ``hpc-kernels build`` with
real Apptainer and the SIF's squashfs superblock is checked to carry it (a tiny image, cheap);
(b) the test image's rootfs is rebuilt with gzip, lz4 and zstd (cached between runs: the builds are
incremental) and start → kernel_info is measured interleaved, plus the image sizes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

from benchmarks.common import (
    KERNEL_COMMAND,
    Config,
    NotAvailable,
    Row,
    apptainer_binary,
    base_row,
    interleaved,
    na_row,
    ratio_row,
    run_cli,
)
from benchmarks.kernels import start_to_reply

#: squashfs superblock compression ids (squashfs_fs.h).
SQUASHFS_COMP = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
MEASURED = ("gzip", "lz4", "zstd")
DEFAULT = "(default)"


def squashfs_offset(sif: Path, env: dict[str, str]) -> int:
    """Byte offset of the SIF's root filesystem partition (from ``apptainer sif list``)."""
    out = subprocess.run(
        [apptainer_binary(env), "sif", "list", str(sif)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for line in out.splitlines():
        m = re.search(r"\|\s*(\d+)-(\d+)\s*\|FS \(Squashfs", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"{sif}: no squashfs partition in 'apptainer sif list'")


def sif_compression(sif: Path, env: dict[str, str]) -> tuple[str, str]:
    """The compressor named by the squashfs superblock, and ``unsquashfs -s``'s opinion (if installed)."""
    offset = squashfs_offset(sif, env)
    with sif.open("rb") as fh:
        fh.seek(offset)
        sb = fh.read(96)
    if sb[:4] != b"hsqs":
        raise RuntimeError(f"{sif}: no squashfs superblock at offset {offset}")
    ours = SQUASHFS_COMP.get(struct.unpack_from("<H", sb, 20)[0], "unknown")
    theirs = ""
    if shutil.which("unsquashfs"):
        out = subprocess.run(
            ["unsquashfs", "-s", "-o", str(offset), str(sif)], capture_output=True, text=True, timeout=60
        ).stdout
        m = re.search(r"^Compression (\w+)", out, re.M)
        theirs = m.group(1) if m else ""
    return ours, theirs


def _registry(root: Path, recipe: str, kernels: dict[str, str], images: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "image.def").write_text(recipe, encoding="utf-8")
    lines = ["defaults:", f"  images_dir: {images}", f"  command: {json.dumps(KERNEL_COMMAND)}", "kernels:"]
    for name, comp in kernels.items():
        lines += [f"  {name}:", "    def: image.def"]
        if comp != DEFAULT:  # the default kernel leaves the key out: proves what the default builds
            lines.append(f"    compression: {comp}")
    path = root / "kernels.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def verify_all(cfg: Config) -> list[Row]:
    """Build a tiny image with every accepted compression and read back what the SIF holds."""
    from hpc_kernels.keys import COMPRESSIONS

    env = dict(os.environ)
    root = cfg.work / "comp-tiny"
    root.mkdir(parents=True, exist_ok=True)
    # Compressible payload, so the compressors differ in size.
    (root / "payload.txt").write_text("".join(f"line {i} of a compressible payload\n" for i in range(40000)))
    recipe = "Bootstrap: scratch\n\n%files\n    payload.txt /payload.txt\n"
    kernels = {f"tiny-{c}": c for c in COMPRESSIONS}
    kernels["tiny-default"] = DEFAULT
    reg = _registry(root, recipe, kernels, root / "images")
    # Payload-only images, not kernels: nothing in them could start one (--no-check).
    out = json.loads(run_cli(["build", "--registry", str(reg), "--all", "--no-check", "--json"], env))
    rows = []
    for result in out:
        want = kernels[result["kernel"]]
        if want == DEFAULT:
            from hpc_kernels.keys import DEFAULT_COMPRESSION

            want = DEFAULT_COMPRESSION
        sif = Path(result["image"])
        got, unsq = sif_compression(sif, env)
        ok = got == want and unsq in ("", want)
        rows.append(
            Row(
                "compression: build check",
                f"compression: {kernels[result['kernel']]} → SIF squashfs",
                float(sif.stat().st_size) / 1024,
                "KiB",
                1,
                f"superblock {got}, unsquashfs -s {unsq or 'n/a'}",
                None,
                "",
                "= requested",
                ok,
                "tiny scratch image",
            )
        )
    return rows


def bench_compression(cfg: Config) -> list[Row]:
    """Verify the option end to end; then the start-time/size trade-off on the test image's rootfs."""
    env = dict(os.environ)
    apptainer_binary(env)
    if not cfg.sif.is_file():
        raise NotAvailable(f"image {cfg.sif} missing")
    rows = verify_all(cfg)
    bench = "compression: start→kernel_info"
    if cfg.quick:
        return [*rows, na_row(bench, "gzip vs lz4 vs zstd on the test rootfs", "skipped in --quick")]
    root = cfg.cache / "compression"
    images = root / "images"
    kernels = {f"bench-comp-{c}": c for c in MEASURED}
    reg = _registry(root, f"Bootstrap: localimage\nFrom: {cfg.sif}\n", kernels, images)
    built = json.loads(run_cli(["build", "--registry", str(reg), "--all", "--json"], env, timeout=900))
    seconds = _remember_build_times(root, built)
    run_cli(["install", "--registry", str(reg), "--all", "--json"], env)
    sizes = {c: (images / f"bench-comp-{c}.sif").stat().st_size / 2**20 for c in MEASURED}
    for c in MEASURED:
        got, _ = sif_compression(images / f"bench-comp-{c}.sif", env)
        if got != c:
            raise RuntimeError(f"bench-comp-{c}.sif holds {got}, not {c}")
    res = interleaved(
        {c: functools.partial(start_to_reply, f"bench-comp-{c}") for c in MEASURED}, cfg.reps, cfg.warmup
    )
    rows.append(base_row(bench, "gzip (Apptainer's default)", res["gzip"]))
    for c in MEASURED[1:]:
        rows.append(ratio_row(bench, c, res[c], "gzip", res["gzip"]))
    for c in MEASURED:
        build_s = seconds.get(c)
        rows.append(
            Row(
                "compression: image size",
                c,
                sizes[c],
                "MiB",
                1,
                f"build {build_s:.0f} s" if build_s else "",
                sizes[c] / sizes["gzip"],
                "gzip",
            )
        )
    return rows


def _remember_build_times(root: Path, built: list[dict[str, object]]) -> dict[str, float]:
    """Build seconds per compression, kept beside the cached images (a re-run is a no-op build)."""
    record = root / "build-seconds.json"
    try:
        seconds: dict[str, float] = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seconds = {}
    for result in built:
        if result.get("action") == "built":
            seconds[str(result["kernel"]).rsplit("-", 1)[1]] = float(result["seconds"])  # type: ignore[arg-type]
    record.write_text(json.dumps(seconds) + "\n", encoding="utf-8")
    return seconds
