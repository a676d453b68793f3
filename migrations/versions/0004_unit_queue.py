"""Job units keep their Celery queue: a stale unit is re-sent to the queue it was fanned out on,
whichever worker's sweep finds it.

Revision ID: 0004_unit_queue
Revises: 0003_units
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_unit_queue"
down_revision: str | None = "0003_units"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_units") as batch:  # batch: SQLite's ALTER TABLE is limited
        batch.add_column(sa.Column("queue", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_units") as batch:
        batch.drop_column("queue")
