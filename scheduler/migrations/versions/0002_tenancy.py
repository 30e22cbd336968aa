"""tenant quotas, key priorities, public functions

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenants') as t:
        t.add_column(sa.Column('max_memory_bytes', sa.BigInteger(), nullable=True))
        t.add_column(sa.Column('max_instances', sa.Integer(), nullable=True))
    with op.batch_alter_table('api_keys') as t:
        t.add_column(sa.Column('priority_default', sa.Integer(), nullable=False,
                               server_default='50'))
        t.add_column(sa.Column('priority_max', sa.Integer(), nullable=False,
                               server_default='100'))
    with op.batch_alter_table('functions') as t:
        t.add_column(sa.Column('public', sa.Boolean(), nullable=False,
                               server_default=sa.false()))
        t.add_column(sa.Column('priority', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('functions') as t:
        t.drop_column('priority')
        t.drop_column('public')
    with op.batch_alter_table('api_keys') as t:
        t.drop_column('priority_max')
        t.drop_column('priority_default')
    with op.batch_alter_table('tenants') as t:
        t.drop_column('max_instances')
        t.drop_column('max_memory_bytes')
