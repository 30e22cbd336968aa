"""usage cost: each metered call's cost, and the hourly sums of it, in integer
nano-units of the operator's currency (core/prices.py)

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Calls metered before prices existed cost nothing.
    op.add_column('usage_records', sa.Column('cost_nanos', sa.BigInteger(), nullable=False,
                                             server_default='0'))
    op.add_column('usage_hourly', sa.Column('cost_nanos', sa.BigInteger(), nullable=False,
                                            server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('usage_hourly') as batch:
        batch.drop_column('cost_nanos')
    with op.batch_alter_table('usage_records') as batch:
        batch.drop_column('cost_nanos')
