"""foundation: identity, plans, workspaces, members, model prices

Revision ID: 0001
Revises:
Create Date: 2026-11-21 11:16:00.658132
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_prices',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('model_key', sa.String(length=100), nullable=False),
    sa.Column('display_name', sa.String(length=100), nullable=False),
    sa.Column('vendor', sa.String(length=100), nullable=False),
    sa.Column('modality', sa.Enum('TEXT', 'IMAGE', 'VIDEO', 'AUDIO', 'EMBEDDING', 'OTHER', name='modality', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('units_per_generation', sa.BigInteger(), nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('units_per_generation >= 0', name=op.f('ck_model_prices_price_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_prices')),
    sa.UniqueConstraint('model_key', name=op.f('uq_model_prices_model_key'))
    )
    op.create_table('plans',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('seat_cap', sa.Integer(), nullable=False),
    sa.Column('free_creator_seats', sa.Integer(), nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('free_creator_seats >= 0 AND free_creator_seats <= seat_cap', name=op.f('ck_plans_free_creator_seats_range')),
    sa.CheckConstraint('seat_cap > 0', name=op.f('ck_plans_seat_cap_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans')),
    sa.UniqueConstraint('key', name=op.f('uq_plans_key'))
    )
    op.create_table('users',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.Enum('human', 'service', name='user_kind', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=True),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('is_operator', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("kind = 'service' OR email IS NOT NULL", name=op.f('ck_users_human_has_email')),
    sa.CheckConstraint('email = lower(email)', name=op.f('ck_users_email_lowercase')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('email', name=op.f('uq_users_email'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('token_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_index('ix_api_tokens_user_id', 'api_tokens', ['user_id'], unique=False)
    op.create_table('workspaces',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('plan_id', sa.Uuid(), nullable=False),
    sa.Column('allocation_mode', sa.Enum('POOLED', 'PER_SEAT', name='allocation_mode', native_enum=False, create_constraint=True, length=32), server_default='POOLED', nullable=False),
    sa.Column('paid_creator_seats', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('paid_creator_seats >= 0', name=op.f('ck_workspaces_paid_creator_seats_not_negative')),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_workspaces_plan_id_plans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workspaces'))
    )
    op.create_index(op.f('ix_workspaces_plan_id'), 'workspaces', ['plan_id'], unique=False)
    op.create_table('members',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('role', sa.Enum('owner', 'admin', 'billing_manager', 'member', name='member_role', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('seat', sa.Enum('creator', 'standard', name='member_seat', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_members_user_id_users')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_members_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_members'))
    )
    op.create_index('ix_members_user_id', 'members', ['user_id'], unique=False)
    op.create_index('uq_members_active_user', 'members', ['workspace_id', 'user_id'], unique=True, postgresql_where=sa.text('removed_at IS NULL'))

    # Reference data: the plans a new workspace can choose. Operators add more later; fixed
    # ids keep every database created from these migrations alike.
    plans = sa.table(
        "plans",
        sa.column("id", sa.Uuid()),
        sa.column("key", sa.String()),
        sa.column("name", sa.String()),
        sa.column("seat_cap", sa.Integer()),
        sa.column("free_creator_seats", sa.Integer()),
    )
    op.bulk_insert(
        plans,
        [
            {"id": uuid.UUID(int=1), "key": "starter", "name": "Starter", "seat_cap": 5, "free_creator_seats": 1},
            {"id": uuid.UUID(int=2), "key": "team", "name": "Team", "seat_cap": 20, "free_creator_seats": 3},
            {"id": uuid.UUID(int=3), "key": "enterprise", "name": "Enterprise", "seat_cap": 500, "free_creator_seats": 25},
        ],
    )


def downgrade() -> None:
    op.drop_index('uq_members_active_user', table_name='members', postgresql_where=sa.text('removed_at IS NULL'))
    op.drop_index('ix_members_user_id', table_name='members')
    op.drop_table('members')
    op.drop_index(op.f('ix_workspaces_plan_id'), table_name='workspaces')
    op.drop_table('workspaces')
    op.drop_index('ix_api_tokens_user_id', table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_table('plans')
    op.drop_table('model_prices')
