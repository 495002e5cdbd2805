"""The wire between a job kernel's launcher (login node) and its agent (compute node): an event loop and
a TCP byte relay for the five ZMQ channels; the control connection is :mod:`.control`.

Standard library only: the launcher imports it on every job-kernel start, the agent on the node.

* The relay forwards bytes and never looks into them: Jupyter's messages stay signed with the
  connection key end to end (the relay has the key only to authenticate the control connection).
* The control connection carries one JSON object per line. The agent speaks first with a random
  nonce; the launcher proves it holds the connection key with ``HMAC-SHA256(key, "hpck-agent:" +
  nonce)``. A peer that cannot prove it is dropped: the agent's port is reachable from the cluster
  network, the key is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import selectors
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


#: The longest a buffer toward one side grows before we stop reading from the other (backpressure).
BUFFER_LIMIT = 4 << 20
#: One control line at most (a ready message with five ports is ~200 bytes).
LINE_LIMIT = 64 << 10
#: Both ends say something at least this often; silence for :data:`DEAD_AFTER` is a dead peer.
PING_INTERVAL = 5.0
DEAD_AFTER = 30.0
PROTOCOL = 1
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def proof(key: bytes, nonce: str) -> str:
    """What the launcher answers to the agent's ``nonce``: HMAC-SHA256 of it under the connection key."""
    return hmac.new(key, b"hpck-agent:" + nonce.encode(), hashlib.sha256).hexdigest()


def proof_ok(key: bytes, nonce: str, answer: Any) -> bool:
    """Constant-time check of a launcher's answer."""
    return isinstance(answer, str) and hmac.compare_digest(proof(key, nonce), answer)


class Loop:
    """A selectors loop with timers: callbacks on readable/writable file objects, and ``call_later``."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.stopped = False

    def watch(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(mask)`` when ``fileobj`` is ready for ``events`` (0 = stop watching it)."""
        try:
            key = self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            key = None
        if events == 0:
            if key is not None:
                self.selector.unregister(fileobj)
            return
        if key is None:
            self.selector.register(fileobj, events, callback)
        else:
            self.selector.modify(fileobj, events, callback)

    def forget(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` (closed or not)."""
        self.watch(fileobj, 0, lambda _m: None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> int:
        """Run ``callback`` once, ``delay`` seconds from now; returns a handle for :meth:`cancel`."""
        self._seq += 1
        self._timers.append((time.monotonic() + delay, self._seq, callback))
        return self._seq

    def cancel(self, handle: int) -> None:
        """Forget a timer (no-op when it ran already)."""
        self._timers = [t for t in self._timers if t[1] != handle]

    def every(self, interval: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` every ``interval`` seconds until the loop stops."""

        def tick() -> None:
            callback()
            self.call_later(interval, tick)

        self.call_later(interval, tick)

    def run(self) -> None:
        """Dispatch until :meth:`stop`."""
        while not self.stopped:
            now = time.monotonic()
            due = sorted(t for t in self._timers if t[0] <= now)
            if due:
                self._timers = [t for t in self._timers if t[0] > now]
                for _when, _seq, callback in due:
                    callback()
                    if self.stopped:
                        return
                continue
            timeout = min((t[0] for t in self._timers), default=now + 1.0) - now
            for key, mask in self.selector.select(max(0.0, min(timeout, 1.0))):
                key.data(mask)
                if self.stopped:
                    return

    def stop(self) -> None:
        """End :meth:`run` after the current callback."""
        self.stopped = True


class Pipe:
    """One client connection relayed to one backend connection, both ways, non-blocking with backpressure.

    The backend may come later (:meth:`connect`): until then what the client sends is kept (a ZMQ
    greeting, queued requests), up to :data:`BUFFER_LIMIT`.
    """

    def __init__(self, loop: Loop, client: socket.socket, on_close: Callable[[Pipe], None]) -> None:
        self.loop = loop
        self.client = client
        self.backend: socket.socket | None = None
        self.to_backend = bytearray()
        self.to_client = bytearray()
        self.on_close = on_close
        self.closed = False
        client.setblocking(False)
        self._update()

    def connect(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        """Open the backend connection (blocking, bounded) and start relaying; closes the pipe on failure."""
        try:
            backend = socket.create_connection(address, timeout=timeout)
        except OSError:
            self.close()
            return
        backend.setblocking(False)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend = backend
        self._update()

    def _update(self) -> None:
        if self.closed:
            return
        client_events = 0
        if len(self.to_backend) < BUFFER_LIMIT:
            client_events |= selectors.EVENT_READ
        if self.to_client:
            client_events |= selectors.EVENT_WRITE
        self.loop.watch(self.client, client_events, lambda m: self._ready(self.client, m))
        if self.backend is not None:
            backend_events = 0
            if len(self.to_client) < BUFFER_LIMIT:
                backend_events |= selectors.EVENT_READ
            if self.to_backend:
                backend_events |= selectors.EVENT_WRITE
            backend = self.backend
            self.loop.watch(backend, backend_events, lambda m: self._ready(backend, m))

    def _ready(self, sock: socket.socket, mask: int) -> None:
        if self.closed:
            return
        from_client = sock is self.client
        outgoing = self.to_client if from_client else self.to_backend
        incoming = self.to_backend if from_client else self.to_client
        try:
            if mask & selectors.EVENT_WRITE and outgoing:
                sent = sock.send(outgoing)
                del outgoing[:sent]
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:
                    self._flush_and_close()
                    return
                incoming.extend(data)
                other = self.backend if from_client else self.client
                if other is not None:  # send at once: most messages fit, and this saves a loop turn
                    with contextlib.suppress(BlockingIOError):  # the rest waits for EVENT_WRITE
                        sent = other.send(incoming)
                        del incoming[:sent]
        except OSError:
            self.close()
            return
        self._update()

    def _flush_and_close(self) -> None:
        """One side ended: give the other what it was still owed (bounded), then close both."""
        for sock, data in ((self.backend, self.to_backend), (self.client, self.to_client)):
            if sock is not None and data:
                try:
                    sock.setblocking(True)
                    sock.settimeout(1.0)
                    sock.sendall(data)
                except OSError:
                    pass
        self.close()

    def close(self) -> None:
        """Close both connections (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.backend):
            if sock is not None:
                self.loop.forget(sock)
                sock.close()
        self.on_close(self)


class Relay:
    """Listens on the client's five ports and relays each connection to the kernel's port on the node."""

    def __init__(self, loop: Loop, ip: str, ports: dict[str, int]) -> None:
        self.loop = loop
        self.listeners: dict[str, socket.socket] = {}
        self.pipes: dict[str, list[Pipe]] = {name: [] for name in CHANNELS}
        self.backend: dict[str, tuple[str, int]] | None = None
        try:
            for name in CHANNELS:
                sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((ip, ports[name]))
                except OSError:
                    sock.close()
                    raise
                sock.listen(64)
                sock.setblocking(False)
                self.listeners[name] = sock
                loop.watch(sock, selectors.EVENT_READ, self._acceptor(name))
        except OSError:
            self.close()
            raise

    def _acceptor(self, name: str) -> Callable[[int], None]:
        return lambda _mask: self._accept(name)

    def _accept(self, name: str) -> None:
        try:
            conn, _addr = self.listeners[name].accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = Pipe(self.loop, conn, lambda p: self._closed(name, p))
        self.pipes[name].append(pipe)
        if self.backend is not None:
            pipe.connect(self.backend[name])

    def _closed(self, name: str, pipe: Pipe) -> None:
        if pipe in self.pipes[name]:
            self.pipes[name].remove(pipe)

    def point_at(self, backend: dict[str, tuple[str, int]] | None) -> None:
        """Relay to these node addresses from now on (None: hold new connections); connections to an
        earlier kernel are closed (ZMQ reconnects them, to the new one)."""
        self.backend = backend
        for name in CHANNELS:
            for pipe in list(self.pipes[name]):
                if pipe.backend is not None:
                    pipe.close()
                elif backend is not None:
                    pipe.connect(backend[name])

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        for name in CHANNELS:
            for pipe in list(self.pipes.get(name, [])):
                pipe.close()
        for sock in self.listeners.values():
            self.loop.forget(sock)
            sock.close()
        self.listeners.clear()
