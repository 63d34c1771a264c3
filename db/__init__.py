"""captcha-queue database layer: typed models, per-process engines, Alembic migrations, repository and queries.

Importing this package does not import torch or Celery.
"""
