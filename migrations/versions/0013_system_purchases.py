"""purchases: an auto top-up's purchase has no purchaser (purchased_by may be NULL)

An auto top-up is bought by the system, under the standing instruction of whoever turned it on,
who may have left the workspace since: it was recorded in that member's name. It is now recorded
with no purchaser (and no actor on its grant and ledger entry); its audit entry
(`autotopup.purchased`) names who turned auto top-up on. Purchases recorded before keep their
purchaser. A downgrade gives the system's purchases the workspace's auto top-up's enabler back.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-21
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("purchases", "purchased_by", nullable=True)


def downgrade() -> None:
    op.execute(
        "UPDATE purchases SET purchased_by = a.enabled_by FROM auto_topups a "
        "WHERE purchases.purchased_by IS NULL AND a.workspace_id = purchases.workspace_id"
    )
    op.alter_column("purchases", "purchased_by", nullable=False)
