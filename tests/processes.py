"""Helpers for tests that run a command as a child process and stop it part-way."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def interrupt_when(
    proc: subprocess.Popen, ready: Callable[[], bool], signum: int, timeout: float = 60, exit_within: float = 120
) -> None:
    """Poll ``ready()`` until it holds, then send ``signum`` to ``proc`` and wait for it to exit (killed on any
    failure, so no child outlives the test)."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError("the command never reached the point to interrupt")
            time.sleep(0.2)
        time.sleep(0.5)  # well into the call that hangs
        assert proc.poll() is None, "the command ended before it was interrupted"
        proc.send_signal(signum)
        proc.wait(timeout=exit_within)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
