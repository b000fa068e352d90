"""ledger: credit packs, grants, purchases, generations, ledger entries, idempotency keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 11:20:45.852546
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION creditpool_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$
"""


def upgrade() -> None:
    op.create_table('credit_packs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('price_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('expires_after_days', sa.Integer(), nullable=True),
    sa.Column('is_active', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('expires_after_days IS NULL OR expires_after_days > 0', name=op.f('ck_credit_packs_expiry_positive')),
    sa.CheckConstraint('price_minor >= 0', name=op.f('ck_credit_packs_price_not_negative')),
    sa.CheckConstraint('units > 0', name=op.f('ck_credit_packs_units_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credit_packs'))
    )
    op.create_table('idempotency_keys',
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('actor_id', sa.Uuid(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('operation', sa.String(length=50), nullable=False),
    sa.Column('request_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('result_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['actor_id'], ['users.id'], name=op.f('fk_idempotency_keys_actor_id_users')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_idempotency_keys_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('workspace_id', 'actor_id', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_table('generations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('member_id', sa.Uuid(), nullable=False),
    sa.Column('requested_by', sa.Uuid(), nullable=False),
    sa.Column('model_key', sa.String(length=100), nullable=False),
    sa.Column('parameters', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('status', sa.Enum('STARTED', 'COMPLETED', 'FAILED', 'TIMED_OUT', name='generation_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('quoted_units', sa.BigInteger(), nullable=False),
    sa.Column('captured_units', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('released_units', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('shortfall_units', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('failure_kind', sa.Enum('TECHNICAL', 'CANCELLED', 'POLICY_VIOLATION', name='failure_kind', native_enum=False, create_constraint=True, length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('settled_by', sa.Uuid(), nullable=True),
    sa.CheckConstraint('quoted_units >= 0 AND captured_units >= 0 AND released_units >= 0 AND shortfall_units >= 0', name=op.f('ck_generations_figures_not_negative')),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_generations_member_id_members')),
    sa.ForeignKeyConstraint(['requested_by'], ['users.id'], name=op.f('fk_generations_requested_by_users')),
    sa.ForeignKeyConstraint(['settled_by'], ['users.id'], name=op.f('fk_generations_settled_by_users')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_generations_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generations'))
    )
    op.create_index('ix_generations_member', 'generations', ['member_id'], unique=False)
    op.create_index('ix_generations_workspace_created', 'generations', ['workspace_id', 'created_at'], unique=False)
    op.create_table('grants',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('scope', sa.Enum('SEAT', 'GROUP', 'WORKSPACE', name='grant_scope', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('member_id', sa.Uuid(), nullable=True),
    sa.Column('source', sa.Enum('PLAN_ALLOWANCE', 'TRIAL', 'PURCHASE', 'ADD_ON', 'PROMOTION', 'ENTERPRISE_COMMIT', 'ROLLOVER', 'REFUND', 'ADJUSTMENT', name='grant_source', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('priority', sa.Integer(), server_default='100', nullable=False),
    sa.Column('effective_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('remaining', sa.BigInteger(), nullable=False),
    sa.Column('held', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('captured', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('expired', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('transferred_out', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('external_ref', sa.String(length=200), nullable=True),
    sa.Column('reason', sa.String(length=500), nullable=True),
    sa.Column('created_by', sa.Uuid(), nullable=True),
    sa.Column('parent_grant_id', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(scope = 'SEAT') = (member_id IS NOT NULL)", name=op.f('ck_grants_seat_has_member')),
    sa.CheckConstraint('amount = remaining + held + captured + expired + transferred_out', name=op.f('ck_grants_conserved')),
    sa.CheckConstraint('amount > 0', name=op.f('ck_grants_amount_positive')),
    sa.CheckConstraint('expires_at IS NULL OR expires_at > effective_at', name=op.f('ck_grants_expires_after_effective')),
    sa.CheckConstraint('remaining >= 0 AND held >= 0 AND captured >= 0 AND expired >= 0 AND transferred_out >= 0', name=op.f('ck_grants_figures_not_negative')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_grants_created_by_users')),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_grants_member_id_members')),
    sa.ForeignKeyConstraint(['parent_grant_id'], ['grants.id'], name=op.f('fk_grants_parent_grant_id_grants')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_grants_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_grants'))
    )
    op.create_index('ix_grants_live', 'grants', ['workspace_id', 'scope', 'member_id'], unique=False, postgresql_where=sa.text('remaining > 0 OR held > 0'))
    op.create_index(op.f('ix_grants_workspace_id'), 'grants', ['workspace_id'], unique=False)
    op.create_table('purchases',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('pack_id', sa.Uuid(), nullable=False),
    sa.Column('payment_reference', sa.String(length=200), nullable=False),
    sa.Column('provider', sa.String(length=50), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('price_minor', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('grant_id', sa.Uuid(), nullable=False),
    sa.Column('purchased_by', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['grant_id'], ['grants.id'], name=op.f('fk_purchases_grant_id_grants')),
    sa.ForeignKeyConstraint(['pack_id'], ['credit_packs.id'], name=op.f('fk_purchases_pack_id_credit_packs')),
    sa.ForeignKeyConstraint(['purchased_by'], ['users.id'], name=op.f('fk_purchases_purchased_by_users')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_purchases_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_purchases')),
    sa.UniqueConstraint('payment_reference', name=op.f('uq_purchases_payment_reference'))
    )
    op.create_index(op.f('ix_purchases_workspace_id'), 'purchases', ['workspace_id'], unique=False)
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('workspace_id', sa.Uuid(), nullable=False),
    sa.Column('grant_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.Enum('GRANT', 'HOLD', 'RELEASE', 'CAPTURE', 'EXPIRE', 'TRANSFER_OUT', name='entry_kind', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('cause', sa.Enum('PURCHASE', 'GRANT', 'GENERATION', 'EXPIRY', 'TRANSFER', 'ADJUSTMENT', name='entry_cause', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('generation_id', sa.Uuid(), nullable=True),
    sa.Column('purchase_id', sa.Uuid(), nullable=True),
    sa.Column('transfer_id', sa.Uuid(), nullable=True),
    sa.Column('member_id', sa.Uuid(), nullable=True),
    sa.Column('actor_id', sa.Uuid(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('amount > 0', name=op.f('ck_ledger_entries_amount_positive')),
    sa.ForeignKeyConstraint(['actor_id'], ['users.id'], name=op.f('fk_ledger_entries_actor_id_users')),
    sa.ForeignKeyConstraint(['generation_id'], ['generations.id'], name=op.f('fk_ledger_entries_generation_id_generations')),
    sa.ForeignKeyConstraint(['grant_id'], ['grants.id'], name=op.f('fk_ledger_entries_grant_id_grants')),
    sa.ForeignKeyConstraint(['member_id'], ['members.id'], name=op.f('fk_ledger_entries_member_id_members')),
    sa.ForeignKeyConstraint(['purchase_id'], ['purchases.id'], name=op.f('fk_ledger_entries_purchase_id_purchases')),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_ledger_entries_workspace_id_workspaces')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entries'))
    )
    op.create_index('ix_ledger_entries_generation_id', 'ledger_entries', ['generation_id'], unique=False, postgresql_where=sa.text('generation_id IS NOT NULL'))
    op.create_index('ix_ledger_entries_grant_id', 'ledger_entries', ['grant_id'], unique=False)
    op.create_index('ix_ledger_entries_workspace_id_id', 'ledger_entries', ['workspace_id', 'id'], unique=False)
    op.add_column('workspaces', sa.Column('pool_fallback', sa.Boolean(), server_default='false', nullable=False))

    # Money rule 5: ledger entries are never updated or deleted; the database refuses it.
    op.execute(APPEND_ONLY_FUNCTION)
    op.execute(
        "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
        "FOR EACH ROW EXECUTE FUNCTION creditpool_refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries "
        "FOR EACH STATEMENT EXECUTE FUNCTION creditpool_refuse_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ledger_entries_no_truncate ON ledger_entries")
    op.execute("DROP TRIGGER ledger_entries_append_only ON ledger_entries")
    op.execute("DROP FUNCTION creditpool_refuse_change()")
    op.drop_column('workspaces', 'pool_fallback')
    op.drop_index('ix_ledger_entries_workspace_id_id', table_name='ledger_entries')
    op.drop_index('ix_ledger_entries_grant_id', table_name='ledger_entries')
    op.drop_index('ix_ledger_entries_generation_id', table_name='ledger_entries', postgresql_where=sa.text('generation_id IS NOT NULL'))
    op.drop_table('ledger_entries')
    op.drop_index(op.f('ix_purchases_workspace_id'), table_name='purchases')
    op.drop_table('purchases')
    op.drop_index(op.f('ix_grants_workspace_id'), table_name='grants')
    op.drop_index('ix_grants_live', table_name='grants', postgresql_where=sa.text('remaining > 0 OR held > 0'))
    op.drop_table('grants')
    op.drop_index('ix_generations_workspace_created', table_name='generations')
    op.drop_index('ix_generations_member', table_name='generations')
    op.drop_table('generations')
    op.drop_table('idempotency_keys')
    op.drop_table('credit_packs')
