"""invocations: async calls, sync calls past the wait limit, Idempotency-Key dedupe

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'invocations',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('tenant_id', sa.String(64), nullable=False),
        sa.Column('function_name', sa.String(63), nullable=False),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('priority', sa.Integer(), nullable=False, server_default='50'),
        sa.Column('path', sa.Text(), nullable=False, server_default=''),
        sa.Column('request_body', sa.LargeBinary(), nullable=True),
        sa.Column('request_content_type', sa.String(200), nullable=False, server_default=''),
        sa.Column('request_headers_json', sa.Text(), nullable=False, server_default='{}'),
        sa.Column('timeout_seconds', sa.Float(), nullable=False, server_default='0'),
        sa.Column('result_status', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('result_content_type', sa.String(200), nullable=False, server_default=''),
        sa.Column('result_body', sa.LargeBinary(), nullable=True),
        sa.Column('result_bytes', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('start_kind', sa.String(16), nullable=False, server_default=''),
        sa.Column('error_code', sa.String(64), nullable=False, server_default=''),
        sa.Column('error_message', sa.Text(), nullable=False, server_default=''),
        sa.Column('webhook_url', sa.Text(), nullable=False, server_default=''),
        sa.Column('webhook_state', sa.String(16), nullable=False, server_default=''),
        sa.Column('webhook_attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('webhook_error', sa.Text(), nullable=False, server_default=''),
        sa.Column('idempotency_key', sa.String(255), nullable=True),
        sa.Column('request_digest', sa.String(64), nullable=False, server_default=''),
        sa.Column('key_id', sa.String(64), nullable=False, server_default=''),
        sa.Column('claimed_by', sa.String(64), nullable=True),
        sa.Column('claim_until', sa.Float(), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.Column('expires_at', sa.Float(), nullable=True),
        sa.UniqueConstraint('tenant_id', 'idempotency_key',
                            name='uq_invocations_tenant_id_idempotency_key'),
    )
    op.create_index('ix_invocations_tenant_id', 'invocations', ['tenant_id'])
    op.create_index('ix_invocations_state', 'invocations', ['state'])
    op.create_index('ix_invocations_created_at', 'invocations', ['created_at'])
    op.create_index('ix_invocations_expires_at', 'invocations', ['expires_at'])


def downgrade() -> None:
    op.drop_index('ix_invocations_expires_at', table_name='invocations')
    op.drop_index('ix_invocations_created_at', table_name='invocations')
    op.drop_index('ix_invocations_state', table_name='invocations')
    op.drop_index('ix_invocations_tenant_id', table_name='invocations')
    op.drop_table('invocations')
