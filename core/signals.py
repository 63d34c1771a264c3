"""Holding Ctrl-C and SIGTERM back while a step that must not be cut in two completes.

A checkpoint's weights and the JSON that names their sha256 are two files: an interrupt landing between the two
writes would leave weights their JSON refuses (the checkpoint unloadable, a run impossible to resume).
``held_signals`` defers SIGINT and SIGTERM until the block ends, then delivers them to the handlers that were set
before. Only for steps that take moments: a block that waits on the network would leave Ctrl-C unanswered.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block ends, then deliver them. Outside the main thread, where handlers
    cannot be set, it does nothing; a handler set outside Python (``getsignal`` says None, as when Python is
    embedded) could not be put back, so that signal is not held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:
            previous[signum] = signal.signal(signum, lambda received, frame: held.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)
