"""per-tenant secrets, encrypted at rest (scheduler/secrets.py)

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'secrets',
        sa.Column('tenant_id', sa.String(64), primary_key=True),
        sa.Column('name', sa.String(128), primary_key=True),
        sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('updated_at', sa.Float(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('secrets')
