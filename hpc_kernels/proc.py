"""The one place hpc-kernels runs external programs: argument lists, captured output, typed errors."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hpc_kernels.errors import RuntimeNotFoundError, ToolError

TAIL_LINES = 25


@dataclass(frozen=True)
class Result:
    """What a finished command returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    input_text: str | None = None,
    message: str = "",
) -> Result:
    """Run ``argv`` (never through a shell) and capture its output.

    Raises :class:`ToolError` on a non-zero exit when ``check`` is true, on a time-out, and
    :class:`RuntimeNotFoundError` when the program does not exist.
    """
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise RuntimeNotFoundError(f"'{args[0]}' was not found; is it installed and on PATH?") from exc
    except subprocess.TimeoutExpired as exc:
        out = _text(exc.stdout) + _text(exc.stderr)
        raise ToolError(args, -1, tail(out), f"{args[0]} did not finish within {timeout:g} s") from exc
    result = Result(tuple(args), done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        raise ToolError(args, done.returncode, tail(done.stderr or done.stdout), message)
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
    stdout: int | None = None,
    stderr: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (never through a shell) without waiting: a long-lived child (a kernel, a watcher).

    stdin is /dev/null; stdout and stderr are inherited unless given (file descriptors). ``new_session``:
    its own session and process group (signals to ours do not reach it; ``killpg`` reaches all of it).
    Raises :class:`RuntimeNotFoundError` when the program does not exist.
    """
    args = [os.fspath(a) for a in argv]
    try:
        return subprocess.Popen(args, env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, start_new_session=new_session, close_fds=True)
    except FileNotFoundError as exc:
        raise RuntimeNotFoundError(f"'{args[0]}' was not found; is it installed and on PATH?") from exc
