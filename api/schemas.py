"""What the API answers, as pydantic models (they also make the OpenAPI document)."""

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.jobs.models import Job


class Progress(BaseModel):
    """Where a job is."""

    stage: str
    stage_fraction: float = Field(description="0..1 within the current stage")
    fraction: float = Field(description="0..1 of the whole job (stages weighted by their typical share)")
    eta_seconds: float | None = Field(description="estimated seconds left, once enough is done to tell")
    metrics: dict[str, float] = Field(description="the stage's latest metrics, e.g. loss")


class StageTiming(BaseModel):
    """One stage of a job."""

    stage: str
    status: Literal["pending", "running", "done"]
    attempts: int
    seconds: float | None
    started_at: datetime | None
    finished_at: datetime | None


class JobError(BaseModel):
    """Why a job failed."""

    code: str = Field(description="invalid_input, worker_lost or internal_error")
    message: str


class JobOut(BaseModel):
    """A hardening job."""

    id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: Progress
    cancel_requested: bool
    attempt: int = Field(description="attempts at the current stage (a worker lost mid-stage adds one)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    stages: list[StageTiming]
    error: JobError | None
    inputs: dict[str, Any]
    spec: dict[str, Any]
    config: dict[str, Any]
    links: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        """The resource of a job row."""
        base = f"/v1/jobs/{job.id}"
        links = {"self": base, "cancel": f"{base}/cancel"}
        if job.status == "succeeded":
            links |= {"model": f"{base}/model", "report": f"{base}/report"}
        return cls(
            id=job.id, status=job.status, cancel_requested=job.cancel_requested, attempt=job.attempt,
            progress=Progress(stage=job.stage, stage_fraction=job.stage_fraction, fraction=job.fraction,
                              eta_seconds=job.eta_seconds, metrics=job.metrics or {}),
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            stages=[StageTiming(stage=s.stage, status=s.status, attempts=s.attempts, seconds=s.seconds,
                                started_at=s.started_at, finished_at=s.finished_at) for s in job.stages],
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            inputs=job.inputs, spec=job.spec, config=job.config, links=links,
        )


class JobPage(BaseModel):
    """A page of the caller's jobs, newest first."""

    items: list[JobOut]
    next: str | None = Field(description="URL of the next page, or null")


class ProblemOut(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str
    title: str
    status: int
    detail: str = Field(description="what went wrong and what to fix")
