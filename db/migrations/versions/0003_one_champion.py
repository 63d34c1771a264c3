"""Model versions: at most one champion (a partial unique index), and the sha256 of each version's metadata file.

Rows written before this revision keep ``metadata_sha256`` empty (their metadata is not checked). Should a database
already hold several champions, the one promoted last stays champion and the others go back to ``ready`` first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 23:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHAMPION = sa.text("status = 'champion'")


def upgrade() -> None:
    versions = sa.table(
        "model_versions", sa.column("id", sa.Integer), sa.column("number", sa.Integer),
        sa.column("status", sa.String), sa.column("promoted_at", sa.DateTime(timezone=True)),
    )  # fmt: skip
    bind = op.get_bind()
    champions = bind.execute(
        sa.select(versions.c.id)
        .where(versions.c.status == "champion")
        .order_by(versions.c.promoted_at.desc().nulls_last(), versions.c.number.desc())
    ).scalars().all()  # fmt: skip
    if len(champions) > 1:
        bind.execute(sa.update(versions).where(versions.c.id.in_(champions[1:])).values(status="ready"))

    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("metadata_sha256", sa.String(length=64), nullable=True))
    op.create_index(
        "uq_model_versions_one_champion", "model_versions", ["status"], unique=True,
        sqlite_where=CHAMPION, postgresql_where=CHAMPION,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_champion", table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("metadata_sha256")
