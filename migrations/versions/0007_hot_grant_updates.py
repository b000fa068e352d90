"""grants: balance updates stay heap-only (HOT)

A grant's `remaining` and `held` change on every hold and settlement. While an index referenced
them (the two partial indexes' predicates did), every such UPDATE was a non-HOT update: a new
entry in each of the table's four indexes, and dead versions of a hot pool grant piled up in the
heap and the indexes until autovacuum came (measured: 3,454 updates of two grants, none HOT, in
a 10 s benchmark). The predicates now read `live`, a stored generated column that changes only
when a grant runs out or comes back, so ordinary balance updates are HOT: the new version goes on
the same page, nothing is added to any index, and page pruning reclaims the old one. Fillfactor
80 leaves room on a page for those versions.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE grants SET (fillfactor = 80)")
    # Rewrites the table (a stored generated column), with the new fillfactor.
    op.add_column("grants", sa.Column("live", sa.Boolean(), sa.Computed("remaining > 0 OR held > 0", persisted=True),
                                      nullable=False))
    op.drop_index("ix_grants_live", table_name="grants")
    op.drop_index("ix_grants_expiring", table_name="grants")
    op.create_index("ix_grants_live", "grants", ["workspace_id", "scope", "member_id"], postgresql_where=sa.text("live"))
    op.create_index("ix_grants_expiring", "grants", ["expires_at"],
                    postgresql_where=sa.text("live AND expires_at IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_grants_expiring", table_name="grants")
    op.drop_index("ix_grants_live", table_name="grants")
    op.create_index("ix_grants_expiring", "grants", ["expires_at"],
                    postgresql_where=sa.text("remaining > 0 AND expires_at IS NOT NULL"))
    op.create_index("ix_grants_live", "grants", ["workspace_id", "scope", "member_id"],
                    postgresql_where=sa.text("remaining > 0 OR held > 0"))
    op.drop_column("grants", "live")
    op.execute("ALTER TABLE grants RESET (fillfactor)")
