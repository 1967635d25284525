"""Queries on jobs and their artifacts; no decisions here (those are in service.py)."""

import uuid
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, joinedload

from services.jobs.models import Artifact, Job, JobStage
from services.tenants.models import Tenant

ACTIVE = ("queued", "running")  # the statuses that are not TERMINAL


def _sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def get(session: Session, job_id: uuid.UUID, *, lock: bool = False) -> Job | None:
    """The job, locked for update until the transaction ends when asked. SQLite ignores FOR UPDATE and
    reads outside any transaction, so there a no-op UPDATE first takes the database's write lock: the
    row read next cannot change before the commit (a cancel and a stage's end then take turns there too)."""
    stmt = select(Job).where(Job.id == job_id)
    if lock:  # and refresh a copy this session already holds: the decision must see the locked row
        if _sqlite(session):
            session.execute(update(Job).where(Job.id == job_id).values(status=Job.status)
                            .execution_options(synchronize_session=False))
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def get_for_tenant(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    """The job, with its stages in the same round trip, if it belongs to the tenant."""
    return session.scalar(select(Job).options(joinedload(Job.stages)).where(Job.id == job_id, Job.tenant_id == tenant_id))


def by_idempotency_key(session: Session, tenant_id: uuid.UUID, key: str) -> Job | None:
    """The tenant's job created with this Idempotency-Key."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def lock_tenant(session: Session, tenant_id: uuid.UUID) -> None:
    """Hold the tenant's row until the transaction ends, so that its concurrent submissions take turns.
    PostgreSQL: FOR NO KEY UPDATE (inserting jobs, whose foreign key takes KEY SHARE, is not blocked);
    SQLite takes no lock on a SELECT, so a no-op UPDATE takes the database's write lock instead."""
    if _sqlite(session):
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
                        .execution_options(synchronize_session=False))
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))


def active_count(session: Session, tenant_id: uuid.UUID) -> int:
    """How many of the tenant's jobs are queued or running."""
    return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))) or 0


def page(session: Session, tenant_id: uuid.UUID, limit: int, before: tuple[datetime, uuid.UUID] | None) -> list[Job]:
    """The tenant's jobs, newest first, after a (created_at, id) cursor."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if before is not None:
        at, jid = before
        stmt = stmt.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < jid)))
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def stage_row(job: Job, stage: str) -> JobStage:
    """The job's row for one stage."""
    return next(s for s in job.stages if s.stage == stage)


def artifact(session: Session, job_id: uuid.UUID, name: str) -> Artifact | None:
    """One named artifact of a job."""
    return session.get(Artifact, (job_id, name))


def artifacts(session: Session, job_id: uuid.UUID) -> list[Artifact]:
    """Every artifact of a job."""
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def put_artifact(session: Session, job_id: uuid.UUID, name: str, key: str, sha256: str, size: int) -> None:
    """Record an artifact (replacing a record of the same name: a stage written again after a crash)."""
    row = session.get(Artifact, (job_id, name))
    if row is None:
        session.add(Artifact(job_id=job_id, name=name, key=key, sha256=sha256, size=size))
    else:
        row.key, row.sha256, row.size = key, sha256, size


def drop_artifacts(session: Session, job_id: uuid.UUID, prefix: str = "") -> None:
    """Forget the artifacts of a job (those whose name starts with `prefix`)."""
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name.startswith(prefix)))


def stuck(session: Session, held_before: datetime | None, queued_before: datetime, pending_before: datetime) -> list[Job]:
    """Active jobs whose worker's heartbeat stopped before `held_before` (None: none is taken over), that no worker
    took since they were enqueued, or whose message was not sent (enqueue_pending: no time, or older than `pending_before`)."""
    free = Job.worker.is_(None)
    waiting = [and_(free, Job.enqueued_at < queued_before),
               and_(free, Job.enqueue_pending, or_(Job.enqueued_at.is_(None), Job.enqueued_at < pending_before))]
    if held_before is not None:
        waiting.append(and_(Job.worker.is_not(None), Job.heartbeat_at < held_before))
    return list(session.scalars(select(Job).where(Job.status.in_(ACTIVE), or_(*waiting)).with_for_update(skip_locked=True)))
