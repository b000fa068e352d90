"""auto_topups.claimed_at, claimed_pack_id: an auto top-up claim whose outcome never came is taken over

A spend that sees the pool under the threshold claims the purchase (the `armed` latch goes off)
and commits before the payment provider is asked; the outcome re-arms it. If the process died
in between, or recording the outcome failed, the latch stayed off for good and auto top-up was
silently dead. The claim now records when it was made and which pack it buys, so a claim left in
flight past a timeout is taken over by the next spend under the threshold (or the scheduler),
under the same payment reference and for the same pack: the first attempt may have been paid.

Latches already off when this runs are claims of unknown age: they count as made now (and are
taken over after the timeout), buying the pack their retry would have asked for.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("auto_topups", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("auto_topups", sa.Column("claimed_pack_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("fk_auto_topups_claimed_pack_id_credit_packs"), "auto_topups", "credit_packs",
                          ["claimed_pack_id"], ["id"])
    op.execute("UPDATE auto_topups SET claimed_at = now(), claimed_pack_id = coalesce(unanswered_pack_id, pack_id) "
               "WHERE NOT armed")
    op.create_check_constraint(
        op.f("ck_auto_topups_claim_in_flight"), "auto_topups",
        "armed = (claimed_at IS NULL) AND (claimed_at IS NULL) = (claimed_pack_id IS NULL)")
    op.create_index("ix_auto_topups_claimed_at", "auto_topups", ["claimed_at"], unique=False,
                    postgresql_where=sa.text("claimed_at IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_auto_topups_claimed_at", table_name="auto_topups",
                  postgresql_where=sa.text("claimed_at IS NOT NULL"))
    op.drop_constraint(op.f("ck_auto_topups_claim_in_flight"), "auto_topups", type_="check")
    op.drop_constraint(op.f("fk_auto_topups_claimed_pack_id_credit_packs"), "auto_topups", type_="foreignkey")
    op.drop_column("auto_topups", "claimed_pack_id")
    op.drop_column("auto_topups", "claimed_at")
