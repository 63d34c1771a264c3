"""The one Celery application of the project and its configuration.

Producers send tasks by name (``app.send_task("worker.decode", ...)``), so importing this module never imports
torch or the worker code; workers import ``worker.tasks`` through ``include``.

Delivery guarantees (see README, "Design"):

* JSON only, in both directions: a message from the broker is never unpickled.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after its task finished, and goes
  back to the queue when the worker process running it dies. Delivery is at-least-once, which is safe because
  ``db.repository.record_outcomes`` upserts on ``(image_id, model_version)``.
* ``worker_prefetch_multiplier = 1``: a worker process reserves one message at a time, so a slow worker never sits
  on work that an idle one could take.
* ``visibility_timeout``: Redis hands an unacknowledged message to another worker after this many seconds. It must
  exceed the longest decode task (a message of 64 images takes seconds, about a minute on the slowest CPU model); a
  message reserved by a worker that was killed outright comes back after it. ``CAPTCHA_VISIBILITY_TIMEOUT``
  (seconds, ``Settings.visibility_timeout``, so also from ``.env``) overrides it. Long tasks (retraining) must
  acknowledge early instead.
"""

from __future__ import annotations

from celery import Celery

from core.config import get_settings

DECODE_TASK = "worker.decode"
DECODE_QUEUE = "decode"
TRAIN_QUEUE = "train"
TRAIN_TASK = "worker.train"



class CeleryConfig:
    """Celery settings (lower-case names, loaded with ``app.config_from_object``)."""

    broker_url = get_settings().broker_url
    broker_connection_retry_on_startup = True
    broker_connection_max_retries = None  # a worker waits for its broker forever instead of exiting
    # a producer whose broker restarts reconnects and publishes again (0 s, 0.5 s, ... at most 2 s apart, about 50 s)
    task_publish_retry = True
    task_publish_retry_policy = {"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}
    # a broker that accepts connections and stops answering fails a call after 30 s instead of hanging it forever
    broker_transport_options = {
        "visibility_timeout": get_settings().visibility_timeout,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
    }

    task_serializer = "json"
    result_serializer = "json"
    accept_content = ["json"]
    result_accept_content = ["json"]
    event_serializer = "json"

    # no results: a worker also refuses every compressed payload (worker.consumer.refuse_compressed), so a result
    # backend, if one is ever set, must not use result_compression
    result_backend = None
    task_ignore_result = True

    task_acks_late = True
    task_reject_on_worker_lost = True
    worker_prefetch_multiplier = 1

    task_default_queue = DECODE_QUEUE
    task_routes = {
        DECODE_TASK: {"queue": DECODE_QUEUE},
        "worker.train*": {"queue": TRAIN_QUEUE},
    }

    include = ["worker.tasks", "worker.train_task"]
    # no malformed message stops a worker, and compressed ones are refused (see worker.consumer)
    worker_consumer = "worker.consumer:GuardedConsumer"
    worker_send_task_events = True
    task_send_sent_event = False


app = Celery("captcha_queue")
app.config_from_object(CeleryConfig)
