"""What the API answers while its infrastructure is down, against real processes over HTTP: a `ladder serve` whose
PostgreSQL connections go through a TcpProxy that is cut (every poll 503 with Retry-After and a problem document,
one log line each, no traceback, /readyz 503, and 200 again within seconds of the database's return), a private
Redis that is stopped (an upload still creates its job), a store under its free-space reserve and an API whose
upload folder is full (507, nothing left behind, /readyz naming the store)."""

import hashlib
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from . import harness
from .bad_uploads import good_parts
from .outages import RedisServer, TcpProxy

pytestmark = pytest.mark.slow

RETRY_AFTER = "7"  # LADDER_RETRY_AFTER_S of the test servers: not the default, so the header is seen to come from it


@pytest.fixture(scope="module")
def proxy(database):
    url = make_url(database)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as p:
        yield p


@pytest.fixture(scope="module")
def broker():
    with RedisServer() as r:
        yield r


def _env(database: str, broker: RedisServer, store: Path, data: Path, **settings: str) -> dict[str, str]:
    return {
        "LADDER_DATABASE_URL": database, "LADDER_BROKER_URL": broker.url, "LADDER_QUEUE": f"ladder-test-{uuid.uuid4().hex[:8]}",
        "LADDER_ARTIFACTS_URL": store.as_uri(), "LADDER_DATA_DIR": str(data), "LADDER_RETRY_AFTER_S": RETRY_AFTER,
        "LADDER_STORE_MIN_FREE_BYTES": "0", "LADDER_API_KEY_CACHE_S": "600",  # routes, not only the key lookup, meet the outage
        "LADDER_RECONCILE_EVERY_S": "3600",  # the reconciler's own outage lines are not these tests' subject
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **settings,
    }


@pytest.fixture(scope="module")
def served(database, proxy, broker, tmp_path_factory):
    """`ladder serve` whose database connections go through the proxy, an API key, and a queued job (no worker)."""
    through = make_url(database).set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
    store = tmp_path_factory.mktemp("artifacts")
    env = _env(through, broker, store, tmp_path_factory.mktemp("data"))
    server = harness.Server(env, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        key = harness.create_key(env, "acme")
        r = harness.submit_parts(server.url, key, good_parts(tmp_path_factory.mktemp("parts")))
        assert r.status_code == 202, r.text
        yield server, key, r.json()["id"], store
    finally:
        server.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _lines(server: harness.Server, since: int) -> list[str]:
    return server.log.read_bytes()[since:].decode(errors="replace").splitlines()


def _retry_later(r: httpx.Response, status: int, *words: str) -> None:
    """An outage's answer: `status`, Retry-After from the settings, a problem document naming what is down."""
    assert r.status_code == status, (r.request.method, r.request.url.path, r.status_code, r.text)
    assert r.headers["retry-after"] == RETRY_AFTER and r.headers["content-type"] == "application/problem+json", r.headers
    problem = r.json()
    assert problem["status"] == status and all(w in problem["detail"] for w in words), problem
    assert "Traceback" not in r.text


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def test_a_database_outage_is_503_with_retry_after_one_log_line_each_and_ends_with_it(served, proxy, tmp_path):
    server, key, job_id, store = served
    auth = _auth(key)
    job_url = f"{server.url}/v1/jobs/{job_id}"
    assert httpx.get(job_url, headers=auth).status_code == 200  # the key is cached: the routes meet the outage themselves
    stored = _files(store)
    requests = [("GET", job_url), ("GET", f"{server.url}/v1/jobs"), ("GET", f"{server.url}/v1/jobs?limit=1"),
                ("GET", f"{job_url}/model"), ("GET", f"{job_url}/report"), ("POST", f"{job_url}/cancel"),
                ("GET", f"{server.url}/metrics")]
    proxy.cut()
    try:
        time.sleep(0.3)
        since = server.log.stat().st_size
        for method, url in requests:
            _retry_later(httpx.request(method, url, headers=auth, timeout=30), 503, "database is unavailable", "again")
        upload = harness.submit_parts(server.url, key, good_parts(tmp_path))
        _retry_later(upload, 503, "database is unavailable")
        assert _files(store) == stored  # the upload left nothing in the store
        deadline = time.monotonic() + 5
        while len(_lines(server, since)) < len(requests) + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = _lines(server, since)
        assert len(lines) == len(requests) + 1 and all("503, the database is unavailable" in line for line in lines), lines
        assert proxy.refused > 0  # the API did try, and the proxy refused it

        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        _retry_later(ready, 503, "database unreachable")
    finally:
        proxy.restore()
    restored, deadline = time.monotonic(), time.monotonic() + 5
    while (r := httpx.get(job_url, headers=auth, timeout=30)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    print(f"\npolls answer 200 again {time.monotonic() - restored:.2f} s after the database returned")
    assert httpx.get(f"{server.url}/v1/jobs", headers=auth).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert "Traceback" not in server.tail(200_000)


def test_a_broker_outage_does_not_fail_an_upload_and_readyz_reports_it(served, broker, tmp_path):
    server, key, _, _ = served
    broker.stop()
    try:
        started = time.monotonic()
        r = harness.submit_parts(server.url, key, good_parts(tmp_path))
        took = time.monotonic() - started
        assert r.status_code == 202, r.text  # committed: the reconciler sends its first stage once Redis is back
        assert took < 10, f"the upload waited {took:.1f} s for the broker"
        job = httpx.get(f"{server.url}/v1/jobs/{r.json()['id']}", headers=_auth(key)).json()
        assert job["status"] == "queued", job
        _retry_later(httpx.get(f"{server.url}/readyz", timeout=30), 503, "broker unreachable")
    finally:
        broker.start()
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert "Traceback" not in server.tail(200_000)


MiB = 1 << 20
SCRATCH = 8 * MiB  # the API's upload folder in the full-disk test: good_parts (≈ 2 MiB) fits, 16 MiB does not


@pytest.fixture(scope="module")
def scratch():
    """A small tmpfs for the API's temporary folder (needs root: else None, and its test is skipped)."""
    folder = Path(tempfile.mkdtemp(prefix="ladder-scratch-"))
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SCRATCH}", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


@pytest.fixture(scope="module")
def full(database, broker, served, scratch, tmp_path_factory):
    """A second `ladder serve` (same database, direct) whose store's reserve is more than its disk has free, and
    whose temporary folder is the small tmpfs where there is one; the first server's API key."""
    store = tmp_path_factory.mktemp("full-artifacts")
    free = os.statvfs(store).f_bavail * os.statvfs(store).f_frsize
    env = _env(database, broker, store, tmp_path_factory.mktemp("full-data"), LADDER_STORE_MIN_FREE_BYTES=str(free + 1024 * MiB),
               **({"TMPDIR": str(scratch)} if scratch else {}))
    server = harness.Server(env, tmp_path_factory.mktemp("logs") / "full-api.log", probe="/healthz")
    try:
        yield server, served[1], store
    finally:
        server.stop()


def test_a_store_under_its_reserve_refuses_uploads_507_and_is_not_ready(full, tmp_path):
    server, key, store = full
    jobs = httpx.get(f"{server.url}/v1/jobs", headers=_auth(key)).json()["items"]
    since = server.log.stat().st_size
    r = harness.submit_parts(server.url, key, good_parts(tmp_path))
    _retry_later(r, 507, "artifact store is full")
    assert _files(store / "jobs") == []  # nothing of the refused upload is left: no file, no folder
    assert httpx.get(f"{server.url}/v1/jobs", headers=_auth(key)).json()["items"] == jobs  # and no job row
    lines = _lines(server, since)
    assert len(lines) == 1 and "507, the artifact store is full" in lines[0], lines
    ready = httpx.get(f"{server.url}/readyz")
    _retry_later(ready, 503, "store")
    assert "reserve" in ready.json()["detail"], ready.json()
    assert "Traceback" not in server.tail(200_000)


def test_an_api_whose_upload_folder_is_full_answers_507_and_keeps_nothing(full, scratch, tmp_path):
    if scratch is None:
        pytest.skip("needs root to mount a small tmpfs as the API's temporary folder")
    server, key, store = full
    parts = {**good_parts(tmp_path), "train_data": ("train.npz", b"\0" * (2 * SCRATCH), "application/octet-stream")}
    since = server.log.stat().st_size
    r = harness.submit_parts(server.url, key, parts)
    _retry_later(r, 507, "the API's space for uploads is full", "TMPDIR")
    lines = _lines(server, since)
    assert len(lines) == 1 and "507, the API's space for uploads" in lines[0], lines
    assert list(scratch.iterdir()) == []  # the upload's folder is gone, and with it the part that filled the disk
    assert _files(store / "jobs") == []


@pytest.fixture(scope="module")
def gone(database, broker, served, tmp_path_factory):
    """A third `ladder serve` (same database, direct) whose S3 store's endpoint nobody listens on; the first
    server's API key."""
    env = _env(database, broker, tmp_path_factory.mktemp("unused"), tmp_path_factory.mktemp("gone-data"),
               LADDER_ARTIFACTS_URL="s3://ladder-gone/test", LADDER_S3_ENDPOINT_URL=f"http://127.0.0.1:{harness.free_port()}",
               LADDER_S3_ACCESS_KEY_ID="test", LADDER_S3_SECRET_ACCESS_KEY="test-secret-key")
    server = harness.Server(env, tmp_path_factory.mktemp("logs") / "gone-api.log", probe="/healthz")
    try:
        yield server, served[1]
    finally:
        server.stop()


def test_an_unreachable_store_is_503_for_uploads_and_downloads_and_not_ready(gone, served, database, tmp_path):
    server, key = gone
    first, job_id = served[0], served[2]
    engine = create_engine(database)
    try:  # the first server's job, finished as far as the database says: its "hardened weights" are its stored upload
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE jobs SET status = 'succeeded' WHERE id = %(id)s", {"id": job_id})
            c.exec_driver_sql("INSERT INTO artifacts (job_id, name, key, sha256, size, created_at) SELECT job_id, 'model', key, "
                              "sha256, size, now() FROM artifacts WHERE job_id = %(id)s AND name = 'input.model'", {"id": job_id})
    finally:
        engine.dispose()
    weights = httpx.get(f"{first.url}/v1/jobs/{job_id}/model", headers=_auth(key), timeout=60)  # from the store that works
    assert weights.status_code == 200 and weights.content == good_parts(tmp_path)["model"][1], weights.status_code
    assert weights.headers["etag"] == f'"{hashlib.sha256(weights.content).hexdigest()}"'
    for attempt in ("upload", "download"):
        since = server.log.stat().st_size
        if attempt == "upload":
            r = harness.submit_parts(server.url, key, good_parts(tmp_path))
        else:
            r = httpx.get(f"{server.url}/v1/jobs/{job_id}/model", headers=_auth(key), timeout=60)
        _retry_later(r, 503, "the artifact store is unreachable", "again")
        lines = _lines(server, since)
        assert len(lines) == 1 and "503, the artifact store is unreachable" in lines[0], (attempt, lines)
        if attempt == "upload":  # its cleanup could not reach the store either: said on the same line
            assert "not deleted" in lines[0] and "the sweeper removes it" in lines[0], lines
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    _retry_later(ready, 503, "store cannot connect")
    assert "Traceback" not in server.tail(200_000)
