"""a version's input schema, read by its build even when no snapshot is captured
(scheduler/versions.py, docs/function-api.md)

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('function_versions') as batch:
        batch.add_column(sa.Column('input_schema', sa.Text(), nullable=False,
                                   server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('function_versions') as batch:
        batch.drop_column('input_schema')
