"""The retraining Celery task: a thin wrapper around ``core.retrain.run_retrain`` on the ``train`` queue.

Delivery: the task is acknowledged when it starts (``acks_late=False``), unlike decoding. Redis hands an
unacknowledged message to another worker after the broker's visibility timeout (one setting for every queue of the
connection), so a late-acknowledged training run longer than it would run twice; raising the timeout above the
longest training would also delay the redelivery of decode messages from killed workers by as long. A worker killed
mid-run therefore loses the run (it stays ``running`` in ``captcha-queue models`` and publishes nothing; send it
again). On top of that, ``run_retrain`` claims the run by its task id in the database, so a message that arrives
twice anyway (a restored reservation, a resend with the same id) trains once.

Progress: each epoch updates the run row and sends a ``task-progress`` event (epoch, losses, validation accuracy),
which Flower shows with the task's other events.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from celery import Task
from celery.exceptions import Reject

from core.celery_app import TRAIN_TASK, app

log = logging.getLogger(__name__)


def _json_safe(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if isinstance(v, (str, int, float, bool)) or v is None}


@app.task(name=TRAIN_TASK, bind=True, ignore_result=True, acks_late=False, reject_on_worker_lost=False)
def train(self: Task, request: dict) -> dict:
    """Run one retraining request (``core.retrain.RetrainRequest`` as JSON); returns what it published."""
    import torch

    from core.config import get_settings
    from core.retrain import RetrainError, RetrainRequest, fail_queued_run, run_retrain
    from db.session import session_factory
    from worker.runtime import torch_threads

    settings = get_settings()
    try:
        parsed = RetrainRequest.from_json(request)
    except RetrainError as exc:
        log.error("training task %s: rejecting malformed request: %s", self.request.id, exc)
        try:  # the run row `retrain` created would otherwise stay queued for ever
            fail_queued_run(session_factory(settings.database_url), str(self.request.id), str(exc))
        except Exception:
            log.exception("training task %s: could not record the refusal", self.request.id)
        raise Reject(str(exc), requeue=False) from exc
    torch.set_num_threads(torch_threads(settings))

    def on_progress(event: dict[str, Any]) -> None:
        self.send_event("task-progress", **_json_safe(event))

    outcome = run_retrain(self.request.id, parsed, session_factory(settings.database_url), on_progress=on_progress)
    return {k: v for k, v in asdict(outcome).items() if k != "metrics"}
