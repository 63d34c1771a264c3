"""The worker side of the queue: Celery tasks that decode messages of image paths and record the outcomes."""
