"""The job tables: one row per job, one per stage of a job, one per stored artifact."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid, false, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.db import Base, JSONType, UTCDateTime, utcnow
from services.method.stages import JOB_STAGES
from services.tenants.models import Tenant  # noqa: F401  (the table jobs.tenant_id points at)

STAGES = JOB_STAGES  # a job runs the method's stages, then writes its report
TERMINAL = ("succeeded", "failed", "canceled")


class Job(Base):
    """A hardening job: queued → running(stage) → succeeded | failed | canceled."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_enqueue_pending", "enqueue_pending", postgresql_where=text("enqueue_pending"), sqlite_where=text("enqueue_pending")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(16), default=STAGES[0])
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_digest: Mapped[str] = mapped_column(String(64))  # SHA-256 of every part: decides idempotent replays
    inputs_digest: Mapped[str] = mapped_column(String(64))  # keys the stage artifacts: same inputs, same code
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSONType)  # per part: format, size, sha256, samples

    stage_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200))  # who holds the current stage
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts at the current stage
    # set with the transition that enqueues a stage, cleared once its message is sent: the reconciler sends it again
    # within seconds when the broker was down (instead of waiting out the requeue window)
    enqueue_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    stages: Mapped[list["JobStage"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobStage.position", lazy="selectin")


class JobStage(Base):
    """One stage of one job: how often it was started, and when it finished."""

    __tablename__ = "job_stages"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | running | done
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    computed: Mapped[int] = mapped_column(Integer, default=0)  # times its work ran to the end (1 unless a bug)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    seconds: Mapped[float | None] = mapped_column(Float)  # the work's time, kept with the stage's output
    reused_seconds: Mapped[float | None] = mapped_column(Float)  # a later attempt that found the output stored: its time

    job: Mapped[Job] = relationship(back_populates="stages")


class Artifact(Base):
    """A stored file of a job (an upload, a stage output, a result), with its SHA-256."""

    __tablename__ = "artifacts"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(400))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
