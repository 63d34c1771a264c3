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
    stmt = sa.select(Image.job_id, Image.id, Image.path).where(Image.status == "pending").order_by(Image.id)
    if job_id is not None:
        stmt = stmt.where(Image.job_id == job_id)
    with session_factory(database_url)() as session:
        by_job: dict[int, list[tuple[int, str]]] = {}
        for job, image_id, path in session.execute(stmt):
            by_job.setdefault(job, []).append((image_id, path))
    if not by_job:
        return 0
    with app.connection_for_write(broker_url) as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except Exception as exc:  # kombu wraps every transport error differently
            raise EnqueueError(f"cannot reach the broker at {mask_url(broker_url)}: {exc}") from exc
        with app.amqp.Producer(conn) as producer:
            for job, images in by_job.items():  # ordered as enqueue orders them, so batches stay unpadded
                publish(producer, job, by_aspect(images), queue, per_message)
    return sum(len(images) for images in by_job.values())
