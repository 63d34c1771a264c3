"""Images by (job_id, id): a job's results are read in id order, a page at a time.

With only the (job_id, status) index, SQLite sorted the whole job again for every page of `results --job`
(work growing with the square of the job's size) and PostgreSQL walked the primary key through other jobs' rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_job_id_id", "images", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_images_job_id_id", table_name="images")
