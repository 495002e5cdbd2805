"""The one error family of hpc-kernels: the library raises these, the CLI prints them."""

from __future__ import annotations

from collections.abc import Sequence


class HpcKernelsError(Exception):
    """Base class: ``str(err)`` is one clear sentence for the user (with a fix where we know one)."""


class UsageError(HpcKernelsError):
    """The command line itself is wrong (exit code 2)."""


class RegistryError(HpcKernelsError):
    """``kernels.yaml`` is missing or invalid; carries every problem found, each with file:line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the registry:\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(message)


class UnknownKernelError(HpcKernelsError):
    """A kernel name that is not in the registry."""


class RuntimeNotFoundError(HpcKernelsError):
    """No container runtime (apptainer/singularity, podman/docker) could be found."""


class ToolError(HpcKernelsError):
    """An external program failed: carries its command, exit code and the tail of its output."""

    def __init__(self, argv: Sequence[str], returncode: int, output_tail: str, message: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output_tail = output_tail
        head = message or f"{self.argv[0]} failed (exit code {returncode})"
        detail = f":\n{_indent(output_tail)}" if output_tail.strip() else "."
        super().__init__(head + detail)


class BuildError(HpcKernelsError):
    """An image build failed; the previous image (if any) is untouched."""

    def __init__(self, kernel: str, reason: str, log_tail: str = "", log_path: str | None = None,
                 hint: str = "") -> None:
        self.kernel = kernel
        self.reason = reason
        self.log_tail = log_tail
        self.log_path = log_path
        self.hint = hint
        text = f"building kernel '{kernel}' failed: {reason}"
        if log_tail.strip():
            text += f"\n{_indent(log_tail)}"
        if hint:
            text += f"\nhint: {hint}"
        if log_path:
            text += f"\nfull build log: {log_path}"
        super().__init__(text)


class BuildBusyError(HpcKernelsError):
    """Another process is building the same image right now."""


class LockBusyError(HpcKernelsError):
    """A lock we need is held by another process: another user's (never waited for), or one of ours
    that did not let go within the time allowed; the message names the holder when we can tell."""

    def __init__(self, message: str, holder: str = "") -> None:
        self.holder = holder  # "pid 123 of user bob on cn12, since 14:02:11", when known
        super().__init__(message)


class NoWriteAccessError(HpcKernelsError):
    """Refusing, before anything is written, to change a directory the user cannot write (a group's
    install in /project maintained by someone else); the message says who can."""


class NotOursError(HpcKernelsError):
    """Refusing to overwrite or remove a file hpc-kernels did not write."""


def describe_value(value: object) -> str:
    """How a bad registry value is named in an error message."""
    if isinstance(value, bool):
        # YAML 1.1 reads yes/no/on/off as booleans: say so, since the user wrote a word.
        return f"{str(value).lower()} (YAML reads yes/no/on/off as true/false: quote the word)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())
