"""overage_requests: an index on (limit_id, period_start)

Every start under a spend limit sums the approved overages of its limit's period
(`limits._approved`, inside the charge's conditional UPDATE), and the lapse rule, decisions and
the scheduler's alert round look requests up by limit too. The only index was (workspace_id,
requested_at), so each of those read the whole table: every request of every workspace ever
made, growing without bound. A plain CREATE INDEX: the table is small next to the ledger (each
row is a person asking), so the short lock it takes is acceptable during a deploy.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_overage_requests_limit_period", "overage_requests", ["limit_id", "period_start"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_overage_requests_limit_period", table_name="overage_requests")
