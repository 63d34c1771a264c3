"""Shared fixtures.

Services: tests that need Redis or PostgreSQL use the ``redis_url`` / ``postgres_url`` fixtures. When the service
does not answer, the test is skipped locally and fails under ``CI=true`` (CI must never silently skip them).

Models: ``checkpoint`` (``sample_models.small_checkpoint``) and ``detector`` (that checkpoint loaded on the CPU) are
what the worker, pipeline and bad-input tests decode with; modules that need another network define their own.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

REDIS_URL = os.environ.get("CAPTCHA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("CAPTCHA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1.0):
            return True
    except OSError:
        return False


def _need(url: str, name: str) -> None:
    if _reachable(url):
        return
    message = f"{name} is not reachable at {url}"
    if IN_CI:
        pytest.fail(message + " (CI=true: service tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis (database 15 by default); flushed before use."""
    _need(REDIS_URL, "Redis")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return REDIS_URL


@pytest.fixture()
def postgres_url() -> str:
    """URL of a fresh, empty PostgreSQL schema (dropped after the test)."""
    _need(POSTGRES_URL, "PostgreSQL")
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = POSTGRES_URL + ("&" if "?" in POSTGRES_URL else "?") + f"options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture()
def silent_broker_url():
    """A Redis URL whose server accepts connections and never answers (``brokers.silent_broker``)."""
    from brokers import silent_broker

    with silent_broker() as url:
        yield url


@pytest.fixture()
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'captcha-queue.db'}"


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """40 synthetic CAPTCHAs with exact boxes (seed 11), in the seed layout: ``images/`` and ``labels/``."""
    from core.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 40, seed=11, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from sample_models import small_checkpoint

    return small_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def detector(checkpoint):
    from core.detector import Detector

    return Detector.load(checkpoint, device="cpu")
