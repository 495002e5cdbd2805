"""The user documentation (docs/) is checked against the program it describes.

Every `hpc-kernels ...` command line in the docs (fenced blocks and inline code): each `--flag` it uses
must appear in that command's real `--help`. Commands the docs describe that are not in COMMANDS yet
(other pieces of work land them) are only allowed from a known list; once a command lands, its flags
are checked. Also: every command is documented, every registry key, every environment variable of the
allowlist and every doctor check is explained, and every relative link and image exists.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from hpc_kernels import cli, keys
from hpc_kernels.doctor import base
from hpc_kernels.runtimes import envpolicy

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted(DOCS.glob("*.md"))

#: Commands the docs describe that come with other pieces of work (Lmod, Slurm, instances issues).
#: Until one is in COMMANDS its lines are skipped; after, they are checked like the rest.
PENDING_COMMANDS = {"module", "jobs", "instances", "stop", "gc"}
#: Flags of an existing command that arrive with another command's work: (command, flags) → the
#: command whose landing makes them required.
PENDING_FLAGS = {
    "build": ("jobs", {"--slurm", "--account", "--time", "--mem", "--cpus", "--partition", "--wait",
                       "--then-install", "--dry-run"}),
}

FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_RE = re.compile(r"`([^`\n]+)`")
COMMAND_RE = re.compile(r"(?:^|(?<=[\s/]))hpc-kernels(?=\s|$)(.*)$")
WORD_RE = re.compile(r"^[a-z][a-z-]*$")


def test_docs_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "quickstart.md", "registry.md", "modes.md", "lmod-slurm.md", "commands.md",
            "troubleshooting.md", "architecture.md"} <= names


def command_lines(text: str) -> list[str]:
    """The argument part of every `hpc-kernels ...` command in a page."""
    found: list[str] = []
    for block in FENCE_RE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line)
            match = COMMAND_RE.search(line)
            if match:
                found.append(re.split(r"&&|\|\||;|\s\|\s", match.group(1))[0])
    outside = FENCE_RE.sub("", text)
    for span in INLINE_RE.findall(outside):
        if span.startswith("hpc-kernels ") or span == "hpc-kernels":
            found.append(span[len("hpc-kernels"):])
    return found


def parse(args: str) -> tuple[list[str], set[str]]:
    """Non-flag words and ``--flags`` of one command line."""
    try:
        tokens = shlex.split(args.replace("\\|", " "))
    except ValueError:
        tokens = args.split()
    if "--" in tokens:  # what follows is another program's command line (`hpc-kernels run NAME -- ...`)
        tokens = tokens[:tokens.index("--")]
    words = [t for t in tokens if not t.startswith("-")]
    flags = {t.split("=", 1)[0] for t in tokens if t.startswith("--")}
    return words, flags


def help_text(*argv: str) -> str | None:
    """`hpc-kernels ARGV --help` output, or None when argparse rejects the line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([*argv, "--help"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                return None
    return out.getvalue()


def documented_commands() -> list[tuple[str, str]]:
    return [(page.name, line) for page in PAGES for line in command_lines(page.read_text())]


def test_the_docs_show_commands() -> None:
    assert len(documented_commands()) > 30


@pytest.mark.parametrize(("page", "line"), documented_commands())
def test_documented_flags_are_real(page: str, line: str) -> None:
    words, flags = parse(line)
    if not words or not WORD_RE.match(words[0]):
        top = help_text()
        assert top is not None
        missing = {f for f in flags if f not in top and f != "--help"}
        assert not missing, f"{page}: `hpc-kernels{line}`: {sorted(missing)} not in hpc-kernels --help"
        return
    command = words[0]
    if command not in cli.COMMANDS:
        assert command in PENDING_COMMANDS, f"{page}: `hpc-kernels{line}`: no command '{command}'"
        pytest.skip(f"'{command}' is not in COMMANDS yet")
    helps = [help_text(command)]
    if len(words) > 1 and WORD_RE.match(words[1]):
        helps.append(help_text(command, words[1]))  # sub-actions such as `module install`
    text = "\n".join(h for h in helps if h)
    assert text, f"{page}: `hpc-kernels {command} --help` failed"
    missing = {f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)}
    pending_on, pending = PENDING_FLAGS.get(command, ("", set()))
    if pending_on and pending_on not in cli.COMMANDS:
        missing -= pending
    assert not missing, (f"{page}: `hpc-kernels{line}`: {sorted(missing)} "
                         f"not in `hpc-kernels {command} --help`")


def test_every_command_is_documented() -> None:
    reference = (DOCS / "commands.md").read_text()
    for command in cli.COMMANDS:
        assert f"`hpc-kernels {command}" in reference, f"docs/commands.md does not describe '{command}'"


def test_every_registry_key_is_documented() -> None:
    text = (DOCS / "registry.md").read_text()
    for row in keys.KEYS:
        assert f"`{row.name}`" in text, f"docs/registry.md does not document the key '{row.name}'"
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)` \| ([^|]+) \|", text, re.M)}
    assert rows["idle_timeout"].strip() == f"`{keys.DEFAULT_IDLE_TIMEOUT:g}`"
    assert rows["compression"].strip() == f"`{keys.DEFAULT_COMPRESSION}`"
    assert rows["command"].strip() == "`[" + ", ".join(
        f'"{a}"' if "{" in a else a for a in keys.DEFAULT_COMMAND) + "]`"
    for key in ("runtime", "mode", "gpu"):
        assert rows[key].strip() == f"`{keys.key(keys.KERNEL, key).default}`"


def test_environment_allowlist_is_documented() -> None:
    text = (DOCS / "registry.md").read_text()
    for var in envpolicy.ENV_ALLOWLIST:
        assert f"`{var}`" in text, f"docs/registry.md does not list '{var}' of the allowlist"


def test_every_doctor_check_is_explained() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    headings = re.findall(r"^## `([a-z-]+)`", text, re.M)
    assert headings == list(base.CHECKS)  # same ids, same order as reports list them
    source = "".join(path.read_text() for path in Path(base.__file__).parent.glob("*.py"))
    assert set(re.findall(r'Finding\(\s*"([a-z-]+)"', source)) == set(base.CHECKS)


def test_links_and_images_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_screenshot_shows_a_launcher() -> None:
    image = DOCS / "images" / "launcher.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "images/launcher.png" in (DOCS / "index.md").read_text()
