"""Lifecycle: job name and labels, completion webhook delivery, per-stage seconds, job log lines,
worker heartbeats.

Revision ID: 0002_lifecycle
Revises: 0001_initial
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_lifecycle"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
JOB_COLUMNS = (
    ("name", sa.String(200)),
    ("webhook_state", sa.String(20)),
    ("webhook_delivery", JSONType),
    ("webhook_lease_until", sa.DateTime(timezone=True)),
    ("stage_seconds", JSONType),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name, type_ in JOB_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_table(
        "job_labels",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
    )
    op.create_index("ix_job_labels_key_value", "job_labels", ["key", "value"])
    op.create_table(
        "job_logs",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("message", sa.String(2000), nullable=False),
    )
    op.create_table(
        "worker_beats",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_worker_beats_last_seen", "worker_beats", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_worker_beats_last_seen", table_name="worker_beats")
    op.drop_table("worker_beats")
    op.drop_table("job_logs")
    op.drop_index("ix_job_labels_key_value", table_name="job_labels")
    op.drop_table("job_labels")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name, _ in reversed(JOB_COLUMNS):
            batch.drop_column(name)
