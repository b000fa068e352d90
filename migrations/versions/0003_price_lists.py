"""price lists: versioned catalog, model price specs, generations keep their version

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "price_lists",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.String(length=500), nullable=True),
        sa.Column("time_windows", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"),
                  nullable=False),
        sa.Column("plan_multipliers", postgresql.JSONB(astext_type=sa.Text()),
                  server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("published_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["published_by"], ["users.id"], name=op.f("fk_price_lists_published_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_lists")),
        sa.UniqueConstraint("version", name=op.f("uq_price_lists_version")),
    )
    op.create_index(op.f("ix_price_lists_effective_at"), "price_lists", ["effective_at"], unique=False)
    # Version 1 holds the simple cost table as it was (base charge = the old per-generation price),
    # in force since the epoch so that any version published later supersedes it.
    op.execute("INSERT INTO price_lists (id, version, effective_at, note) VALUES (gen_random_uuid(), 1, "
               "'1970-01-01T00:00:00Z', 'the cost table before versioned price lists')")

    op.add_column("model_prices", sa.Column("price_list_id", sa.Uuid(), nullable=True))
    op.add_column("model_prices", sa.Column("spec", postgresql.JSONB(astext_type=sa.Text()),
                                            server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.execute("UPDATE model_prices SET price_list_id = (SELECT id FROM price_lists WHERE version = 1), "
               "spec = jsonb_build_object('base', trim_scale(units_per_generation::numeric / 1000)::text)")
    op.alter_column("model_prices", "price_list_id", nullable=False)
    op.create_foreign_key(op.f("fk_model_prices_price_list_id_price_lists"), "model_prices", "price_lists",
                          ["price_list_id"], ["id"])
    op.drop_constraint(op.f("uq_model_prices_model_key"), "model_prices", type_="unique")
    op.create_unique_constraint(op.f("uq_model_prices_price_list_id_model_key"), "model_prices",
                                ["price_list_id", "model_key"])
    op.drop_constraint(op.f("ck_model_prices_price_not_negative"), "model_prices", type_="check")
    op.drop_column("model_prices", "units_per_generation")

    op.add_column("generations", sa.Column("price_list_id", sa.Uuid(), nullable=True))
    op.add_column("generations", sa.Column("quote", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_foreign_key(op.f("fk_generations_price_list_id_price_lists"), "generations", "price_lists",
                          ["price_list_id"], ["id"])


def downgrade() -> None:
    op.drop_constraint(op.f("fk_generations_price_list_id_price_lists"), "generations", type_="foreignkey")
    op.drop_column("generations", "quote")
    op.drop_column("generations", "price_list_id")
    # Back to one row per model: keep the newest version's rows, their base charge as the price.
    op.add_column("model_prices", sa.Column("units_per_generation", sa.BigInteger(), nullable=True))
    op.execute("DELETE FROM model_prices WHERE price_list_id <> "
               "(SELECT id FROM price_lists ORDER BY version DESC LIMIT 1)")
    op.execute("UPDATE model_prices SET units_per_generation = "
               "ceil(coalesce((spec->>'base')::numeric, 0) * 1000)::bigint")
    op.alter_column("model_prices", "units_per_generation", nullable=False)
    op.create_check_constraint(op.f("ck_model_prices_price_not_negative"), "model_prices",
                               "units_per_generation >= 0")
    op.drop_constraint(op.f("uq_model_prices_price_list_id_model_key"), "model_prices", type_="unique")
    op.create_unique_constraint(op.f("uq_model_prices_model_key"), "model_prices", ["model_key"])
    op.drop_constraint(op.f("fk_model_prices_price_list_id_price_lists"), "model_prices", type_="foreignkey")
    op.drop_column("model_prices", "spec")
    op.drop_column("model_prices", "price_list_id")
    op.drop_index(op.f("ix_price_lists_effective_at"), table_name="price_lists")
    op.drop_table("price_lists")
