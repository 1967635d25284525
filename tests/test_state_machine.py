"""The job state machine driven in-process, as the API and a worker call it (services/jobs/service.py), on
PostgreSQL and on the embedded default's SQLite, both migrated by Alembic: a job's walk through every stage,
the claim's answers (run, skip, busy, take over, give up), progress and completion from a worker that lost
the stage, and the reconciler's three kinds of resend."""

import uuid
from datetime import timedelta

import pytest

from services.artifacts import open_store
from services.db import Database, utcnow
from services.jobs import repository, service
from services.jobs.models import STAGES
from services.jobs.service import Claim
from services.tenants.service import create_key, tenant_of

from .harness import Recorder


@pytest.fixture
def store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def _job(db: Database, sent: Recorder | None = None) -> uuid.UUID:
    """A new job of a new tenant, created as the API creates one; its id."""
    with db.session() as s:
        tenant = tenant_of(s, create_key(s, f"sm-{uuid.uuid4().hex[:8]}"))
        job, created = service.create(s, service.NewJob(uuid.uuid4(), tenant, None, "a" * 64, "b" * 64, {}, {}, {}, {}),
                                      sent or Recorder(), max_active=0)
        assert created
        return job.id


def _claim(db, job_id, stage, worker, store, stale_after_s=60.0, max_attempts=3) -> Claim:
    with db.session() as s:
        return service.claim(s, job_id, stage, worker, stale_after_s, max_attempts, store)


def _complete(db, job_id, stage, worker, store, sent=None, report=None) -> bool:
    with db.session() as s:
        return service.complete_stage(s, job_id, stage, worker, 0.5, True, {}, sent or Recorder(), store, report)


def _get(db, job_id):
    with db.reading() as s:
        job = repository.get(s, job_id)
        return job, {r.stage: (r.status, r.attempts, r.seconds) for r in job.stages}


def _age(db, job_id, **fields) -> None:
    """Move the job's times into the past (what a silent worker or a lost message leaves behind)."""
    with db.session() as s:
        job = repository.get(s, job_id, lock=True)
        for name, seconds in fields.items():
            setattr(job, name, utcnow() - timedelta(seconds=seconds))


def test_a_job_walks_through_every_stage_once_and_succeeds(db, store):
    sent = Recorder()
    job_id = _job(db, sent)
    assert sent.sent == [(job_id, STAGES[0])]  # the first stage, after the commit
    fractions = []
    for i, stage in enumerate(STAGES):
        job, _ = _get(db, job_id)
        assert (job.status, job.stage, job.worker) == ("queued" if i == 0 else "running", stage, None)
        assert _claim(db, job_id, stage, "w1", store) is Claim.RUN
        with db.session() as s:
            assert service.record_progress(s, job_id, stage, "w1", 0.5, {"loss": 0.25, "bad": float("nan")}) is False
        job, _ = _get(db, job_id)
        assert job.metrics == {"loss": 0.25} and job.worker == "w1"  # NaN is not JSON: dropped
        fractions.append(job.fraction)
        nxt = Recorder()
        assert _complete(db, job_id, stage, "w1", store, nxt, {"schema": "x"} if stage == STAGES[-1] else None)
        assert nxt.sent == ([] if stage == STAGES[-1] else [(job_id, STAGES[i + 1])])  # each next stage, once
    job, rows = _get(db, job_id)
    assert (job.status, job.fraction, job.report, job.worker, job.attempt) == ("succeeded", 1.0, {"schema": "x"}, None, 0)
    assert rows == {s: ("done", 1, 0.5) for s in STAGES}
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    assert _claim(db, job_id, STAGES[-1], "w1", store) is Claim.SKIP  # a late duplicate message changes nothing


def test_a_claim_skips_other_stages_waits_for_a_live_holder_and_takes_over_a_stale_one(db, store):
    job_id = _job(db)
    assert _claim(db, job_id, STAGES[1], "w1", store) is Claim.SKIP  # a message for a later stage: dropped
    assert _claim(db, job_id, STAGES[0], "w1", store) is Claim.RUN
    assert _claim(db, job_id, STAGES[0], "w1", store) is Claim.RUN  # its answer was lost: the same claim again
    assert _get(db, job_id)[0].attempt == 1  # not counted twice
    assert _claim(db, job_id, STAGES[0], "w2", store) is Claim.BUSY  # w1's heartbeat is fresh
    _age(db, job_id, heartbeat_at=120)
    assert _claim(db, job_id, STAGES[0], "w2", store) is Claim.RUN  # stale: w2 takes it over
    job, rows = _get(db, job_id)
    assert (job.worker, job.attempt, rows[STAGES[0]][1]) == ("w2", 2, 2)
    with db.session() as s:  # w1 wakes up: told to stop, and its end is not recorded
        assert service.record_progress(s, job_id, STAGES[0], "w1", 0.9, {}) is True
    assert _complete(db, job_id, STAGES[0], "w1", store) is False
    assert _get(db, job_id)[1][STAGES[0]][0] == "running"
    assert _complete(db, job_id, STAGES[0], "w2", store)
    assert _get(db, job_id)[0].stage == STAGES[1]


def test_a_stage_that_loses_its_worker_max_attempts_times_fails_the_job(db, store):
    job_id = _job(db)
    for worker in ("w1", "w2"):
        assert _claim(db, job_id, STAGES[0], worker, store, max_attempts=2) is Claim.RUN
        _age(db, job_id, heartbeat_at=120)
    assert _claim(db, job_id, STAGES[0], "w3", store, max_attempts=2) is Claim.SKIP
    job, _ = _get(db, job_id)
    assert (job.status, job.error_code, job.worker) == ("failed", "worker_lost", None)
    assert "lost its worker 2 times" in job.error_message


def test_a_cancel_ends_a_queued_job_at_once_and_a_running_one_at_its_holders_next_step(db, store):
    queued = _job(db)
    with db.session() as s:
        service.request_cancel(s, repository.get(s, queued, lock=True), store)
    assert _get(db, queued)[0].status == "canceled"  # no worker held it: ended at once
    running = _job(db)
    assert _claim(db, running, STAGES[0], "w1", store) is Claim.RUN
    with db.session() as s:
        service.request_cancel(s, repository.get(s, running, lock=True), store)
        assert service.record_progress(s, running, STAGES[0], "w1", 0.1, {}) is True  # the holder stops at its next batch
    assert _complete(db, running, STAGES[0], "w1", store)
    assert _get(db, running)[0].status == "canceled"


def test_the_reconciler_resends_stale_lost_and_unsent_stages_and_nothing_else(db, store):
    fresh, lost, unsent, stale, live = (_job(db) for _ in range(5))  # each first message sent (the Recorder)
    _age(db, lost, enqueued_at=1000)  # queued long ago, no worker took it: the broker lost the message
    _age(db, unsent, enqueued_at=10)
    with db.session() as s:  # its message could not be sent (the broker was down): still marked
        repository.get(s, unsent, lock=True).enqueue_pending = True
    for job_id in (stale, live):
        assert _claim(db, job_id, STAGES[0], "w1", store) is Claim.RUN
    _age(db, stale, heartbeat_at=120)
    sent = Recorder()
    with db.session() as s:
        again = service.reconcile(s, 60.0, 900.0, sent, pending_after_s=5.0)
    mine = {fresh, lost, unsent, stale, live}
    assert {j for j, _ in again if j in mine} == {lost, unsent, stale}
    assert {j for j, _ in sent.sent if j in mine} == {lost, unsent, stale}
    job, _ = _get(db, stale)
    assert (job.worker, job.status) == (None, "running")  # the silent worker loses the stage; the next claim takes it
    _age(db, live, heartbeat_at=120)
    with db.session() as s:  # after a database outage, no stage is taken over (stale_after_s None) ...
        assert live not in {j for j, _ in service.reconcile(s, None, 900.0, Recorder(), pending_after_s=5.0)}
    with db.session() as s:  # ... until the grace has passed
        assert live in {j for j, _ in service.reconcile(s, 60.0, 900.0, Recorder(), pending_after_s=5.0)}
