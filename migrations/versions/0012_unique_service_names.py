"""users: one service account per name (a partial unique index on service accounts' names)

A service account is known by its name: `creditpool create-service-token --name N` issues a token
to the account named N, creating it if there is none. It looked the name up and then created the
account, so two runs racing on a new name could create two accounts of that name. The index makes
the second wait for the first and then reuse its account.

Duplicates made before this keep their ids, tokens and history: the oldest of each name keeps
it (the account the command picked), each other one gets its id appended (` (<uuid>)`, the name
cut to keep within 100 characters), so an operator can still tell them apart and revoke their
tokens. A downgrade drops the index and leaves those names as they are.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE users SET name = left(users.name, 100 - 39) || ' (' || users.id::text || ')' "
        "FROM (SELECT id, row_number() OVER (PARTITION BY name ORDER BY created_at, id) AS n "
        "      FROM users WHERE kind = 'service') AS d "
        "WHERE users.id = d.id AND d.n > 1"
    )
    op.create_index("uq_users_service_name", "users", ["name"], unique=True,
                    postgresql_where=sa.text("kind = 'service'"))


def downgrade() -> None:
    op.drop_index("uq_users_service_name", table_name="users", postgresql_where=sa.text("kind = 'service'"))
