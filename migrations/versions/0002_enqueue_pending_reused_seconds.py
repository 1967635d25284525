"""jobs.enqueue_pending, job_stages.reused_seconds

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueue_pending', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index('ix_jobs_enqueue_pending', ['enqueue_pending'], unique=False,
                              postgresql_where=sa.text('enqueue_pending'), sqlite_where=sa.text('enqueue_pending'))
    with op.batch_alter_table('job_stages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reused_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_stages', schema=None) as batch_op:
        batch_op.drop_column('reused_seconds')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_enqueue_pending')
        batch_op.drop_column('enqueue_pending')
