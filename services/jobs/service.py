"""The job life cycle: queued → running(stage) → succeeded | failed | canceled.

Every transition is one transaction on the job row; the next stage is enqueued only after the
transaction that recorded the previous one commits (`after_commit`), so a worker never sees a job
that the database does not. A worker *claims* a stage before running it: the claim fails when
the stage is already done, the job has ended, or another worker with a live heartbeat holds it.
"""

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, Protocol, TypeGuard

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services import faults
from services.artifacts import ArtifactStore
from services.db import after_commit, utcnow
from services.errors import InputError, NotFound
from services.jobs import repository
from services.jobs.models import STAGES, TERMINAL, Job, JobStage
from services.settings import get_settings

log = logging.getLogger(__name__)

# share of a typical job's time per stage (bench/engine.py on MNIST), for the overall fraction and ETA
STAGE_WEIGHTS = {"latents": 0.02, "boundary": 0.08, "generator": 0.30, "adversarial": 0.05,
                 "finetune": 0.30, "evaluate": 0.24, "report": 0.01}


def _done_before(stage: str) -> float:
    """The share of a typical job done when `stage` starts."""
    return sum(STAGE_WEIGHTS[s] for s in STAGES[:STAGES.index(stage)])


class Dispatcher(Protocol):
    """Sends a stage of a job to a worker (Celery, or the embedded in-process worker)."""

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None: ...


class Claim(Enum):
    """What a worker may do with a stage it was sent."""

    RUN = "run"  # it holds the stage now
    SKIP = "skip"  # done already, or the job ended: drop the message
    BUSY = "busy"  # another live worker holds it: try again after its heartbeat could go stale


RESUMABLE = faults.CODES  # a job failed by the infrastructure keeps its stages: `ladder jobs resume` goes on from them


class Conflict(Exception):
    """A request that the job's state does not allow (HTTP 409)."""


class IdempotencyMismatch(Conflict):
    """An Idempotency-Key already used for a different request."""


class TooManyJobs(InputError):
    """The tenant already has as many active jobs as it may; it can submit again in about `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 60):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)


@dataclass
class NewJob:
    """What the API learned from an upload."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    idempotency_key: str | None
    request_digest: str
    inputs_digest: str
    spec: dict[str, Any]
    config: dict[str, Any]
    inputs: dict[str, Any]
    artifacts: dict[str, tuple[str, str, int]]  # name → (key, sha256, size)


def finite(value: Any) -> Any:
    """The value with NaN and ±Inf replaced by None (JSON, and PostgreSQL's JSONB, have no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def refuse_if_full(session: Session, tenant_id: uuid.UUID, max_active: int) -> None:
    """TooManyJobs when the tenant has `max_active` queued or running jobs (0: no cap). The API also asks this
    before it checks an upload, so a tenant at its cap costs no sandboxed .pt2 checks; create() asks again
    under the tenant's lock."""
    if not max_active:
        return
    active = repository.active_count(session, tenant_id)
    if active >= max_active:
        jobs = f"{active} active job{'s' * (active != 1)}"
        raise TooManyJobs(f"this tenant has {jobs} (queued or running), the most it may have at once "
                          f"(LADDER_MAX_ACTIVE_JOBS_PER_TENANT={max_active}); wait for one to finish, or cancel one "
                          "(POST /v1/jobs/{id}/cancel), then submit again")


def create(session: Session, new: NewJob, dispatcher: Dispatcher, max_active: int | None = None) -> tuple[Job, bool]:
    """Insert the job and enqueue its first stage after commit; (job, created). With an
    Idempotency-Key already used, the earlier job is answered (same payload) or Conflict raised.
    A tenant with `max_active` queued or running jobs (default: LADDER_MAX_ACTIVE_JOBS_PER_TENANT;
    0 = no cap) gets TooManyJobs; a replay is neither counted nor refused."""
    if max_active is None:
        max_active = get_settings().max_active_jobs_per_tenant
    # the tenant's submissions take turns from here to the commit: the replay lookup sees a job a concurrent
    # request with the same key committed meanwhile, and the count cannot miss one being inserted
    repository.lock_tenant(session, new.tenant_id)
    if new.idempotency_key is not None:
        earlier = repository.by_idempotency_key(session, new.tenant_id, new.idempotency_key)
        if earlier is not None:
            return replay(earlier, new.request_digest), False
    refuse_if_full(session, new.tenant_id, max_active)
    job_id = new.id
    job = Job(id=job_id, tenant_id=new.tenant_id, idempotency_key=new.idempotency_key, request_digest=new.request_digest,
              inputs_digest=new.inputs_digest, spec=new.spec, config=new.config, inputs=new.inputs,
              status="queued", stage=STAGES[0], enqueued_at=utcnow(), enqueue_pending=True, metrics={},
              stages=[JobStage(stage=s, position=i) for i, s in enumerate(STAGES)])
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        earlier = (None if new.idempotency_key is None
                   else repository.by_idempotency_key(session, new.tenant_id, new.idempotency_key))
        if earlier is None:
            raise
        return replay(earlier, new.request_digest), False
    for name, (key, sha, size) in new.artifacts.items():
        repository.put_artifact(session, job_id, name, key, sha, size)
    send_after_commit(session, dispatcher, [job])
    return job, True


def send_after_commit(session: Session, dispatcher: Dispatcher, jobs: list[Job]) -> None:
    """Once the session commits, send each job's current stage and clear its enqueue_pending mark (set by the caller
    in the same transaction, with enqueued_at: only that mark is cleared, not a later one). A send that fails for the
    broker leaves the mark, and the reconciler sends it again within LADDER_ENQUEUE_RETRY_AFTER_S; a duplicate
    message is harmless (the claim drops it)."""
    engine = session.get_bind()
    stages = [(job.id, job.stage, job.enqueued_at) for job in jobs]

    def send() -> None:
        for job_id, stage, at in stages:
            try:
                dispatcher.enqueue(job_id, stage)
            except Exception as e:
                if faults.classify(e) is None:
                    raise
                log.warning("job %s: %s not sent (%s); the reconciler sends it again", job_id, stage, faults.describe(e))
                continue
            try:
                with engine.begin() as conn:  # an Engine: services.db.Database binds its sessions to one
                    conn.execute(update(Job).where(  # type: ignore[union-attr]
                        Job.id == job_id, Job.stage == stage, Job.enqueue_pending, Job.enqueued_at == at,
                    ).values(enqueue_pending=False))
            except Exception as e:  # the mark stays: the reconciler sends a duplicate, which the claim drops
                if faults.classify(e) is None:
                    raise
                log.warning("job %s: %s sent, its mark not cleared (%s)", job_id, stage, faults.describe(e))

    after_commit(session, send)


def replay(earlier: Job, request_digest: str) -> Job:
    """The job an Idempotency-Key created, if this request is the same one; else Conflict."""
    if earlier.request_digest != request_digest:
        raise IdempotencyMismatch(f"Idempotency-Key {earlier.idempotency_key!r} was used for a different request; "
                       "use a new key for a new job")
    return earlier


def request_cancel(session: Session, job: Job, store: ArtifactStore) -> Job:
    """Cancel now if no worker holds the job, else flag it for the worker to stop between batches."""
    if job.status in TERMINAL:
        raise Conflict(f"job {job.id} has already {job.status}; only queued or running jobs can be canceled")
    job.cancel_requested = True
    if job.worker is None:
        _end(session, job, "canceled", store)
    return job


def claim(session: Session, job_id: uuid.UUID, stage: str, worker: str, stale_after_s: float, max_attempts: int,
          store: ArtifactStore) -> Claim:
    """Take the stage for `worker`, counting the attempt; see Claim."""
    job = repository.get(session, job_id, lock=True)
    if job is None or job.status in TERMINAL or STAGES.index(job.stage) > STAGES.index(stage):
        return Claim.SKIP
    if job.stage != stage:
        log.warning("job %s: message for %s while at %s; dropped", job_id, stage, job.stage)
        return Claim.SKIP
    now = utcnow()
    if job.worker not in (None, worker) and job.heartbeat_at and now - job.heartbeat_at < timedelta(seconds=stale_after_s):
        return Claim.BUSY  # before the cancel check: a live holder ends a canceled job itself
    if job.cancel_requested:
        _end(session, job, "canceled", store)
        return Claim.SKIP
    row = repository.stage_row(job, stage)
    if job.worker == worker and job.status == "running":  # this claim again: its first commit landed, its answer was lost
        job.heartbeat_at = now
        return Claim.RUN
    if job.attempt >= max_attempts:
        fail(session, job, "worker_lost",
             f"stage {stage} lost its worker {job.attempt} times (out of memory or killed?); "
             "try a smaller batch size or a larger machine, then submit again", store)
        return Claim.SKIP
    job.attempt += 1
    row.attempts += 1
    row.status = "running"
    row.started_at = row.started_at or now
    job.status, job.worker, job.heartbeat_at, job.enqueue_pending = "running", worker, now, False
    job.started_at = job.started_at or now
    job.stage_fraction = 0.0
    return Claim.RUN


def holds(job: Job | None, stage: str, worker: str) -> TypeGuard[Job]:
    """Whether `worker` still holds the job's stage (it may have been taken over as stale)."""
    return job is not None and job.status == "running" and job.stage == stage and job.worker == worker


def record_progress(session: Session, job_id: uuid.UUID, stage: str, worker: str, stage_fraction: float,
                    metrics: dict[str, float]) -> bool:
    """Write progress and the heartbeat; True when the job should stop (canceled, or taken over)."""
    job = repository.get(session, job_id)
    if not holds(job, stage, worker):
        return True
    now = utcnow()
    fraction = min(1.0, _done_before(stage) + STAGE_WEIGHTS[stage] * stage_fraction)
    elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
    job.stage_fraction, job.fraction, job.heartbeat_at = stage_fraction, fraction, now
    job.eta_seconds = elapsed / fraction * (1 - fraction) if fraction > 0.02 else None
    if metrics:
        job.metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN
    return job.cancel_requested


def heartbeat(session: Session, job_id: uuid.UUID, stage: str, worker: str) -> None:
    """Show that the worker holding the stage is alive."""
    job = repository.get(session, job_id)
    if holds(job, stage, worker):
        job.heartbeat_at = utcnow()


def complete_stage(session: Session, job_id: uuid.UUID, stage: str, worker: str, seconds: float | None, computed: bool,
                   artifacts: dict[str, tuple[str, str, int]], dispatcher: Dispatcher, store: ArtifactStore,
                   report: dict[str, Any] | None = None, reused_seconds: float | None = None) -> bool:
    """Record the stage's artifacts and its end, then move on (the next stage is enqueued after
    commit) or finish the job; a job whose cancel was acknowledged meanwhile ends canceled instead
    (under the job's lock, as request_cancel takes it: a cancel either lands before this commit and
    wins, or after it and finds the job finished). False when the worker no longer held the stage.
    `seconds` is the work's time (kept with a stored output); `reused_seconds` the time of an attempt
    that found the output stored already (None when it computed it)."""
    job = repository.get(session, job_id, lock=True)
    if not holds(job, stage, worker):
        return False
    if job.cancel_requested:  # acknowledged while the stage ran: after its last batch, or in one without batches (report)
        _end(session, job, "canceled", store)  # what the stage stored goes with the job's other artifacts
        return True
    for name, (key, sha, size) in artifacts.items():
        repository.put_artifact(session, job_id, name, key, sha, size)
    now = utcnow()
    row = repository.stage_row(job, stage)
    row.status, row.finished_at, row.seconds, row.reused_seconds = "done", now, seconds, reused_seconds
    row.computed += int(computed)
    job.worker, job.heartbeat_at, job.attempt = None, None, 0
    if stage == STAGES[-1]:
        job.status, job.report, job.finished_at = "succeeded", finite(report), now
        job.fraction, job.stage_fraction, job.eta_seconds = 1.0, 1.0, 0.0
        repository.drop_artifacts(session, job_id, prefix="stage.")
        stages = f"jobs/{job_id}/stages"
        after_commit(session, lambda: store.delete_prefix(stages))  # intermediate outputs: only needed to resume
        return True
    job.stage = STAGES[STAGES.index(stage) + 1]
    job.stage_fraction, job.enqueued_at, job.enqueue_pending = 0.0, now, True
    job.fraction = _done_before(job.stage)
    send_after_commit(session, dispatcher, [job])
    return True


def fail(session: Session, job: Job, code: str, message: str, store: ArtifactStore) -> None:
    """End the job as failed with a code and a message for the user; a job failed by the infrastructure
    (RESUMABLE) keeps its inputs and finished stages for `ladder jobs resume`."""
    job.error_code, job.error_message = code, message
    _end(session, job, "failed", store, keep=code in RESUMABLE)


def stop(session: Session, job_id: uuid.UUID, stage: str, worker: str, status: str, store: ArtifactStore,
         code: str | None = None, message: str | None = None) -> None:
    """End the job from the worker that holds it (canceled or failed)."""
    job = repository.get(session, job_id, lock=True)
    if not holds(job, stage, worker):
        return
    if status == "failed":
        fail(session, job, code or "internal_error", message or "the job failed", store)
    else:
        _end(session, job, "canceled", store)


def resume(session: Session, job_id: uuid.UUID) -> Job:
    """Queue a job that the infrastructure failed again at the stage it stopped in; the reconciler sends it
    within seconds. Its finished stages are reused (their outputs were kept)."""
    job = repository.get(session, job_id, lock=True)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status != "failed" or job.error_code not in RESUMABLE:
        why = f"it {job.status}" if job.status != "failed" else f"it failed with {job.error_code}, which deleted its stages"
        raise Conflict(f"job {job_id} cannot be resumed: {why}; only jobs failed by the infrastructure "
                       f"({', '.join(RESUMABLE)}) keep their stages")
    job.status, job.error_code, job.error_message, job.finished_at = "queued", None, None, None
    job.worker, job.heartbeat_at, job.attempt, job.cancel_requested = None, None, 0, False
    job.enqueue_pending, job.enqueued_at = True, None  # no time: the reconciler's next pass sends it
    return job


def _end(session: Session, job: Job, status: str, store: ArtifactStore, keep: bool = False) -> None:
    """A terminal state: the job's artifacts go (after commit) unless `keep`, the row and its error stay."""
    job.status, job.finished_at, job.worker, job.heartbeat_at, job.eta_seconds = status, utcnow(), None, None, None
    job.enqueue_pending = False
    if keep:
        return
    repository.drop_artifacts(session, job.id)
    prefix = f"jobs/{job.id}"
    after_commit(session, lambda: store.delete_prefix(prefix))


def reconcile(session: Session, stale_after_s: float | None, requeue_after_s: float, dispatcher: Dispatcher,
              pending_after_s: float = 0.0) -> list[tuple[uuid.UUID, str]]:
    """Enqueue again the jobs whose worker died (stale_after_s; None: take no stage over), whose message the broker
    lost (requeue_after_s), or whose message was never sent (enqueue_pending, after pending_after_s); what was sent."""
    now = utcnow()
    held_before = now - timedelta(seconds=stale_after_s) if stale_after_s is not None else None
    found = repository.stuck(session, held_before, now - timedelta(seconds=requeue_after_s), now - timedelta(seconds=pending_after_s))
    for job in found:
        job.enqueued_at, job.enqueue_pending = now, True
        job.worker, job.heartbeat_at = None, None  # the silent worker loses the stage; if alive, it stops at its next batch
    send_after_commit(session, dispatcher, found)
    return [(job.id, job.stage) for job in found]
