"""audit log: one append-only row per management action

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_log',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  primary_key=True, autoincrement=True),
        sa.Column('time', sa.Float(), nullable=False),
        sa.Column('tenant', sa.String(64), nullable=False),
        sa.Column('key_id', sa.String(64), nullable=False, server_default=''),
        sa.Column('action', sa.String(64), nullable=False),
        sa.Column('target', sa.String(400), nullable=False, server_default=''),
        sa.Column('source', sa.String(200), nullable=False, server_default=''),
        sa.Column('outcome', sa.String(16), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('detail_json', sa.Text(), nullable=False, server_default='{}'),
    )
    op.create_index('ix_audit_log_time', 'audit_log', ['time'])
    op.create_index('ix_audit_log_tenant', 'audit_log', ['tenant'])
    op.create_index('ix_audit_log_action', 'audit_log', ['action'])


def downgrade() -> None:
    op.drop_index('ix_audit_log_action', table_name='audit_log')
    op.drop_index('ix_audit_log_tenant', table_name='audit_log')
    op.drop_index('ix_audit_log_time', table_name='audit_log')
    op.drop_table('audit_log')
