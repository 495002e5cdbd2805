"""The *derived* recipe every Apptainer build runs (:func:`derive`), made from the kernel's recipe
(:mod:`hpc_kernels.build.recipegen` reads its stages) without ever writing over it: staged or pinned bases,
absolute paths, ``PIP_NO_INDEX`` for a staged build, the requirements install step, the ``org.hpc-kernels.*``
labels. Pure text: no network, no process.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from hpc_kernels.build.recipegen import (
    _REGISTRY_KEYS,
    PIP_DIR,
    REQ_DIR,
    WHEELS_DIR,
    WORK_DIR,
    Derivation,
    Install,
    Label,
    Source,
    StageInfo,
    _comment,
    _header_value,
    _label_value,
    preamble,
    quote_path,
    sections,
    split,
)


def derive(src: Source, how: Derivation) -> str:
    """The recipe a build runs: ``src`` with the bases, paths, pip settings, install step and labels of ``how``."""
    lines = src.text.splitlines()
    stages = split(src.text)
    out: list[str] = [f"# Derived by hpc-kernels from {_comment(src.shown)}; that recipe is never written over.",
                      *preamble(src.text)]
    for stage in stages:
        final = stage.index == len(stages) - 1
        # A %post of ours needs a shell in the image: only where the recipe runs one already (or where
        # requirements must be installed), so an image without /bin/sh (scratch, distroless) still builds.
        has_post = any(name.split()[0] == "%post" for name, _b, _e in sections(lines, stage.body, stage.end))
        out += _header(lines, stage, src, how)
        if how.offline and has_post:
            out += ["%post", "    # hpc-kernels, staged build: pip installs from the staged wheels only, never from "
                    "an index.", "    export PIP_NO_INDEX=1"]
            if how.wheels is not None:
                out.append(f"    export PIP_FIND_LINKS={WHEELS_DIR}")
        out += _body(lines, stage, src)
        out += _additions(how, final, has_post)
    return "\n".join(out) + "\n"



def _header(lines: list[str], stage: StageInfo, src: Source, how: Derivation) -> list[str]:
    header = lines[stage.start:stage.body]
    bootstrap = stage.get("bootstrap").lower()
    if stage.index in how.bases:
        kept = _drop_keys(header, _REGISTRY_KEYS)
        sif = _header_value(str(how.bases[stage.index]), "staged base")
        return ["Bootstrap: localimage", f"From: {sif}", *kept]
    if stage.index in how.pins:
        kept = _drop_keys(header, {"from", "registry", "namespace"})
        at = next((i for i, line in enumerate(kept) if _key_of(line) == "bootstrap"), -1)
        kept.insert(at + 1, f"From: {_header_value(how.pins[stage.index], 'base')}")
        return kept
    if bootstrap == "localimage":
        value = stage.get("from")
        if value and not Path(value).expanduser().is_absolute():
            kept = _drop_keys(header, {"from"})
            at = next((i for i, line in enumerate(kept) if _key_of(line) == "bootstrap"), -1)
            kept.insert(at + 1, f"From: {_header_value(str(src.origin / value), 'base')}")
            return kept
    return list(header)



def _key_of(line: str) -> str:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return ""
    key, colon, _value = stripped.split("#", 1)[0].partition(":")
    return key.strip().lower() if colon else ""



def _drop_keys(header: list[str], keys: set[str]) -> list[str]:
    kept: list[str] = []
    dropping = False
    for line in header:
        if dropping:
            dropping = line.split("#", 1)[0].rstrip().endswith("\\")
            continue
        if _key_of(line) in keys:
            dropping = line.split("#", 1)[0].rstrip().endswith("\\")
            continue
        kept.append(line)
    return kept



def _body(lines: list[str], stage: StageInfo, src: Source) -> list[str]:
    body = lines[stage.body:stage.end]
    out: list[str] = []
    in_files = False
    for line in body:
        words = line.strip().split()
        if words and words[0].startswith("%"):
            # `%files from <stage>` copies out of another stage: its sources are not host paths.
            in_files = words[0].lower() == "%files" and len(words) == 1
            out.append(line)
            continue
        if in_files and words and not words[0].startswith("#"):
            out.append(_absolute_files_line(line, src.origin))
        else:
            out.append(line)
    return out



def _absolute_files_line(line: str, origin: Path) -> str:
    try:
        parts = shlex.split(line)
    except ValueError:
        return line  # Apptainer reports it; not ours to guess
    if not parts:
        return line
    src = Path(parts[0]).expanduser()
    if src.is_absolute():
        return line
    indent = line[: len(line) - len(line.lstrip())]
    rest = " ".join(quote_path(p, "%files destination") for p in parts[1:])
    return f"{indent}{quote_path(str(origin / src), '%files source')}" + (f" {rest}" if rest else "")



def _additions(how: Derivation, final: bool, has_post: bool) -> list[str]:
    out: list[str] = []
    files: list[str] = []
    install = how.install if final else None
    wheels = how.wheels if how.offline and has_post else None
    if wheels is not None:
        files.append(f"    {quote_path(str(wheels), 'wheelhouse')} {WHEELS_DIR}")
    if install is not None:
        if install.staged:
            if install.directory != wheels:
                files.append(f"    {quote_path(str(install.directory), 'wheelhouse')} {WHEELS_DIR}")
            if install.pip_wheel is not None:
                wheel = install.pip_wheel
                files.append(f"    {quote_path(str(wheel), 'pip wheel')} {PIP_DIR}/{wheel.name}")
        else:
            files.append(f"    {quote_path(str(install.directory), 'requirements')} {REQ_DIR}")
    if files:
        out += ["", "%files", *files]
    if final and (has_post or install is not None):
        out += ["", "%post", "    # Added by hpc-kernels: the kernel's requirements, then what is inside (labels)."]
        out += _find_python(how.pythons)
        if install is not None:
            out += _install_lines(install)
        out += _packages_label()
        out.append(f"    rm -rf {WORK_DIR}")
    elif files:  # the wheels of this stage's own pip: not kept in the image (a later stage copies what it needs)
        out += ["", "%post", f"    rm -rf {WORK_DIR}"]
    if final:
        out += ["", "%labels", *(f"    {key} {_label_value(value)}" for key, value in how.labels)]
    return out



def _find_python(pythons: Sequence[str]) -> list[str]:
    names = " ".join(shlex.quote(p) for p in dict.fromkeys(pythons))
    return [
        '    hpck_py=""',
        f"    for hpck_c in {names}; do",
        '        if command -v "$hpck_c" >/dev/null 2>&1; then hpck_py=$(command -v "$hpck_c"); break; fi',
        "    done",
    ]



def _install_lines(install: Install) -> list[str]:
    no_python = shlex.quote("hpc-kernels: no python3 or python in the image to install the kernel's "
                            "requirements with.")
    out = [f'    if [ -z "$hpck_py" ]; then echo {no_python} >&2; exit 1; fi']
    if install.python:
        major, minor = install.python.split(".")
        wrong = shlex.quote(f"hpc-kernels: the lock was made for Python {install.python}, but this image's "
                            "Python is another: build with --lock again, or use a base with that Python.")
        out.append(f"    \"$hpck_py\" -c 'import sys; sys.exit(sys.version_info[:2] != ({int(major)}, {int(minor)}))' "
                   f"|| {{ echo {wrong} >&2; exit 1; }}")
    env = "PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1"
    if install.staged:
        # A wheel is importable as a zip: the staged pip runs in an image that has none.
        run = f'"$hpck_py" {PIP_DIR}/{install.pip_wheel.name}/pip' if install.pip_wheel is not None \
            else '"$hpck_py" -m pip'
        out.append(f"    {env} {run} install --no-index --find-links {WHEELS_DIR} --no-cache-dir "
                   f"-r {WHEELS_DIR}/{shlex.quote(install.requirement)}")
        return out
    no_pip = shlex.quote("hpc-kernels: the base image has no pip to install the kernel's requirements with: set "
                         "'staging: always' in the registry (hpc-kernels then brings pip and the wheels), or use a "
                         "base image with pip.")
    out.append(f'    "$hpck_py" -m pip --version >/dev/null 2>&1 || {{ echo {no_pip} >&2; exit 1; }}')
    out.append(f'    {env} "$hpck_py" -m pip install --no-cache-dir -r {REQ_DIR}/{shlex.quote(install.requirement)}')
    if install.ipykernel:
        out.append(f"    \"$hpck_py\" -c 'import ipykernel' 2>/dev/null || {env} \"$hpck_py\" -m pip install "
                   "--no-cache-dir ipykernel")
    return out



#: Prints one ``org.hpc-kernels.packages name==version ...`` line: every distribution the image's Python
#: sees (the first on sys.path of each name, as import picks), like ``pip freeze`` without needing pip.
FREEZE = (
    'import importlib.metadata as m, re; seen = {}\n'
    'for d in m.distributions():\n'
    '    n = d.metadata["Name"]\n'
    '    if n: seen.setdefault(re.sub(r"[-_.]+", "-", n).lower(), n + "==" + d.version)\n'
    f'print("{Label.PACKAGES.value} " + " ".join(sorted(seen.values(), key=str.lower)))'
)



def _packages_label() -> list[str]:
    return [
        '    hpck_labels="${APPTAINER_LABELS:-${SINGULARITY_LABELS:-}}"',
        '    if [ -n "$hpck_py" ] && [ -n "$hpck_labels" ]; then',
        f'        "$hpck_py" -c {shlex.quote(FREEZE)} >>"$hpck_labels" || true',
        "    fi",
    ]
