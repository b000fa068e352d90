"""generations: the billing group a generation started in

A generation belongs to the billing group its member was in when it started: its hold drew that
group's grants and counted in that group's spend limits. An extra captured above the hold at
completion is part of the same generation, so it draws with that group too, not with whatever
group the member is in by the time the worker reports (which spent another group's reservation
without counting in its limits). Generations still running at the upgrade take their member's
group as it is now (what the extra drew with before); settled ones keep NULL.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("billing_group_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("fk_generations_billing_group_id_billing_groups"), "generations", "billing_groups",
                          ["billing_group_id"], ["id"])
    op.execute("""
        UPDATE generations g SET billing_group_id = m.billing_group_id
        FROM members m WHERE m.id = g.member_id AND g.status = 'STARTED'
    """)


def downgrade() -> None:
    op.drop_constraint(op.f("fk_generations_billing_group_id_billing_groups"), "generations", type_="foreignkey")
    op.drop_column("generations", "billing_group_id")
