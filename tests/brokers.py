"""Brokers that misbehave, for tests of what the commands do when the broker stops answering."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


@contextlib.contextmanager
def silent_broker() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


@contextlib.contextmanager
def stalling_proxy(redis_url: str, stall_on: bytes = b"LPUSH") -> Iterator[str]:
    """A Redis URL that forwards to ``redis_url`` until a client sends a command containing ``stall_on`` (Kombu
    publishes with LPUSH), and from then on forwards nothing on that connection: the publish hangs, the rest of the
    command worked."""
    target = urlsplit(redis_url)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()
    sockets: list[socket.socket] = [server]

    def pump(src: socket.socket, dst: socket.socket, watch: bool) -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                data = src.recv(65536)
                if not data or (watch and stall_on in data.upper()):
                    return  # stalled: the command is swallowed and the connection left open
                dst.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                client, _ = server.accept()
                upstream = socket.create_connection((target.hostname or "127.0.0.1", target.port or 6379))
                sockets.extend((client, upstream))
                threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}{target.path or '/0'}"
    finally:
        stop.set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
