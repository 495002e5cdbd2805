"""The control connection between a job kernel's launcher and its agent (one JSON object per line, the
agent's nonce answered with the key's proof), and the private JSON files the two leave each other.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time

from hpc_kernels.runtimes.job.wire import LINE_LIMIT, Loop

# why: typing is not loaded on the launcher's path (python -S)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Control:
    """A JSON-lines connection: :meth:`send` objects, ``on_message(obj)`` for each line received,
    ``on_close()`` once when it ends (EOF, error, a line that is not JSON, or :meth:`close`)."""

    def __init__(self, loop: Loop, sock: socket.socket, on_message: Callable[[dict[str, Any]], None],
                 on_close: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.closed = False
        self.last_heard = time.monotonic()
        sock.setblocking(False)
        self._update()

    def _update(self) -> None:
        if not self.closed:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
            self.loop.watch(self.sock, events, self._ready)

    def send(self, obj: dict[str, Any]) -> None:
        """Queue one message (sent as soon as the socket takes it)."""
        if self.closed:
            return
        self.outbox.extend(json.dumps(obj).encode() + b"\n")
        with contextlib.suppress(BlockingIOError):  # the rest waits for EVENT_WRITE
            sent = self.sock.send(self.outbox)
            del self.outbox[:sent]
        self._update()

    def flush(self, timeout: float = 2.0) -> None:
        """Block until what was queued is sent (bounded): before closing on purpose."""
        if self.closed or not self.outbox:
            return
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(timeout)
            self.sock.sendall(self.outbox)
            self.outbox.clear()
            self.sock.setblocking(False)
        except OSError:
            pass

    def _ready(self, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and self.outbox:
                sent = self.sock.send(self.outbox)
                del self.outbox[:sent]
            if mask & selectors.EVENT_READ:
                data = self.sock.recv(65536)
                if not data:
                    self.close()
                    return
                self.last_heard = time.monotonic()
                self.inbox.extend(data)
                while b"\n" in self.inbox and not self.closed:
                    line, _, rest = bytes(self.inbox).partition(b"\n")
                    self.inbox = bytearray(rest)
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                    self.on_message(message)
                if len(self.inbox) > LINE_LIMIT:
                    raise ValueError("line too long")
        except (OSError, ValueError):
            self.close()
            return
        self._update()

    def silent_for(self) -> float:
        """Seconds since the peer last sent anything."""
        return time.monotonic() - self.last_heard

    def close(self) -> None:
        """Close the connection and call ``on_close`` (once)."""
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.sock)
        self.sock.close()
        self.on_close()


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it does not exist or is not (yet) a complete object."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_private(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically, 0600 (the directory is ours and private already)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
