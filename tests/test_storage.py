"""The schema comes only from the migrations (PostgreSQL and SQLite, up and down), and both
artifact stores keep what they are given, with its SHA-256; the local store keeps its free-space
reserve, both answer a health check, and both list what the sweeper needs."""

import errno
import hashlib
import os
import time

import pytest
from sqlalchemy import create_engine, inspect

from services.artifacts import LocalStore, file_digest, open_store
from services.db import Base
from services.faults import STORAGE_FULL, classify
from services.migrate import downgrade, upgrade

from . import harness


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ladder.db'}"
        return
    harness.require_services()
    url, name = harness.create_database()
    yield url
    harness.drop_database(name)


def test_migrations_upgrade_downgrade_and_match_the_models(database_url):
    import services.jobs.models  # noqa: F401
    import services.tenants.models  # noqa: F401

    upgrade(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)
    engine = create_engine(database_url)
    try:  # the migrated columns are the ORM's columns
        insp = inspect(engine)
        for name, table in Base.metadata.tables.items():
            assert {c["name"] for c in insp.get_columns(name)} == set(table.columns.keys()), name
    finally:
        engine.dispose()
    downgrade(database_url)
    assert _tables(database_url) == set()
    upgrade(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)


def _exercise(store, tmp_path):
    src = tmp_path / "src.bin"
    data = bytes(range(256)) * 5000
    src.write_bytes(data)
    sha, size = store.put("jobs/a/inputs/model.safetensors", src)
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert store.exists("jobs/a/inputs/model.safetensors") and not store.exists("jobs/a/nothing")
    assert b"".join(store.stream("jobs/a/inputs/model.safetensors")) == data
    store.fetch("jobs/a/inputs/model.safetensors", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    store.put("jobs/b/x", src)
    store.delete_prefix("jobs/a")
    assert not store.exists("jobs/a/inputs/model.safetensors") and store.exists("jobs/b/x")


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    _exercise(store, tmp_path)
    with pytest.raises(ValueError, match="leaves the store"):
        store.put("../outside", tmp_path / "src.bin")


def test_s3_store_against_a_local_s3_server(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=harness.free_port(), verbose=False)
    server.start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        store = open_store("s3://ladder-test/artifacts", endpoint)
        store.s3.create_bucket(Bucket="ladder-test")
        _exercise(store, tmp_path)
        head = store.s3.head_object(Bucket="ladder-test", Key="artifacts/jobs/b/x")
        assert head["Metadata"]["sha256"] == hashlib.sha256(bytes(range(256)) * 5000).hexdigest()
    finally:
        server.stop()


# --- the local store's free-space reserve, health checks, and what the sweeper lists ---------------------------

GiB = 1 << 30


def _files(root) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _src(tmp_path, size: int = 3 << 20):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    return src


def test_a_put_that_would_break_into_the_reserve_is_refused_as_storage_full(tmp_path):
    root, src = tmp_path / "store", _src(tmp_path)
    root.mkdir()
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    store = LocalStore(root, min_free_bytes=free + GiB)
    with pytest.raises(OSError) as refused:
        store.put("jobs/a/inputs/model.safetensors", src)
    assert refused.value.errno == errno.ENOSPC and classify(refused.value) == STORAGE_FULL
    assert "LADDER_STORE_MIN_FREE_BYTES" in str(refused.value) and "jobs/a/inputs/model.safetensors" in str(refused.value)
    assert list(root.rglob("*")) == []  # refused before a byte was written: no file, no .tmp, no folder
    assert "under the" in store.health() and "LADDER_STORE_MIN_FREE_BYTES" in store.health()

    # a reserve the write leaves intact, and none at all: stored
    for reserve in (max(0, free - 64 * src.stat().st_size), 0):
        ok = LocalStore(root, min_free_bytes=reserve)
        assert ok.health() is None
        assert ok.put(f"jobs/a/{reserve}", src) == file_digest(src)
    assert len(_files(root)) == 2 and not [f for f in _files(root) if f.endswith(".tmp")]
    opened = open_store(root.as_uri(), min_free_bytes=7)
    assert isinstance(opened, LocalStore) and opened.min_free_bytes == 7


def test_a_disk_that_fills_during_a_put_leaves_nothing_behind(tmp_path, monkeypatch):
    """The write itself fails with ENOSPC half-way (injected: the first chunk is written, the second is refused)."""
    import builtins

    import services.artifacts as artifacts

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    root, src = tmp_path / "store", _src(tmp_path)
    monkeypatch.setattr(artifacts, "open", full_open, raising=False)
    with pytest.raises(OSError) as full:
        LocalStore(root).put("jobs/a/stages/x/latents.safetensors", src)
    assert full.value.errno == errno.ENOSPC and classify(full.value) == STORAGE_FULL
    assert "is full" in str(full.value) and "jobs/a/stages/x/latents.safetensors" in str(full.value)
    assert _files(root) == []


def test_a_really_full_file_system_gives_enospc_and_no_tmp_file(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount: root in a container that allows it)."""
    import subprocess

    root, src = tmp_path / "tiny", _src(tmp_path)
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = LocalStore(root)
        with pytest.raises(OSError) as full:
            store.put("jobs/a/inputs/train_data.npz", src)
        assert full.value.errno == errno.ENOSPC and classify(full.value) == STORAGE_FULL
        assert _files(root) == []
        assert LocalStore(root, min_free_bytes=2 << 20).health().startswith("1.0 MiB free")
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_local_store_health(tmp_path):
    assert LocalStore(tmp_path / "fresh" / "store").health() is None  # made as the first put would make it
    (tmp_path / "file").write_text("x")
    reason = LocalStore(tmp_path / "file" / "store").health()
    assert reason is not None and str(tmp_path / "file" / "store") in reason


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_local_store_lists_job_folders_and_removes_stale_partial_writes(tmp_path):
    root, src = tmp_path / "store", _src(tmp_path, 1000)
    store = LocalStore(root)
    assert list(store.job_prefixes()) == []  # no jobs/ yet
    store.put("jobs/a/inputs/model.safetensors", src)
    store.put("jobs/a/stages/d/latents.safetensors", src)
    store.put("jobs/b/inputs/model.safetensors", src)
    (root / "jobs" / "empty").mkdir()
    (root / "jobs" / "stray-file").write_text("not a folder")
    for p in root.rglob("*"):
        _age(p, 7200)
    _age(root / "jobs/a/stages/d/latents.safetensors", 60)  # the newest file of a decides its time
    listed = dict(store.job_prefixes())
    assert set(listed) == {"a", "b", "empty"}
    assert time.time() - listed["a"] == pytest.approx(60, abs=5)
    assert time.time() - listed["b"] == pytest.approx(7200, abs=5)

    stale = root / "jobs/a/stages/d/generator.safetensors.4242.tmp"
    young = root / "jobs/b/inputs/train_data.npz.4243.tmp"
    other = root / "jobs/b/inputs/notes.tmp"  # no pid: not put's
    for p in (stale, young, other):
        p.write_bytes(b"partial")
    _age(stale, 7200)
    _age(other, 7200)
    removed = store.remove_partials(time.time() - 3600)
    assert [k for k, _ in removed] == ["jobs/a/stages/d/generator.safetensors.4242.tmp"]
    assert time.time() - removed[0][1] == pytest.approx(7200, abs=5)
    assert not stale.exists() and young.exists() and other.exists()
    assert store.remove_partials(time.time() - 3600) == []


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=harness.free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def test_s3_store_health(s3_endpoint, s3_keys):
    store = open_store("s3://ladder-health/artifacts", s3_endpoint)
    reason = store.health()
    assert reason is not None and "'ladder-health' does not exist" in reason
    store.s3.create_bucket(Bucket="ladder-health")
    assert store.health() is None
    cfg = store.s3.meta.config  # the working client fails in seconds, not botocore's minutes
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.retries["total_max_attempts"]) == (5, 30, 3)


def test_s3_store_health_answers_within_seconds_when_the_endpoint_is_down(s3_keys):
    import socket

    closed = f"http://127.0.0.1:{harness.free_port()}"  # nobody listens: connection refused
    started = time.monotonic()
    reason = open_store("s3://ladder-test/artifacts", closed).health()
    assert reason is not None and "cannot connect to" in reason and closed in reason
    assert time.monotonic() - started < 5

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        reason = open_store("s3://ladder-test/artifacts", endpoint).health()
        waited = time.monotonic() - started
    assert reason is not None and "did not answer within 2 s" in reason
    assert 1.5 < waited < 5  # one try of 2 s


def test_s3_store_lists_job_folders_and_aborts_stale_multipart_uploads(s3_endpoint, s3_keys, tmp_path):
    store = open_store("s3://ladder-list/artifacts", s3_endpoint)
    store.s3.create_bucket(Bucket="ladder-list")
    assert list(store.job_prefixes()) == []
    src = _src(tmp_path, 1000)
    for key in ("jobs/a/inputs/model.safetensors", "jobs/a/stages/d/latents.safetensors", "jobs/b/inputs/model.safetensors"):
        store.put(key, src)
    store.s3.put_object(Bucket="ladder-list", Key="artifacts/jobs/loose", Body=b"x")  # right under jobs/: no folder
    store.s3.put_object(Bucket="ladder-list", Key="other/jobs/c/x", Body=b"x")  # outside the prefix
    listed = dict(store.job_prefixes())
    assert set(listed) == {"a", "b"} and all(abs(time.time() - t) < 60 for t in listed.values())

    up = store.s3.create_multipart_upload(Bucket="ladder-list", Key="artifacts/jobs/a/inputs/train_data.npz")
    store.s3.create_multipart_upload(Bucket="ladder-list", Key="other/big")  # another prefix's: not ours
    # moto reports one fixed Initiated time (2010) for every upload: judge by the time the server reports
    initiated = next(u["Initiated"].timestamp() for u in store.s3.list_multipart_uploads(Bucket="ladder-list")["Uploads"]
                     if u["UploadId"] == up["UploadId"])
    assert store.remove_partials(initiated - 1) == []  # begun after the cut-off: left alone
    removed = store.remove_partials(initiated + 1)
    assert [k for k, _ in removed] == [f"jobs/a/inputs/train_data.npz (multipart upload {up['UploadId'][:12]})"]
    left = store.s3.list_multipart_uploads(Bucket="ladder-list").get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/big"]
