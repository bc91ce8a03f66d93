"""delivery verification, report kinds, audit trail

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_hash")),
    )
    op.create_index(op.f("ix_audit_study_uid"), "audit", ["study_uid"])

    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transaction_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("verify_attempts", sa.Integer(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="sr", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("kind")

    with op.batch_alter_table("dispatches", schema=None) as batch_op:
        batch_op.drop_column("verify_attempts")
        batch_op.drop_column("transaction_uid")

    op.drop_index(op.f("ix_audit_study_uid"), table_name="audit")
    op.drop_table("audit")
