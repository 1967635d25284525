"""The database: one engine per process, sessions that commit or roll back in one place, and work
that must run only after a commit (enqueueing a job never races its own row)."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on PostgreSQL and SQLite alike (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    """The ORM base of every table."""


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine for PostgreSQL or SQLite (WAL, foreign keys on, usable from worker threads)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # timeouts: a database host that went away (a failover to a vanished address, a half-open connection) is an
    # error within seconds that the callers retry or answer 503 for, not a thread blocked for minutes
    connect_args = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                    "keepalives_count": 3, "tcp_user_timeout": 30_000} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0, pool_timeout=10,
                         connect_args=connect_args)


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run `fn` once `session` commits; drop it if the session rolls back."""
    session.info.setdefault("after_commit", []).append(fn)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for fn in session.info.pop("after_commit", []):
        try:
            fn()
        except Exception:  # the commit stands; what failed here (an enqueue, a delete) the reconciler redoes
            log.exception("after-commit action failed")


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_commit(session: Session, _previous) -> None:
    session.info.pop("after_commit", None)


class Database:
    """An engine and its session factory."""

    def __init__(self, url: str, pool_size: int = 10):
        self.url = url
        self.engine = make_engine(url, pool_size)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # reads need no transaction: autocommit spares the BEGIN and COMMIT round trips of every poll
        self.readers = sessionmaker(self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only, outside any transaction."""
        with self.readers() as session:
            yield session

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
