"""The sweeper removes what crashes leave and nothing else: stored job folders no job row owns (once old enough),
interrupted writes of the store, and temp folders of dead processes; never a folder of a job that exists.
On a real PostgreSQL database, and at the end against a real `ladder serve` killed in the middle of an upload."""

import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from services import scratch, sweeper
from services.artifacts import LocalStore
from services.db import Database
from services.faults import STORAGE_UNAVAILABLE, WHAT
from services.jobs.models import Job
from services.method.models import build_classifier, net_weights
from services.tenants.models import Tenant

from . import harness
from .conftest import LENET_SPEC

GRACE = 60.0


@pytest.fixture
def db(database):
    d = Database(database, pool_size=2)
    yield d
    d.engine.dispose()


def _job(db: Database, status: str) -> uuid.UUID:
    """A job row (nothing runs it)."""
    with db.session() as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, status=status, request_digest="0" * 64, inputs_digest="0" * 64,
                  spec={}, config={}, inputs={}, metrics={})
        s.add(job)
        s.flush()
        return job.id


def _put(root: Path, key: str, at: float) -> Path:
    """A file in the store, it and its folders last modified at `at`."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 100)
    for p in [path, *path.relative_to(root).parents]:
        os.utime(root / p, (at, at))
    return path


def _scratch(root: Path, name: str, at: float | None) -> Path:
    """A temp folder with a file in it, last modified at `at` (None: now)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "part").write_bytes(b"y" * 100)
    if at is not None:
        os.utime(path / "part", (at, at))
        os.utime(path, (at, at))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(p.pid, 0)
    return p.pid


def test_a_pass_removes_orphans_partial_writes_and_dead_scratch_only(db, tmp_path, caplog):
    root, tmp = tmp_path / "store", tmp_path / "tmp"
    store = LocalStore(root)
    real = time.time()
    now, old, young = real + 120, real - 600, real + 100  # the pass runs at `now`: old is 720 s old, young 20 s

    orphan, young_orphan = uuid.uuid4(), uuid.uuid4()
    _put(root, f"jobs/{orphan}/inputs/model.safetensors", old)
    _put(root, f"jobs/{orphan}/inputs/train_data.npz.4242.tmp", old)  # the API was killed while it copied
    _put(root, f"jobs/{young_orphan}/inputs/model.safetensors", young)  # an upload whose row is not committed yet
    failed, queued = _job(db, "failed"), _job(db, "queued")
    kept = [_put(root, f"jobs/{failed}/stages/abcd/latents.safetensors", old),  # kept to resume the job
            _put(root, f"jobs/{queued}/inputs/model.safetensors", old),
            _put(root, "jobs/not-a-job-id/notes.txt", old)]  # no name the service makes: not judged
    stale = _put(root, f"jobs/{failed}/stages/abcd/boundary.safetensors.4243.tmp", old)  # a worker killed mid-write
    writing = _put(root, f"jobs/{queued}/inputs/test_data.npz.4244.tmp", young)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        dead = _dead_pid()
        gone = [_scratch(tmp, f"ladder-upload-{dead}-abcd1234", old),
                _scratch(tmp, f"ladder-stage-{live.pid}-reused01", real - 7200),  # older than the live process: its pid was reused
                _scratch(tmp, "ladder-x1y2z3_4", real - 2 * scratch.OLD_STYLE_AGE_S)]  # an older version's, two days old
        stay = [_scratch(tmp, f"ladder-stage-{live.pid}-abcd1234", None),  # its process lives (the folder is 120 s old at `now`)
                _scratch(tmp, f"ladder-upload-{dead}-young123", young),  # dead, but written within the grace period
                _scratch(tmp, "ladder-upload-a1b2c3d4", real - 7200),  # older version's, under a day old
                _scratch(tmp, "ladder-bench-abcd1234", real - 2 * scratch.OLD_STYLE_AGE_S)]  # not a folder the service makes
        with caplog.at_level(logging.WARNING, logger="services"):
            swept = sweeper.sweep(db, store, GRACE, now=now, tmp_root=tmp)
        assert swept.orphans == [str(orphan)] and not (root / "jobs" / str(orphan)).exists()
        assert (root / "jobs" / str(young_orphan) / "inputs/model.safetensors").exists()
        assert all(p.exists() for p in kept) and writing.exists() and not stale.exists()
        assert swept.partials == [stale.relative_to(root).as_posix()]
        assert sorted(swept.scratch) == sorted(str(p) for p in gone) and not any(p.exists() for p in gone)
        assert all(p.exists() for p in stay)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweeper: removed")]
        assert len(lines) == 1 + 1 + 3, lines  # one line per removal, saying what and how old
        assert f"jobs/{orphan}/ (no such job; last written 12 min ago)" in lines[0]
        assert any(f"process {dead} is gone; last written 12 min ago" in line for line in lines)

        again = sweeper.sweep(db, store, GRACE, now=now, tmp_root=tmp)  # idempotent
        assert not again
        later = sweeper.sweep(db, store, GRACE, now=now + 200, tmp_root=tmp)  # the young orphan grew old; the rest stays
        assert later.orphans == [str(young_orphan)] and later.partials == [writing.relative_to(root).as_posix()]
        assert later.scratch == [str(tmp / f"ladder-upload-{dead}-young123")]
        assert all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_the_reconcilers_sweeper_runs_when_due_and_survives_a_store_outage(db, tmp_path, caplog):
    class Down(LocalStore):
        def job_prefixes(self):
            raise OSError(errno.EIO, "Input/output error")

    orphan = uuid.uuid4()
    _put(tmp_path / "store", f"jobs/{orphan}/inputs/model.safetensors", time.time() - 600)
    run = sweeper.Sweeper(db, LocalStore(tmp_path / "store"), GRACE, interval_s=0.5, tmp_root=tmp_path / "tmp")
    assert run().orphans == [str(orphan)]  # the first call runs a pass at once
    assert run() is None  # then only every interval_s
    time.sleep(0.6)
    assert run() is not None
    assert sweeper.every_s(3600) == 300 and sweeper.every_s(2) == 1 and sweeper.every_s(40) == 10

    down = sweeper.Sweeper(db, Down(tmp_path / "store"), GRACE)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="services.sweeper"):
        assert down() is None  # one line, no traceback, and the reconciler goes on
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [
        (f"sweeper pass skipped: {WHAT[STORAGE_UNAVAILABLE]} (OSError: [Errno 5] Input/output error); next in 15 s", None)]


def test_scratch_directory_names_its_process(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # sweep this test's folder, not the machine's temp dir
    with scratch.directory("upload") as d:
        name = Path(d).name
        assert name.startswith(f"ladder-upload-{os.getpid()}-") and scratch._OURS.fullmatch(name)
        assert scratch.sweep_scratch(0.0, now=time.time() + 3600) == [] and Path(d).is_dir()  # this process lives
    with pytest.raises(ValueError, match="lowercase letters and digits"):
        scratch.directory("up-load")


# --- against a real API killed between storing an upload and committing its job ----------------------------------


def _parts(d: Path, samples: int) -> dict:
    """A valid job (an untrained LeNet, random digits) whose train_data is `samples` images."""
    if not (d / "model.safetensors").exists():
        save_file(net_weights(build_classifier(LENET_SPEC)), str(d / "model.safetensors"))
    rng = np.random.default_rng(0)
    train = d / f"train-{samples}.npz"
    if not train.exists():
        np.savez(train, x=rng.integers(0, 256, (samples, 1, 28, 28), dtype=np.uint8), y=np.arange(samples) % 10)
    return {"model": ("model.safetensors", (d / "model.safetensors").read_bytes(), "application/octet-stream"),
            "model_spec": ("spec.json", LENET_SPEC.model_dump_json().encode(), "application/json"),
            "train_data": ("train.npz", train.read_bytes(), "application/octet-stream")}


def _rows(url: str, sql: str, **params) -> list:
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            return list(c.execute(text(sql), params))
    finally:
        engine.dispose()


@pytest.mark.slow
def test_an_api_killed_between_upload_and_commit_leaves_orphans_the_sweeper_removes(database, tmp_path):
    """A real upload to `ladder serve` (PostgreSQL, Redis, a local store); the moment its first part is stored under
    jobs/<id>/inputs/, the API's process group is SIGKILLed, before the job's row commits (the rest of its parts,
    45 MB of train_data, are still being copied then). What it leaves — that folder, maybe a .tmp, and its upload temp
    folder (named with its pid) — is checked on disk, then a restarted API with a 2 s grace period removes them within
    seconds, while an earlier job's files stay. If the kill comes too late (the row committed), the upload is tried
    again (up to 4 times)."""
    store_dir, tmp, logs = tmp_path / "store", tmp_path / "tmp", tmp_path / "logs"
    for d in (store_dir, tmp, logs):
        d.mkdir()
    env = {"LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": harness.REDIS_URL,
           "LADDER_QUEUE": f"ladder-test-{uuid.uuid4().hex[:8]}", "LADDER_ARTIFACTS_URL": store_dir.as_uri(),
           "LADDER_DATA_DIR": str(tmp_path / "data"), "LADDER_API_KEY_CACHE_S": "0", "LADDER_MAX_ACTIVE_JOBS_PER_TENANT": "0",
           "LADDER_STORE_MIN_FREE_BYTES": "0", "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    api = harness.Server(env, logs / "api-0.log")
    try:
        key = harness.create_key(env, "acme")
        r = harness.submit_parts(api.url, key, _parts(tmp_path, 200))
        assert r.status_code == 202, r.text
        job = r.json()["id"]  # no worker runs: it stays queued, its inputs stored
        job_files = sorted(p for p in (store_dir / "jobs" / job).rglob("*") if p.is_file())
        assert [p.name for p in job_files] == ["model.safetensors", "train_data.npz"]

        big = _parts(tmp_path, 57_000)  # 45 MB of train_data: copying it into the store takes a while
        orphan = None
        for attempt in range(1, 5):
            if attempt > 1:
                api = harness.Server(env, logs / f"api-{attempt}.log")
            known = {p.name for p in (store_dir / "jobs").iterdir()}
            before = set(tmp.iterdir())
            upload = threading.Thread(target=_send, args=(api.url, key, big), daemon=True)
            upload.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    p.parent.parent.name not in known for p in (store_dir / "jobs").glob("*/inputs/model.safetensors")):
                time.sleep(0.001)
            pid = api.p.pid
            api.kill(signal.SIGKILL)  # the API and everything in its process group, at once
            upload.join(30)
            new = [p.name for p in (store_dir / "jobs").iterdir() if p.name not in known]
            assert len(new) == 1, (new, api.tail())
            if not _rows(database, "SELECT 1 FROM jobs WHERE id = :id", id=new[0]):
                orphan = new[0]
                break
            known.add(new[0])  # killed after the commit: a job like any other; try again
        assert orphan is not None, "the API was never killed between storing and committing"

        left = sorted(p.relative_to(store_dir / "jobs" / orphan).as_posix() for p in (store_dir / "jobs" / orphan).rglob("*")
                      if p.is_file())
        assert left[0] == "inputs/model.safetensors" and all(p.startswith("inputs/train_data.npz") for p in left[1:]), left
        scratch_left = [p for p in set(tmp.iterdir()) - before if p.name.startswith("ladder-")]
        assert scratch_left, "the killed API left no upload folder in its TMPDIR"
        assert all(p.name.startswith(f"ladder-upload-{pid}-") for p in scratch_left), (
            f"{[p.name for p in scratch_left]}: api/jobs.py must make its upload folder with services.scratch.directory('upload')")

        # a new API with a 2 s grace period: its reconciler sweeps within seconds
        api = harness.Server({**env, "LADDER_SWEEP_GRACE_S": "2", "LADDER_RECONCILE_EVERY_S": "0.5"}, logs / "api-swept.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ((store_dir / "jobs" / orphan).exists() or any(p.exists() for p in scratch_left)):
            time.sleep(0.2)
        assert not (store_dir / "jobs" / orphan).exists(), f"the orphan folder is still there\n{api.tail()}"
        assert not any(p.exists() for p in scratch_left), f"the killed API's temp folder is still there\n{api.tail()}"
        assert all(p.is_file() for p in job_files)  # the queued job's inputs stay
        assert httpx.get(f"{api.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"}).json()["status"] == "queued"
        log = api.log.read_text()
        assert f"sweeper: removed jobs/{orphan}/ (no such job" in log, log[-3000:]
        assert f"ladder-upload-{pid}-" in log and f"process {pid} is gone" in log
    finally:
        api.stop()


def _send(url: str, key: str, parts: dict) -> None:
    try:
        harness.submit_parts(url, key, parts)
    except httpx.HTTPError:  # the API was killed under it
        pass
