"""Running ``captcha-queue worker`` as a child process (the demo, the pipeline benchmark and the end-to-end tests).

The child gets its broker, database and checkpoint through ``CAPTCHA_*`` environment variables and logs to a file.
Stopping sends SIGTERM (warm shutdown: the running message finishes and is acknowledged), then SIGKILL if it does
not exit in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class WorkerStartError(RuntimeError):
    """The worker exited or did not report ready in time; the message includes the end of its log."""


class WorkerProcess:
    """A ``captcha-queue worker`` subprocess; use as a context manager (always stopped on exit)."""

    def __init__(
        self,
        log_path: Path,
        queues: str = "decode",
        concurrency: int = 1,
        device: str = "cpu",
        batch_size: int | None = None,
        env: Mapping[str, str] | None = None,
        loglevel: str = "info",
    ) -> None:
        self.log_path = Path(log_path)
        self.args = [
            sys.executable, "-m", "core.cli", "worker", "--queues", queues, "--concurrency", str(concurrency),
            "--device", device, "--loglevel", loglevel,
        ]  # fmt: skip
        if batch_size is not None:
            self.args += ["--batch-size", str(batch_size)]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until Celery reports it ready (consuming its queues)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + ready_timeout
        try:
            while "ready." not in self.log():
                if self.process.poll() is not None:
                    raise WorkerStartError(
                        f"worker exited with status {self.process.returncode}:\n{self.log()[-4000:]}"
                    )
                if time.monotonic() > deadline:
                    raise WorkerStartError(f"worker not ready after {ready_timeout:.0f} s:\n{self.log()[-4000:]}")
                time.sleep(0.1)
        except BaseException:  # not ready, or interrupted while waiting (__exit__ does not run then): stop it here
            self.stop()
            raise
        return self

    def log(self) -> str:
        """Everything the worker has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
