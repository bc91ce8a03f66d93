"""operator console: sessions, destination probes, indexes for its pages

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "destination_probes",
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("probed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("destination", name=op.f("pk_destination_probes")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_expires_at"), "console_sessions", ["expires_at"])
    # (study_id, study_version, calling_ae) and (study_id, state) serve every look-up by
    # study_id too.
    op.create_index("ix_instances_study", "instances", ["study_id", "study_version", "calling_ae"])
    op.drop_index("ix_instances_study_id", table_name="instances")
    op.create_index("ix_instances_calling_ae_study_id", "instances", ["calling_ae", "study_id"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_jobs_study_id_state", "jobs", ["study_id", "state"])
    op.drop_index("ix_jobs_study_id", table_name="jobs")
    op.create_index(op.f("ix_reports_created_at"), "reports", ["created_at"])
    op.create_index("ix_dispatches_destination_sent_at", "dispatches", ["destination", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_dispatches_destination_sent_at", table_name="dispatches")
    op.drop_index(op.f("ix_reports_created_at"), table_name="reports")
    op.create_index("ix_jobs_study_id", "jobs", ["study_id"])
    op.drop_index("ix_jobs_study_id_state", table_name="jobs")
    op.drop_index("ix_instances_received_at", table_name="instances")
    op.drop_index("ix_instances_calling_ae_study_id", table_name="instances")
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.drop_index("ix_instances_study", table_name="instances")
    op.drop_index(op.f("ix_console_sessions_expires_at"), table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("destination_probes")
