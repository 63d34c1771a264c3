"""The worker's message consumer: no message, however malformed, may stop a worker.

Celery's consumer rejects what it recognises as invalid (an unknown task, a disallowed content type, a body that does
not decode), but any other exception raised while it reads a message (a body of ``[1]``, a list as the ``task``
header, a non-numeric time limit) ends the worker, and the message, never acknowledged, goes back to the queue to
end the next worker that takes it. ``GuardedConsumer`` rejects such a message without requeueing it and goes on.

kombu also decompresses any message that names a ``compression`` header before anything else looks at it, without
a size limit: 1 KB of bzip2 grows into gigabytes in the worker. Nothing in this project compresses its messages, so
``refuse_compressed`` makes every decompressor refuse instead; the message is then rejected as malformed.
"""

from __future__ import annotations

import logging

import kombu.compression
from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


class GuardedConsumer(Consumer):
    """A Celery consumer that rejects (without requeueing) a message whose reading raises, instead of dying."""

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors or ())

        def on_task_received(message):
            try:
                return handle(message)
            except connection_errors:
                raise  # the consumer reconnects: not the message's fault
            except Exception as exc:
                log.error("rejecting a malformed message (%s: %.200s)", type(exc).__name__, exc)
                return self.on_invalid_task(None, message, exc)

        return on_task_received


def _refuse(body: bytes) -> bytes:
    raise ValueError("compressed messages are refused (this project never compresses its messages)")


def refuse_compressed() -> None:
    """Make every kombu decompressor (zlib, bzip2, lzma, zstd, ...) refuse its input."""
    for content_type in list(kombu.compression._decoders):  # kombu has no public way to unregister one
        kombu.compression._decoders[content_type] = _refuse


refuse_compressed()
