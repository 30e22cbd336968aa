"""webhook signing secrets per tenant; the last delivery attempt's status and time

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhook_secrets',
        sa.Column('tenant_id', sa.String(64), primary_key=True),
        sa.Column('secret', sa.String(128), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('previous_secret', sa.String(128), nullable=True),
        sa.Column('previous_until', sa.Float(), nullable=True),
    )
    with op.batch_alter_table('invocations') as t:
        t.add_column(sa.Column('webhook_last_status', sa.Integer(), nullable=False,
                               server_default='0'))
        t.add_column(sa.Column('webhook_last_at', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('invocations') as t:
        t.drop_column('webhook_last_at')
        t.drop_column('webhook_last_status')
    op.drop_table('webhook_secrets')
