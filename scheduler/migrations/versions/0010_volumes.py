"""chunks per tenant, model volumes, storage quotas (scheduler/blobs.py, volumes.py)

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'blobs',
        sa.Column('tenant_id', sa.String(64), primary_key=True),
        sa.Column('digest', sa.String(64), primary_key=True),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
    )
    op.create_table(
        'storage_quotas',
        sa.Column('tenant_id', sa.String(64), primary_key=True),
        sa.Column('max_storage_bytes', sa.BigInteger(), nullable=True),
        sa.Column('max_bundle_bytes', sa.BigInteger(), nullable=True),
    )
    op.create_table(
        'volumes',
        sa.Column('tenant_id', sa.String(64), primary_key=True),
        sa.Column('name', sa.String(63), primary_key=True),
        sa.Column('manifest_digest', sa.String(64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('files', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('updated_at', sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('volumes')
    op.drop_table('storage_quotas')
    op.drop_table('blobs')
