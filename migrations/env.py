"""Alembic environment: the URL comes from the caller (services.migrate) or from the settings."""

from alembic import context

import services.jobs.models  # noqa: F401  (registers the tables on Base.metadata)
import services.tenants.models  # noqa: F401
from services.db import Base, make_engine
from services.settings import get_settings

url = context.config.attributes.get("url") or get_settings().database
connection = context.config.attributes.get("connection")


def run(conn) -> None:
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = make_engine(url)
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
