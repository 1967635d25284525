"""Bring a database to the newest schema (or back), through the Alembic migrations only, and check
that a database is at the schema this code was written for."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from services.errors import InputError


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to `revision`."""
    command.upgrade(_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Undo the migrations down to `revision`."""
    command.downgrade(_config(url), revision)


def head() -> str:
    """The newest revision this code ships (one line of migrations, so one head)."""
    head = ScriptDirectory.from_config(_config("")).get_current_head()
    assert head is not None, "migrations/ holds the schema's revisions"
    return head


def current(url: str) -> str | None:
    """The revision the database is at (Alembic's alembic_version), or None for a database never migrated."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from services.db import make_engine

    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            revisions = MigrationContext.configure(conn).get_current_heads()
    except OperationalError as e:  # a start-up check: say which database, not a traceback
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise InputError(f"cannot reach the database {make_url(url).render_as_string(hide_password=True)} ({reason}); "
                         "check LADDER_DATABASE_URL and that the server is up") from e
    finally:
        engine.dispose()
    return ",".join(revisions) or None


def require_head(url: str) -> None:
    """Refuse a database that is not at this code's head, in words that say what to run.

    A table existing is not enough: an API or worker older or newer than the schema would read and
    write columns that are not there, or miss ones it must set."""
    from sqlalchemy.engine import make_url

    need, have = head(), current(url)
    if have == need:
        return
    where = f"the database {make_url(url).render_as_string(hide_password=True)}"
    known = {s.revision for s in ScriptDirectory.from_config(_config(url)).walk_revisions()}
    if have is None:
        raise InputError(f"{where} has no ladder schema (no Alembic revision), this code needs revision {need}; run: ladder migrate")
    if have in known:
        raise InputError(f"{where} is at revision {have}, this code needs {need}; run: ladder migrate")
    raise InputError(f"{where} is at revision {have}, which this code does not know (it needs {need}): a newer ladder "
                     f"migrated it; run that version, or go back with its `ladder migrate --revision {need}`")
