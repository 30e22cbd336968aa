"""schedules: each function's cron schedules with their run state (next due time, the
last run), and invocations tagged with the schedule that made them

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'schedules',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('tenant_id', sa.String(64), nullable=False, index=True),
        sa.Column('function_name', sa.String(63), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('cron', sa.String(256), nullable=False),
        sa.Column('timezone', sa.String(64), nullable=False),
        sa.Column('input_json', sa.Text(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('next_run_at', sa.Float(), nullable=True, index=True),
        sa.Column('last_due_at', sa.Float(), nullable=True),
        sa.Column('last_run_at', sa.Float(), nullable=True),
        sa.Column('last_outcome', sa.String(16), nullable=False, server_default=''),
        sa.Column('last_invocation_id', sa.String(64), nullable=True),
        sa.Column('updated_at', sa.Float(), nullable=False),
        sa.UniqueConstraint('tenant_id', 'function_name', 'position'),
    )
    # '' = a caller's request; 'schedule' = made by schedule_id at its due time.
    op.add_column('invocations', sa.Column('source', sa.String(16), nullable=False,
                                           server_default=''))
    op.add_column('invocations', sa.Column('schedule_id', sa.String(64), nullable=True))
    op.create_index('ix_invocations_schedule_id', 'invocations', ['schedule_id'])


def downgrade() -> None:
    op.drop_index('ix_invocations_schedule_id', 'invocations')
    with op.batch_alter_table('invocations') as batch:
        batch.drop_column('schedule_id')
        batch.drop_column('source')
    op.drop_table('schedules')
