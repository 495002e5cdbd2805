"""The Lmod adapter: find Lmod, evaluate module commands into environment changes, check trees.

``$LMOD_CMD python load X`` prints Python statements (``os.environ["K"] = "v"``, ``del os.environ["K"]``,
``_mlstatus = True``). We never ``exec`` them: they are parsed with :mod:`ast` and applied to a plain
dict, so a caller (a test, ``doctor``) gets the environment a shell would have after the command.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hpc_kernels import proc
from hpc_kernels.errors import HpcKernelsError, RuntimeNotFoundError, ToolError

#: Where Lmod installs itself (Debian's ``lmod`` package first); ``$LMOD_CMD`` wins over all.
KNOWN_COMMANDS = (
    "/usr/share/lmod/lmod/libexec/lmod",
    "/opt/lmod/lmod/libexec/lmod",
    "/usr/local/lmod/lmod/libexec/lmod",
    "/cvmfs/soft.computecanada.ca/custom/software/lmod/lmod/libexec/lmod",
)
TIMEOUT = 60.0


class LmodError(HpcKernelsError):
    """A module command failed (unknown module, error in a modulefile...)."""


@dataclass(frozen=True)
class Evaluation:
    """What one module command did: variables set, variables unset, Lmod's status and messages."""

    setenv: dict[str, str] = field(default_factory=dict)
    unsetenv: tuple[str, ...] = ()
    ok: bool = True
    messages: str = ""

    def apply(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` after this command (a new dict)."""
        out = dict(environ)
        for name in self.unsetenv:
            out.pop(name, None)
        out.update(self.setenv)
        return out


def parse_python(code: str) -> tuple[dict[str, str], tuple[str, ...], bool]:
    """Parse Lmod's ``python`` shell output into (set, unset, status) without executing it."""
    setenv: dict[str, str] = {}
    unset: list[str] = []
    ok = True
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            key = _environ_key(target)
            if key is not None and isinstance(value, ast.Constant) and isinstance(value.value, str):
                setenv[key] = value.value
                if key in unset:
                    unset.remove(key)
            elif _is_status(target) and isinstance(value, ast.Constant):
                ok = bool(value.value)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                key = _environ_key(target)
                if key is not None:
                    setenv.pop(key, None)
                    unset.append(key)
    return setenv, tuple(unset), ok


def _is_status(node: ast.expr) -> bool:
    """``_mlstatus`` (Lmod's success flag)."""
    return isinstance(node, ast.Name) and node.id == "_mlstatus"


def _environ_key(node: ast.expr) -> str | None:
    """``K`` for ``os.environ["K"]``, else None."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "environ" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "os" and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)):
        return node.slice.value
    return None


class ModuleSystem(Protocol):
    """What callers (tests, a doctor) need from a module system; :class:`Lmod` is the real one."""

    def evaluate(self, args: Sequence[str], environ: Mapping[str, str]) -> Evaluation:
        """The environment changes ``module ARGS`` asks for in ``environ``."""

    def check_tree(self, tree: Path, environ: Mapping[str, str] | None = None) -> list[str]:
        """Problems in the modulefiles under ``tree`` (empty: none)."""


@dataclass(frozen=True)
class Lmod:
    """One Lmod installation: its ``lmod`` command and ``libexec`` directory."""

    command: Path

    @property
    def libexec(self) -> Path:
        """``$LMOD_DIR``: the directory of ``lmod``, ``check_module_tree_syntax``..."""
        return self.command.parent

    @property
    def init_bash(self) -> Path:
        """The bash init script (``source`` it to get the ``module`` function)."""
        return self.libexec.parent / "init" / "bash"

    def version(self) -> str:
        """Lmod's version number, e.g. ``8.6.19``."""
        out = proc.run([str(self.command), "--version"], check=False, timeout=TIMEOUT)
        for word in (out.stderr + out.stdout).split():
            if word[:1].isdigit() and "." in word:
                return word
        return "unknown"

    def evaluate(self, args: Sequence[str], environ: Mapping[str, str]) -> Evaluation:
        """Run ``lmod python ARGS`` in ``environ`` and parse the changes it asks for (never raises on rc)."""
        out = proc.run([str(self.command), "python", *args], check=False, env=environ, timeout=TIMEOUT)
        try:
            setenv, unset, ok = parse_python(out.stdout)
        except SyntaxError as exc:
            raise ToolError(out.argv, out.returncode, proc.tail(out.stdout),
                            f"Lmod printed output that is not Python: {exc}") from exc
        return Evaluation(setenv, unset, ok and out.returncode == 0, out.stderr)

    def apply(self, args: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` after ``module ARGS``; :class:`LmodError` with Lmod's message when it fails."""
        result = self.evaluate(args, environ)
        if not result.ok:
            raise LmodError(f"'module {' '.join(args)}' failed:\n{proc.tail(result.messages)}")
        return result.apply(environ)

    def check_tree(self, tree: Path, environ: Mapping[str, str] | None = None) -> list[str]:
        """Problems ``check_module_tree_syntax`` reports for ``tree`` (empty: no errors)."""
        env = dict(os.environ if environ is None else environ)
        # Only this tree: the site's own MODULEPATH must not make our check fail or pass.
        env["MODULEPATH"] = str(tree)
        tool = self.libexec / "check_module_tree_syntax"
        out = proc.run([str(tool), str(tree)], check=False, env=env, timeout=TIMEOUT)
        if out.returncode == 0 and "No errors found" in out.stdout + out.stderr:
            return []
        text = proc.tail(out.stderr + out.stdout)
        return [line.strip() for line in text.splitlines() if line.strip()] or [
            f"check_module_tree_syntax exited with code {out.returncode}"]


def find(environ: Mapping[str, str] | None = None) -> Lmod:
    """The Lmod to use: ``$LMOD_CMD``, ``$LMOD_DIR/lmod``, then the usual install locations."""
    env = os.environ if environ is None else environ
    lmod_dir = env.get("LMOD_DIR", "")
    from_dir = os.path.join(lmod_dir, "lmod") if lmod_dir else ""
    candidates = [env.get("LMOD_CMD", ""), from_dir, *KNOWN_COMMANDS]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return Lmod(Path(candidate))
    raise RuntimeNotFoundError(
        "Lmod was not found ($LMOD_CMD is unset and no lmod under /usr/share/lmod or /opt/lmod); "
        "on a cluster, log in again or source your site's Lmod init script."
    )
