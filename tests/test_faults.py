"""Faults cost seconds, never a job. Units: which errors are the infrastructure's and how they are retried; the
service's steps that recovery relies on (a claim retried after a lost answer, stages sent again while their
message is pending, a job failed by the store keeps its stages and resumes). Then the real thing: PostgreSQL
connections of the job's database terminated again and again through every stage, Redis stopped while a stage
finishes, and an artifact store that runs out of space, against `ladder serve` and real Celery workers."""

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import kombu.exceptions
import psycopg
import pytest
import redis
from botocore.exceptions import ClientError, EndpointConnectionError
from safetensors import SafetensorError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from services import faults
from services.db import Database, utcnow
from services.jobs import repository, service
from services.jobs.models import STAGES, Job
from services.jobs.service import Claim, Conflict
from services.tenants.service import create_key, tenant_of

from . import harness
from .harness import Recorder
from .test_service import _auth, _config, _submit, inputs  # noqa: F401

# -- which errors are the infrastructure's ------------------------------------------------------------------------

def _s3_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("error, code", [
    (OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")), faults.DATABASE),
    (psycopg.OperationalError("terminating connection due to administrator command"), faults.DATABASE),
    (redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379"), faults.BROKER),
    (kombu.exceptions.OperationalError("Error 111 connecting"), faults.BROKER),
    (OSError(errno.ENOSPC, "No space left on device"), faults.STORAGE_FULL),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), faults.STORAGE_FULL),
    (_s3_error("XMinioStorageFull", 507), faults.STORAGE_FULL),
    (_s3_error("SlowDown", 503), faults.STORAGE_UNAVAILABLE),
    (EndpointConnectionError(endpoint_url="http://minio:9000"), faults.STORAGE_UNAVAILABLE),
    (faults.Unavailable(faults.STORAGE_FULL, "x"), faults.STORAGE_FULL),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), faults.STORAGE_FULL),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), None),
    # the method's own errors and bad input are not the infrastructure's
    (RuntimeError("CUDA out of memory"), None),
    (ValueError("bad shape"), None),
    (IntegrityError("INSERT", {}, Exception("duplicate key")), None),
    (_s3_error("NoSuchKey", 404), None),
    (_s3_error("AccessDenied", 403), None),
    (FileNotFoundError(errno.ENOENT, "missing"), None),
])
def test_classify(error, code):
    assert faults.classify(error) == code


def test_classify_follows_an_explicit_cause_only():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("could not store") from e
    except RuntimeError as wrapped:
        assert faults.classify(wrapped) == faults.STORAGE_FULL
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("a bug while handling it")  # noqa: B904  (implicit context: not the infrastructure's)
    except RuntimeError as bug:
        assert faults.classify(bug) is None


def test_retry_backs_off_then_succeeds_or_gives_up(caplog):
    sleeps, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise redis.ConnectionError("down")
        return "sent"

    assert faults.retry(flaky, "sending", 60, sleep=sleeps.append) == "sent"
    assert sleeps == [0.5, 1.0, 2.0]
    lines = [r.getMessage() for r in caplog.records if r.name == "services.faults"]
    assert len(lines) == 2 and "retrying" in lines[0] and "recovered" in lines[1]  # one line each way, not one per try

    sleeps.clear()
    with pytest.raises(faults.Unavailable) as e:
        faults.retry(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), "storing", 0.0, sleep=sleeps.append)
    assert e.value.code == faults.STORAGE_FULL and sleeps == []
    with pytest.raises(ValueError):  # not the infrastructure's: at once, no retry
        faults.retry(lambda: (_ for _ in ()).throw(ValueError("bug")), "x", 60, sleep=sleeps.append)
    assert sleeps == []


# -- the service's steps that recovery relies on --------------------------------------------------------------------

def _job(db: Database, store) -> uuid.UUID:
    with db.session() as s:
        tenant = tenant_of(s, create_key(s, f"t-{uuid.uuid4().hex[:8]}"))
        new = service.NewJob(uuid.uuid4(), tenant, None, "a" * 64, "b" * 64, {}, {}, {},
                             {"input.model": ("jobs/x/inputs/model", "c" * 64, 1)})
        job, _ = service.create(s, new, Recorder(), max_active=0)
        return job.id


def _get(db: Database, job_id: uuid.UUID) -> Job:
    with db.reading() as s:
        return repository.get(s, job_id)


@pytest.fixture
def store(tmp_path):
    from services.artifacts import open_store

    return open_store(tmp_path.as_uri())


def test_a_sent_stage_clears_its_mark_and_an_unsent_one_is_sent_by_the_reconciler(db, store):  # noqa: F811
    class Down(Recorder):
        def enqueue(self, job_id, stage):
            raise kombu.exceptions.OperationalError("Error 111 connecting to redis")

    with db.session() as s:
        tenant = tenant_of(s, create_key(s, f"t-{uuid.uuid4().hex[:8]}"))
        job, _ = service.create(s, service.NewJob(uuid.uuid4(), tenant, None, "a" * 64, "b" * 64, {}, {}, {}, {}), Down(), 0)
    assert _get(db, job.id).enqueue_pending  # the broker was down: the mark stays
    up = Recorder()
    with db.session() as s:  # the pending window has not passed yet: nothing is sent
        assert service.reconcile(s, 60, 900, up, pending_after_s=3600) == []
    with db.session() as s:
        assert service.reconcile(s, 60, 900, up, pending_after_s=0) == [(job.id, STAGES[0])]
    assert up.sent == [(job.id, STAGES[0])] and not _get(db, job.id).enqueue_pending
    with db.session() as s:  # sent: not again
        assert service.reconcile(s, 60, 900, up, pending_after_s=0) == []


def test_a_claim_retried_after_its_answer_was_lost_runs_once(db, store):  # noqa: F811
    job_id = _job(db, store)
    for _ in range(2):
        with db.session() as s:
            assert service.claim(s, job_id, STAGES[0], "w1", 60, 3, store) is Claim.RUN
    job = _get(db, job_id)
    assert job.attempt == 1 and repository.stage_row(job, STAGES[0]).attempts == 1
    with db.session() as s:  # another worker meanwhile: the holder's heartbeat is fresh
        assert service.claim(s, job_id, STAGES[0], "w2", 60, 3, store) is Claim.BUSY


def test_no_stage_is_taken_over_while_the_reconciler_holds_off(db, store):  # noqa: F811
    job_id = _job(db, store)
    with db.session() as s:
        service.claim(s, job_id, STAGES[0], "w1", 60, 3, store)
        repository.get(s, job_id).heartbeat_at = utcnow().replace(year=2000)  # silent for ages
    with db.session() as s:
        assert service.reconcile(s, None, 900, Recorder()) == []  # stale_after_s=None: after an outage
    with db.session() as s:
        assert service.reconcile(s, 60, 900, Recorder()) == [(job_id, STAGES[0])]


def test_a_job_the_store_failed_keeps_its_stages_and_resumes(db, store, tmp_path):  # noqa: F811
    job_id = _job(db, store)
    kept = tmp_path / f"jobs/{job_id}/stages/x/latents.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"stage")
    with db.session() as s:
        service.claim(s, job_id, STAGES[0], "w1", 60, 3, store)
        service.complete_stage(s, job_id, STAGES[0], "w1", 12.5, True, {"stage.latents": ("k", "d" * 64, 5)}, Recorder(), store)
    with db.session() as s:
        service.claim(s, job_id, STAGES[1], "w1", 60, 3, store)
        service.stop(s, job_id, STAGES[1], "w1", "failed", store, faults.STORAGE_FULL, "the store is full")
    job = _get(db, job_id)
    assert (job.status, job.error_code, job.stage) == ("failed", faults.STORAGE_FULL, STAGES[1])
    with db.reading() as s:
        assert {a.name for a in repository.artifacts(s, job_id)} == {"input.model", "stage.latents"}
    assert kept.exists()
    with db.session() as s:
        service.resume(s, job_id)
    job = _get(db, job_id)
    assert (job.status, job.stage, job.error_code, job.enqueue_pending, job.attempt) == ("queued", STAGES[1], None, True, 0)
    sent = Recorder()
    with db.session() as s:  # no waiting: a resumed job has no enqueue time
        assert service.reconcile(s, 60, 900, sent, pending_after_s=3600) == [(job_id, STAGES[1])]
    with db.session() as s, pytest.raises(Conflict, match="cannot be resumed: it queued"):
        service.resume(s, job_id)


def test_a_job_failed_by_its_method_is_not_resumable_and_loses_its_files(db, store, tmp_path):  # noqa: F811
    job_id = _job(db, store)
    (tmp_path / f"jobs/{job_id}").mkdir(parents=True)
    with db.session() as s:
        service.claim(s, job_id, STAGES[0], "w1", 60, 3, store)
        service.stop(s, job_id, STAGES[0], "w1", "failed", store, "internal_error", "bug")
    assert not (tmp_path / f"jobs/{job_id}").exists()
    with db.session() as s, pytest.raises(Conflict, match="internal_error, which deleted its stages"):
        service.resume(s, job_id)


def test_reused_stage_time_is_kept_apart(db, store):  # noqa: F811
    job_id = _job(db, store)
    with db.session() as s:
        service.claim(s, job_id, STAGES[0], "w1", 60, 3, store)
        service.complete_stage(s, job_id, STAGES[0], "w1", 9.75, False, {}, Recorder(), store, reused_seconds=0.4)
    row = repository.stage_row(_get(db, job_id), STAGES[0])
    assert (row.seconds, row.reused_seconds, row.computed) == (9.75, 0.4, 0)


def test_a_stage_output_carries_its_work_time(tmp_path):
    from services import checkpoints

    checkpoints.save({"x": 1}, tmp_path / "a.safetensors", seconds=12.25)
    checkpoints.save({"x": 1}, tmp_path / "b.safetensors")
    assert checkpoints.work_seconds(tmp_path / "a.safetensors") == 12.25
    assert checkpoints.work_seconds(tmp_path / "b.safetensors") is None


# -- the real thing: PostgreSQL, Redis, `ladder serve` and Celery workers -----------------------------------------

def _env(database: str, broker: str, store: Path, tmp: Path, **settings: str) -> dict[str, str]:
    """Default windows (reconciler, requeue, heartbeat): only what each test names is changed."""
    return {"LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": broker, "LADDER_ARTIFACTS_URL": store.as_uri(),
            "LADDER_QUEUE": f"ladder-faults-{uuid.uuid4().hex[:8]}", "LADDER_DATA_DIR": str(tmp / "data"),
            "LADDER_API_KEY_CACHE_S": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **settings}


def _poll(url: str, key: str, done, timeout: float = 400) -> dict:
    """Poll a job until `done(job)`, through 503s (the database's trouble is the API's too)."""
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers=_auth(key), timeout=10)
            if r.status_code == 200:
                job = r.json()
                if done(job):
                    return job
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}: still {job.get('status')} at {job.get('stage')}")


def _stages(database: str, job_id: str) -> dict[str, dict]:
    engine = create_engine(database)
    try:
        with engine.connect() as c:
            rows = c.execute(text("SELECT stage, status, attempts, computed, started_at, finished_at, seconds, reused_seconds "
                                  "FROM job_stages WHERE job_id = :j"), {"j": job_id}).mappings().all()
        return {r["stage"]: dict(r) for r in rows}
    finally:
        engine.dispose()


@pytest.fixture
def services_up(database, tmp_path):  # noqa: F811
    """Start `ladder serve` and one Celery worker with given settings; stopped at the end."""
    procs = []

    def start(broker: str, store: Path, database_url: str | None = None, **settings: str):
        env = _env(database_url or database, broker, store, tmp_path, **settings)
        server = harness.Server(env, tmp_path / f"api{len(procs)}.log")
        procs.append(server)
        worker = harness.worker(env, tmp_path / f"worker{len(procs)}.log")
        procs.append(worker)
        return env, server, worker, harness.create_key(env, f"faults-{uuid.uuid4().hex[:6]}")

    yield start
    for p in procs:
        p.stop()


@pytest.mark.slow
def test_database_connections_terminated_through_every_stage(database, inputs, services_up, tmp_path):  # noqa: F811
    """Every connection of the job's database is terminated about twice a second from the first stage to the last
    (pg_terminate_backend, as a restart, a failover or a pooler recycling connections does it): the job succeeds
    and no stage is computed twice."""
    _, server, worker, key = services_up(harness.REDIS_URL, tmp_path / "store")
    name = database.rsplit("/", 1)[1]
    r = _submit(server, key, inputs, _config())
    assert r.status_code == 202, r.text
    url = f"{server.url}/v1/jobs/{r.json()['id']}"
    stop, killed = threading.Event(), []

    def terminate():
        with psycopg.connect(harness.PG_ADMIN, autocommit=True) as conn:
            while not stop.wait(0.5):
                killed.append(conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                           "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0])

    t = threading.Thread(target=terminate, daemon=True)
    t.start()
    try:
        job = _poll(url, key, lambda j: j["status"] in ("succeeded", "failed", "canceled"))
    finally:
        stop.set()
        t.join()
    assert job["status"] == "succeeded", (job, worker.tail())
    assert sum(killed) > 20, killed  # the connections really were cut, many times
    stages = _stages(database, job["id"])
    assert {s: r["computed"] for s, r in stages.items()} == dict.fromkeys(STAGES, 1), stages
    assert "internal_error" not in worker.tail(100_000)


def _wait_stage(database: str, job_id: str, stage: str, column: str, timeout: float = 300) -> object:
    """Wait until the stage's row has `column` set (read past any proxy); its value."""
    deadline = time.monotonic() + timeout
    while (value := _stages(database, job_id)[stage][column]) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value is not None, f"{stage}.{column} still unset after {timeout} s"
    return value


@pytest.mark.slow
def test_the_database_down_while_a_stage_ends(database, inputs, services_up, tmp_path):  # noqa: F811
    """API and worker reach PostgreSQL through a proxy that is cut for 25 s while the generator stage runs and
    ends: the stage keeps computing, records its end within seconds of the database's return, and the job
    succeeds with no stage computed twice."""
    from .outages import TcpProxy

    host = database.split("@", 1)[1].split("/", 1)[0]
    pg_host, pg_port = host.rsplit(":", 1) if ":" in host else (host, "5432")
    with TcpProxy(pg_host, int(pg_port)) as proxy:
        via_proxy = database.replace(f"@{host}/", f"@127.0.0.1:{proxy.port}/")
        _, server, worker, key = services_up(harness.REDIS_URL, tmp_path / "store", via_proxy)
        r = _submit(server, key, inputs, _config(generator={"max_epochs": 100, "time_budget_s": 15}))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        _wait_stage(database, job_id, "generator", "started_at")
        proxy.cut()
        time.sleep(25)  # the generator's 15 s budget ends in the outage
        proxy.restore()
        back = utcnow()
        finished = _wait_stage(database, job_id, "generator", "finished_at", timeout=120)
        assert (finished - back).total_seconds() < 10, (finished - back, worker.tail())
        job = _poll(f"{server.url}/v1/jobs/{job_id}", key, lambda j: j["status"] in ("succeeded", "failed", "canceled"))
    assert job["status"] == "succeeded", (job, worker.tail())
    stages = _stages(database, job_id)
    assert {s: r["computed"] for s, r in stages.items()} == dict.fromkeys(STAGES, 1), stages
    assert stages["generator"]["attempts"] == 1, stages  # not handed back: it waited for the database
    log = worker.tail(200_000)
    assert "recording its end: the database is unreachable" in log and "recovered after" in log, log[-3000:]


@pytest.mark.slow
def test_redis_stopped_while_a_stage_finishes(database, inputs, services_up, tmp_path):  # noqa: F811
    """Redis goes down while the boundary stage runs and stays down after it finished (its next stage's message
    cannot be sent); with default settings the next stage starts within 10 s of Redis' return."""
    from .outages import RedisServer

    broker = RedisServer()
    try:
        _, server, worker, key = services_up(broker.url, tmp_path / "store")
        r = _submit(server, key, inputs, _config(generator={"max_epochs": 3, "time_budget_s": 20}))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        url = f"{server.url}/v1/jobs/{job_id}"
        _wait_stage(database, job_id, "boundary", "started_at")  # a worker holds it: its message is consumed
        broker.stop()
        # the boundary stage finishes with Redis down: the job moves on in the database, no worker takes it
        _poll(url, key, lambda j: j["progress"]["stage"] == "generator", timeout=300)
        time.sleep(8)
        assert _stages(database, job_id)["generator"]["started_at"] is None, "the generator ran without a broker?"
        broker.start()
        back = utcnow()
        started = _wait_stage(database, job_id, "generator", "started_at", timeout=60)
        assert (started - back).total_seconds() < 10, (started - back, worker.tail())
        job = _poll(url, key, lambda j: j["status"] in ("succeeded", "failed", "canceled"))
        assert job["status"] == "succeeded", (job, worker.tail())
        assert all(r["computed"] == 1 for r in _stages(database, job_id).values())
    finally:
        broker.close()


@pytest.mark.slow
def test_a_full_store_fails_as_storage_full_keeps_its_stages_and_resumes(database, inputs, services_up, tmp_path):  # noqa: F811
    """The store's file system fills up (a file takes the space the store's reserve needs) while the generator
    stage runs: the job fails as storage_full, keeping its inputs and finished stages; once the space is freed,
    `ladder jobs resume` finishes it without computing those stages again."""
    store = tmp_path / "store"
    store.mkdir()
    free = os.statvfs(store).f_bavail * os.statvfs(store).f_frsize
    reserve = free - (1 << 30)  # 1 GiB of headroom now; the filler below takes 2 GiB of it
    env, server, worker, key = services_up(harness.REDIS_URL, store, LADDER_STORE_MIN_FREE_BYTES=str(reserve),
                                           LADDER_INFRA_RETRY_S="3")
    r = _submit(server, key, inputs, _config(generator={"max_epochs": 30, "time_budget_s": 15}))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    url = f"{server.url}/v1/jobs/{job_id}"
    _poll(url, key, lambda j: j["progress"]["stage"] == "generator" and j["status"] == "running", timeout=300)
    filler = tmp_path / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 2 << 30)
    try:
        job = _poll(url, key, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=300)
    finally:
        filler.unlink()
    assert job["status"] == "failed" and job["error"]["code"] == "storage_full", job
    assert "ladder jobs resume" in job["error"]["message"], job
    kept = {p.relative_to(store / "jobs" / job_id).parts[0] for p in (store / "jobs" / job_id).rglob("*.safetensors")}
    assert kept == {"inputs", "stages"}, kept
    out = subprocess.run([sys.executable, "-m", "services.cli", "jobs", "resume", job_id], env={**os.environ, **env},
                         cwd=harness.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job = _poll(url, key, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=400)
    assert job["status"] == "succeeded", (job, worker.tail())
    stages = _stages(database, job_id)
    assert stages["latents"]["computed"] == 1 and stages["boundary"]["computed"] == 1, stages
    assert stages["generator"]["computed"] == 1, stages  # its first run stored nothing: computed once, by the resumed job
    again = subprocess.run([sys.executable, "-m", "services.cli", "jobs", "resume", job_id], env={**os.environ, **env},
                           cwd=harness.ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "cannot be resumed" in again.stderr
