"""MPPS steps find their study by the series they made, too

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    series = op.create_table(
        "mpps_step_series",
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["mpps_steps.id"],
            name=op.f("fk_mpps_step_series_step_id_mpps_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("step_id", "series_uid", name=op.f("pk_mpps_step_series")),
    )
    op.create_index(op.f("ix_mpps_step_series_series_uid"), "mpps_step_series", ["series_uid"])
    steps = sa.table("mpps_steps", sa.column("id", sa.Integer), sa.column("performed", sa.JSON))
    conn = op.get_bind()
    rows = [
        {"step_id": step_id, "series_uid": uid}
        for step_id, performed in conn.execute(sa.select(steps.c.id, steps.c.performed))
        for uid in dict.fromkeys((performed or {}).get("series", []))
    ]
    if rows:
        op.bulk_insert(series, rows)


def downgrade() -> None:
    op.drop_index(op.f("ix_mpps_step_series_series_uid"), table_name="mpps_step_series")
    op.drop_table("mpps_step_series")
