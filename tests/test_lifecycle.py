"""The job life cycle where requests race: the cap on a tenant's active jobs under concurrent
submissions, and a cancel during the last stage. The races are made deterministic by driving the
service's functions from the test (what the API and a worker call) against a real PostgreSQL and
the embedded default's SQLite (both migrated by Alembic), holding a transaction open where the other
side must wait; then over real HTTP against `ladder serve` on PostgreSQL, the test acting as the
worker where the timing matters (services.jobs.service, as workers/runner.py calls it)."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from api.problems import status_of
from services.artifacts import open_store
from services.db import Database
from services.jobs import repository, service
from services.jobs.models import STAGES, Job
from services.jobs.service import Claim, Conflict, TooManyJobs
from services.settings import Settings, get_settings
from services.tenants.service import create_key, tenant_of

from .harness import Recorder
from .test_service import _auth, _config, _rows, _store_files, _submit, env, inputs, keys, server  # noqa: F401

pytestmark = pytest.mark.slow
CAP = Settings.model_fields["max_active_jobs_per_tenant"].default  # what the test server runs with


def _tenant(db: Database) -> uuid.UUID:
    """A new tenant (with a key, as `ladder keys create` makes one); its id."""
    with db.session() as s:
        return tenant_of(s, create_key(s, f"t-{uuid.uuid4().hex[:8]}"))


def _new_key(database: str) -> str:
    """An API key of a new tenant (in-process: what `ladder keys create` does, without starting a process)."""
    d = Database(database)
    try:
        with d.session() as s:
            return create_key(s, f"capped-{uuid.uuid4().hex[:8]}")
    finally:
        d.engine.dispose()


def _new(tenant: uuid.UUID, key: str | None = None, digest: str = "a" * 64, artifacts=None) -> service.NewJob:
    return service.NewJob(uuid.uuid4(), tenant, key, digest, "b" * 64, {}, {}, {}, artifacts or {})


def _create(db: Database, new: service.NewJob, cap: int | None):
    with db.session() as s:
        job, created = service.create(s, new, Recorder(), max_active=cap)
        return job.id, created


def _status(db: Database, job_id: uuid.UUID) -> str:
    with db.reading() as s:
        return repository.get(s, job_id).status


def _cancel(db: Database, job_id: uuid.UUID, store) -> tuple[str, bool]:
    with db.session() as s:
        job = service.request_cancel(s, repository.get(s, job_id, lock=True), store)
        return job.status, job.cancel_requested


def test_a_tenants_active_jobs_are_capped_and_replays_and_finished_jobs_are_not_counted(db, tmp_path, monkeypatch):
    store = open_store(tmp_path.as_uri())
    tenant, other = _tenant(db), _tenant(db)
    first, _ = _create(db, _new(tenant, "k1"), cap=2)
    _create(db, _new(tenant), cap=2)
    with pytest.raises(TooManyJobs) as e:
        _create(db, _new(tenant), cap=2)
    assert status_of(e.value) == 429 and e.value.retry_after_s == 60
    assert str(e.value).startswith("this tenant has 2 active jobs (queued or running)")
    assert "wait for one to finish, or cancel one" in str(e.value) and "LADDER_MAX_ACTIVE_JOBS_PER_TENANT=2" in str(e.value)
    assert _create(db, _new(tenant, "k1"), cap=2) == (first, False)  # a replay at the cap: the same job, not refused
    with pytest.raises(Conflict):  # the key used for another request: still 422, not 429
        _create(db, _new(tenant, "k1", digest="c" * 64), cap=2)
    assert _create(db, _new(other), cap=2)[1]  # another tenant's count is its own
    assert _create(db, _new(tenant), cap=0)[1]  # 0: no cap
    assert _cancel(db, first, store) == ("canceled", True)  # a finished job leaves the count: 2 active now
    assert _create(db, _new(tenant), cap=3)[1]
    with pytest.raises(TooManyJobs, match="this tenant has 3 active jobs"):
        _create(db, _new(tenant), cap=3)

    monkeypatch.setenv("LADDER_MAX_ACTIVE_JOBS_PER_TENANT", "2")  # without max_active: the setting
    get_settings.cache_clear()
    try:
        assert _create(db, _new(other), cap=None)[1]  # its second
        with pytest.raises(TooManyJobs, match="this tenant has 2 active jobs"):
            _create(db, _new(other), cap=None)
    finally:
        get_settings.cache_clear()


def _race(db: Database, first: service.NewJob, second: service.NewJob, cap: int):
    """Create `first` and, before its transaction commits, try `second` from another thread; what the second got
    (its (job id, created), or the exception), and whether it had to wait for the first commit."""
    got: dict = {}

    def other():
        try:
            got["result"] = _create(db, second, cap)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            got["result"] = e

    t = threading.Thread(target=other)
    with db.session() as s:
        service.create(s, first, Recorder(), max_active=cap)
        t.start()
        t.join(1.5)
        waited = t.is_alive()  # blocked on the tenant's row, not counting around the first's uncommitted insert
    t.join(30)
    assert not t.is_alive()
    return got["result"], waited


def test_concurrent_submissions_of_a_tenant_take_turns_at_the_cap(db):
    tenant = _tenant(db)
    result, waited = _race(db, _new(tenant), _new(tenant), cap=1)
    assert waited and isinstance(result, TooManyJobs), result
    with db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant)) == 1

    # the same Idempotency-Key twice at once, at the cap: the second waits and gets the first's job back
    tenant = _tenant(db)
    first = _new(tenant, "same")
    result, waited = _race(db, first, _new(tenant, "same"), cap=1)
    assert waited and result == (first.id, False), result

    if db.engine.dialect.name == "postgresql":  # another tenant does not wait (SQLite has one lock for every writer)
        a, b = _tenant(db), _tenant(db)
        result, waited = _race(db, _new(a), _new(b), cap=1)
        assert not waited and result[1] is True


def _to_report_stage(db: Database, store, tmp_path, worker: str = "w1") -> uuid.UUID:
    """A job whose stages before report are done (each with a stored output), its report stage claimed by `worker`."""
    tenant = _tenant(db)
    job_id = uuid.uuid4()
    src = tmp_path / "bytes"
    src.write_bytes(b"x" * 100)
    key = f"jobs/{job_id}/inputs/model.safetensors"
    new = service.NewJob(job_id, tenant, None, "a" * 64, "b" * 64, {}, {}, {}, {"input.model": (key, *store.put(key, src))})
    with db.session() as s:
        service.create(s, new, Recorder(), max_active=0)
    for stage in STAGES:
        with db.session() as s:
            assert service.claim(s, job_id, stage, worker, 60, 3, store) is Claim.RUN
        if stage == STAGES[-1]:
            return job_id
        k = f"jobs/{job_id}/stages/{'b' * 16}/{stage}.safetensors"
        with db.session() as s:
            assert service.complete_stage(s, job_id, stage, worker, 0.1, True, {f"stage.{stage}": (k, *store.put(k, src))},
                                          Recorder(), store)
    raise AssertionError("unreachable")


def _finish_report(db: Database, job_id: uuid.UUID, store, tmp_path, worker: str = "w1") -> bool:
    """What the worker does at the end of the report stage: store the results, then record the stage."""
    src = tmp_path / "weights"
    src.write_bytes(b"w" * 100)
    key = f"jobs/{job_id}/results/ladder.safetensors"
    arts = {"model": (key, *store.put(key, src))}
    with db.session() as s:
        return service.complete_stage(s, job_id, "report", worker, 0.2, True, arts, Recorder(), store, {"schema": "x"})


def test_a_cancel_during_the_report_stage_ends_the_job_canceled(db, tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    job_id = _to_report_stage(db, store, tmp_path)
    assert _cancel(db, job_id, store) == ("running", True)  # acknowledged: the worker stops the job itself
    assert _finish_report(db, job_id, store, tmp_path)
    with db.reading() as s:
        job = repository.get(s, job_id)
        assert (job.status, job.report, job.worker) == ("canceled", None, None)
        assert repository.artifacts(s, job_id) == []
    assert not (tmp_path / "store" / "jobs" / str(job_id)).exists()  # inputs, stage outputs and results alike
    with db.session() as s, pytest.raises(Conflict, match="has already canceled"):
        service.request_cancel(s, repository.get(s, job_id, lock=True), store)


def test_a_cancel_racing_the_final_commit_waits_for_it_and_then_answers_409(db, tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    job_id = _to_report_stage(db, store, tmp_path)
    got: dict = {}

    def cancel():
        try:
            got["result"] = _cancel(db, job_id, store)
        except Conflict as e:
            got["result"] = e

    src = tmp_path / "weights"
    src.write_bytes(b"w" * 100)
    key = f"jobs/{job_id}/results/ladder.safetensors"
    t = threading.Thread(target=cancel)
    with db.session() as s:  # the worker's final transaction, open
        assert service.complete_stage(s, job_id, "report", "w1", 0.2, True, {"model": (key, *store.put(key, src))},
                                      Recorder(), store, {"schema": "x"})
        t.start()
        t.join(1.5)
        assert t.is_alive()  # the cancel waits on the job's row
    t.join(30)
    assert isinstance(got["result"], Conflict) and "has already succeeded" in str(got["result"])
    assert _status(db, job_id) == "succeeded"
    with db.reading() as s:
        assert repository.artifact(s, job_id, "model") is not None


def test_the_cap_over_http(server, keys, inputs, env, database):
    key = _new_key(database)
    jobs = []
    for i in range(CAP):
        r = _submit(server, key, inputs, _config(seed=i), idempotency_key=f"cap-{i}")
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    # one of them running: a worker (the test, as one) holds its first stage; running jobs count too
    db = Database(database)
    try:
        with db.session() as s:
            assert service.claim(s, uuid.UUID(jobs[0]), STAGES[0], "test-worker", 60, 3,
                                 open_store(env["LADDER_ARTIFACTS_URL"])) is Claim.RUN
    finally:
        db.engine.dispose()
    before = _store_files(env)
    r = _submit(server, key, inputs, _config(seed=99))
    assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json", r.text
    problem = r.json()
    assert problem["title"] == "Too Many Requests" and problem["status"] == 429
    assert problem["detail"].startswith(f"this tenant has {CAP} active jobs (queued or running)")
    assert "wait for one to finish, or cancel one" in problem["detail"]
    assert _store_files(env) == before  # the refused upload left nothing
    again = _submit(server, key, inputs, _config(seed=0), idempotency_key="cap-0")  # a replay is not refused
    assert again.status_code == 202 and again.json()["id"] == jobs[0] and again.headers["idempotent-replayed"] == "true"
    assert httpx.post(f"{server.url}/v1/jobs/{jobs[1]}/cancel", headers=_auth(key)).json()["status"] == "canceled"
    r = _submit(server, key, inputs, _config(seed=100))  # one slot free again
    assert r.status_code == 202, r.text
    jobs.append(r.json()["id"])
    for job in jobs:
        httpx.post(f"{server.url}/v1/jobs/{job}/cancel", headers=_auth(key))


def test_the_cap_answers_429_with_retry_after(server, keys, inputs, env, database):
    key = _new_key(database)
    jobs = [_submit(server, key, inputs, _config(seed=i)).json()["id"] for i in range(CAP)]
    try:
        r = _submit(server, key, inputs, _config(seed=99))
        assert r.status_code == 429 and r.headers.get("retry-after") == "60", (r.headers, r.text)
    finally:
        for job in jobs:
            httpx.post(f"{server.url}/v1/jobs/{job}/cancel", headers=_auth(key))


def test_concurrent_submissions_over_http_stop_at_the_cap(server, keys, inputs, env, database):
    key = _new_key(database)
    with ThreadPoolExecutor(CAP + 3) as pool:
        answers = list(pool.map(lambda i: _submit(server, key, inputs, _config(seed=i)), range(CAP + 3)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * CAP + [429] * 3, [r.text for r in answers if r.status_code not in (202, 429)]
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    tenant = _rows(database, "SELECT tenant_id FROM jobs WHERE id = :id", id=accepted[0])[0][0]
    assert _rows(database, "SELECT count(*) FROM jobs WHERE tenant_id = :t", t=tenant)[0][0] == CAP
    for job in accepted:
        httpx.post(f"{server.url}/v1/jobs/{job}/cancel", headers=_auth(key))


def test_a_cancel_over_http_during_the_report_stage_ends_the_job_canceled(server, keys, inputs, env, database, tmp_path):
    """The API's cancel route while a worker (the test, through the service's functions as workers/runner.py calls
    them) holds the report stage: 202 with cancel_requested, then the worker's final commit ends it canceled."""
    job_id = _submit(server, keys["acme"], inputs, _config()).json()["id"]
    url = f"{server.url}/v1/jobs/{job_id}"
    store = open_store(env["LADDER_ARTIFACTS_URL"])
    db = Database(database)
    try:
        src = tmp_path / "bytes"
        src.write_bytes(b"x" * 100)
        for stage in STAGES:
            with db.session() as s:
                assert service.claim(s, uuid.UUID(job_id), stage, "test-worker", 60, 3, store) is Claim.RUN
            if stage == "report":
                break
            k = f"jobs/{job_id}/stages/x/{stage}.safetensors"
            with db.session() as s:
                service.complete_stage(s, uuid.UUID(job_id), stage, "test-worker", 0.1, True,
                                       {f"stage.{stage}": (k, *store.put(k, src))}, Recorder(), store)
        polled = httpx.get(url, headers=_auth(keys["acme"])).json()
        assert (polled["status"], polled["progress"]["stage"]) == ("running", "report")
        r = httpx.post(f"{url}/cancel", headers=_auth(keys["acme"]))
        assert r.status_code == 202 and r.json()["cancel_requested"] and r.json()["status"] == "running"
        assert _finish_report(db, uuid.UUID(job_id), store, tmp_path, "test-worker")
    finally:
        db.engine.dispose()
    done = httpx.get(url, headers=_auth(keys["acme"])).json()
    assert done["status"] == "canceled", done
    assert not [p for p in _store_files(env) if job_id in p.as_posix()]  # its uploads, stage outputs and results
    assert _rows(database, "SELECT count(*) FROM artifacts WHERE job_id = :id", id=job_id)[0][0] == 0
    assert httpx.get(f"{url}/model", headers=_auth(keys["acme"])).status_code == 409
    again = httpx.post(f"{url}/cancel", headers=_auth(keys["acme"]))
    assert again.status_code == 409 and "has already canceled" in again.json()["detail"]
