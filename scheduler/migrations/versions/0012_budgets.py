"""budgets: requests and tokens per minute and per day of a key or a tenant, and the
day windows' counts of all gateways

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'budgets',
        sa.Column('tenant_id', sa.String(64), sa.ForeignKey('tenants.id'), primary_key=True),
        # "" = the tenant's own budgets, shared by all its keys.
        sa.Column('key_id', sa.String(64), primary_key=True),
        sa.Column('rpm', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('rpd', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('tpm', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('tpd', sa.BigInteger(), nullable=False, server_default='0'),
    )
    op.create_table(
        'budget_usage',
        sa.Column('counter', sa.String(200), primary_key=True),
        sa.Column('budget', sa.String(8), primary_key=True),
        sa.Column('day', sa.BigInteger(), primary_key=True),
        sa.Column('count', sa.BigInteger(), nullable=False, server_default='0'),
    )


def downgrade() -> None:
    op.drop_table('budget_usage')
    op.drop_table('budgets')
