"""webhook delivery claims, the audit log's acting tenant, revoked keys by time

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('invocations') as t:
        t.add_column(sa.Column('webhook_claimed_by', sa.String(64), nullable=True))
        t.add_column(sa.Column('webhook_claim_until', sa.Float(), nullable=True))
        t.add_column(sa.Column('webhook_next_at', sa.Float(), nullable=True))
    op.create_index('ix_invocations_webhook_state', 'invocations', ['webhook_state'])
    with op.batch_alter_table('audit_log') as t:
        t.add_column(sa.Column('actor_tenant', sa.String(64), nullable=False,
                               server_default=''))
    op.create_index('ix_audit_log_actor_tenant', 'audit_log', ['actor_tenant'])
    op.create_index('ix_api_keys_revoked_at', 'api_keys', ['revoked_at'])


def downgrade() -> None:
    op.drop_index('ix_api_keys_revoked_at', table_name='api_keys')
    op.drop_index('ix_audit_log_actor_tenant', table_name='audit_log')
    with op.batch_alter_table('audit_log') as t:
        t.drop_column('actor_tenant')
    op.drop_index('ix_invocations_webhook_state', table_name='invocations')
    with op.batch_alter_table('invocations') as t:
        t.drop_column('webhook_next_at')
        t.drop_column('webhook_claim_until')
        t.drop_column('webhook_claimed_by')
