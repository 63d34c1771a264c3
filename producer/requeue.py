"""Sending the pending images of a job again, from the database (``captcha-queue requeue``).

The database, not the broker, is the record of what is left to do: an image stays ``pending`` until a worker
records its outcome. When queued messages were lost (a Redis restarted without persistence, a queue purged by
hand), requeueing sends a message for every image still pending. An image whose first message survived is simply
decoded twice; the writes are idempotent, so it still ends with one result per model version.
"""

from __future__ import annotations

from core.celery_app import DECODE_QUEUE, app
from core.config import get_settings, mask_url
from producer.aspect import by_aspect
from producer.enqueue import EnqueueError, publish

CHUNK = 20_000  # pending images read and sent at a time


def requeue_pending(
    job_id: int | None = None,
    *,
    queue: str = DECODE_QUEUE,
    paths_per_message: int | None = None,
    database_url: str | None = None,
    broker_url: str | None = None,
) -> int:
    """Publish every pending image of ``job_id`` (or of all jobs) again; returns the number of images sent.

    Raises ``EnqueueError`` when the broker cannot be reached.
    """
    import sqlalchemy as sa

    from db.models import Image
    from db.session import session_factory

    settings = get_settings()
    per_message = paths_per_message or settings.paths_per_message
    broker_url = broker_url or settings.broker_url
    pending = sa.select(Image.job_id).where(Image.status == "pending").distinct().order_by(Image.job_id)
    if job_id is not None:
        pending = pending.where(Image.job_id == job_id)
    sent = 0
    with session_factory(database_url)() as session:
        jobs = session.scalars(pending).all()
        if not jobs:
            return 0
        with app.connection_for_write(broker_url) as conn:
            try:
                conn.ensure_connection(max_retries=1)
            except Exception as exc:  # kombu wraps every transport error differently
                raise EnqueueError(f"cannot reach the broker at {mask_url(broker_url)}: {exc}") from exc
            with app.amqp.Producer(conn) as producer:
                for job in jobs:  # a chunk at a time (a million pending images never sit in memory at once),
                    last_id = 0  # each ordered as enqueue orders them, so batches stay unpadded
                    while True:
                        chunk = session.execute(
                            sa.select(Image.id, Image.path)
                            .where(Image.job_id == job, Image.status == "pending", Image.id > last_id)
                            .order_by(Image.id)
                            .limit(CHUNK)
                        ).all()
                        if not chunk:
                            break
                        publish(producer, job, by_aspect([(i, p) for i, p in chunk]), queue, per_message)
                        sent += len(chunk)
                        last_id = chunk[-1][0]
    return sent
