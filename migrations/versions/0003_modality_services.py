"""modality services: MPPS steps, storage commitment requests, why a version closed

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "closed_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_closed_versions_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_closed_versions")),
        sa.UniqueConstraint(
            "study_id", "version", name=op.f("uq_closed_versions_study_id_version")
        ),
    )
    op.create_index(op.f("ix_closed_versions_study_id"), "closed_versions", ["study_id"])

    op.create_table(
        "mpps_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("performed", sa.JSON(), nullable=False),
        sa.Column("discontinued_reason", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_version", sa.Integer(), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpps_steps")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_mpps_steps_sop_instance_uid")),
    )
    op.create_index(op.f("ix_mpps_steps_study_uid"), "mpps_steps", ["study_uid"])

    op.create_table(
        "commitment_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requested", sa.JSON(), nullable=False),
        sa.Column("committed", sa.JSON(), nullable=True),
        sa.Column("failed", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commitment_requests")),
        sa.UniqueConstraint(
            "calling_ae",
            "transaction_uid",
            name=op.f("uq_commitment_requests_calling_ae_transaction_uid"),
        ),
    )


def downgrade() -> None:
    op.drop_table("commitment_requests")
    op.drop_index(op.f("ix_mpps_steps_study_uid"), table_name="mpps_steps")
    op.drop_table("mpps_steps")
    op.drop_index(op.f("ix_closed_versions_study_id"), table_name="closed_versions")
    op.drop_table("closed_versions")
