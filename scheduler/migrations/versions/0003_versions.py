"""function versions: every deploy is an immutable version, kept for rollback

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'function_versions',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('function_id', sa.String(64), sa.ForeignKey('functions.id'),
                  nullable=False, index=True),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('bundle_digest', sa.String(64), nullable=False),
        sa.Column('handler', sa.String(200), nullable=False),
        sa.Column('spec_json', sa.Text(), nullable=False),
        sa.Column('start_mode', sa.String(16), nullable=False),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False, server_default=''),
        sa.Column('snapshot_id', sa.String(64), nullable=True),
        sa.Column('snapshot_collected', sa.Boolean(), nullable=False,
                  server_default=sa.false()),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('activated_at', sa.Float(), nullable=True),
        sa.UniqueConstraint('function_id', 'version'),
    )
    # Every existing function's current version becomes its first recorded one.
    op.execute(
        "INSERT INTO function_versions (id, function_id, version, bundle_digest, handler, "
        "spec_json, start_mode, state, reason, snapshot_id, snapshot_collected, "
        "created_at, activated_at) "
        "SELECT 'ver_' || id || '_' || CAST(version AS VARCHAR(12)), id, version, "
        "bundle_digest, handler, spec_json, start_mode, "
        "CASE WHEN state IN ('building', 'failed') THEN state ELSE 'ready' END, "
        "reason, snapshot_id, " + ("false" if op.get_bind().dialect.name == "postgresql"
                                    else "0")
        + ", updated_at, updated_at FROM functions")


def downgrade() -> None:
    op.drop_table('function_versions')
