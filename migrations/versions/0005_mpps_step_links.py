"""MPPS steps belong to every study they were scheduled for and every study holding a series
they made

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


def _link_table(name: str, column: str) -> sa.Table:
    """(step_id, `column`): one row per UID a step is linked to, found by that UID."""
    table = op.create_table(
        name,
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column(column, sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["mpps_steps.id"],
            name=op.f(f"fk_{name}_step_id_mpps_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("step_id", column, name=op.f(f"pk_{name}")),
    )
    op.create_index(op.f(f"ix_{name}_{column}"), name, [column])
    return table


def upgrade() -> None:
    studies = _link_table("mpps_step_studies", "study_uid")
    series = _link_table("mpps_step_series", "series_uid")
    steps = sa.table(
        "mpps_steps",
        sa.column("id", sa.Integer),
        sa.column("study_uid", sa.String),
        sa.column("performed", sa.JSON),
    )
    rows = op.get_bind().execute(sa.select(steps.c.id, steps.c.study_uid, steps.c.performed))
    study_rows, series_rows = [], []
    for step_id, study_uid, performed in rows:
        study_rows.append({"step_id": step_id, "study_uid": study_uid})
        series_rows += [
            {"step_id": step_id, "series_uid": uid}
            for uid in dict.fromkeys((performed or {}).get("series", []))
        ]
    for table, found in ((studies, study_rows), (series, series_rows)):
        if found:
            op.bulk_insert(table, found)
    op.drop_index("ix_mpps_steps_study_uid", table_name="mpps_steps")


def downgrade() -> None:
    op.create_index("ix_mpps_steps_study_uid", "mpps_steps", ["study_uid"])
    for name, column in (("mpps_step_series", "series_uid"), ("mpps_step_studies", "study_uid")):
        op.drop_index(op.f(f"ix_{name}_{column}"), table_name=name)
        op.drop_table(name)
