"""auto_topups.unanswered_pack_id: the retry of an unanswered payment asks for the same pack

When the payment provider does not answer, the payment may have gone through, so the next
attempt asks again under the same payment reference (a new reference could charge twice). That
retry took the pack configured at the time of the retry: after a change of pack, the same
reference was asked for a different amount, and a provider that had taken the first payment
answered "paid" for credits of the new pack. The pack of the unanswered attempt is now kept
until the reference is settled, and the retry asks for exactly that one.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("auto_topups", sa.Column("unanswered_pack_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("fk_auto_topups_unanswered_pack_id_credit_packs"), "auto_topups", "credit_packs",
                          ["unanswered_pack_id"], ["id"])


def downgrade() -> None:
    op.drop_constraint(op.f("fk_auto_topups_unanswered_pack_id_credit_packs"), "auto_topups", type_="foreignkey")
    op.drop_column("auto_topups", "unanswered_pack_id")
