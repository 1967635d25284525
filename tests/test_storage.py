"""The schema comes only from the migrations (PostgreSQL and SQLite, up and down), and both
artifact stores keep what they are given, with its SHA-256."""

import hashlib

import pytest
from sqlalchemy import create_engine, inspect

from services.artifacts import LocalStore, open_store
from services.db import Base
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
