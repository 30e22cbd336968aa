"""usage: one row per metered invocation, hourly sums per tenant and function

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'usage_records',
        sa.Column('usage_id', sa.String(length=64), nullable=False),
        sa.Column('invocation_id', sa.String(length=128), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('function', sa.String(length=63), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('key_id', sa.String(length=64), nullable=False),
        sa.Column('start', sa.String(length=16), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('ended_at', sa.Float(), nullable=False),
        sa.Column('wall_s', sa.Float(), nullable=False),
        sa.Column('queue_s', sa.Float(), nullable=False),
        sa.Column('restore_s', sa.Float(), nullable=False),
        sa.Column('gpu_memory_bytes', sa.BigInteger(), nullable=False),
        sa.Column('compute_share', sa.Float(), nullable=False),
        sa.Column('gib_seconds', sa.Float(), nullable=False),
        sa.Column('compute_seconds', sa.Float(), nullable=False),
        sa.Column('bytes_in', sa.BigInteger(), nullable=False),
        sa.Column('bytes_out', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('usage_id'),
    )
    op.create_index('ix_usage_records_invocation_id', 'usage_records', ['invocation_id'])
    op.create_index('ix_usage_records_tenant_ended', 'usage_records', ['tenant', 'ended_at'])
    op.create_table(
        'usage_hourly',
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('function', sa.String(length=63), nullable=False),
        sa.Column('hour_start', sa.BigInteger(), nullable=False),
        sa.Column('invocations', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.Column('cold_starts', sa.BigInteger(), nullable=False),
        sa.Column('wall_s', sa.Float(), nullable=False),
        sa.Column('queue_s', sa.Float(), nullable=False),
        sa.Column('restore_s', sa.Float(), nullable=False),
        sa.Column('gib_seconds', sa.Float(), nullable=False),
        sa.Column('compute_seconds', sa.Float(), nullable=False),
        sa.Column('bytes_in', sa.BigInteger(), nullable=False),
        sa.Column('bytes_out', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'function', 'hour_start'),
    )
    op.create_index('ix_usage_hourly_hour_start', 'usage_hourly', ['hour_start'])


def downgrade() -> None:
    op.drop_index('ix_usage_hourly_hour_start', table_name='usage_hourly')
    op.drop_table('usage_hourly')
    op.drop_index('ix_usage_records_tenant_ended', table_name='usage_records')
    op.drop_index('ix_usage_records_invocation_id', table_name='usage_records')
    op.drop_table('usage_records')
