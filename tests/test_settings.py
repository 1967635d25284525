"""The settings' production refusals, secrets read from files, and the compose file's exposure and secrets."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.artifacts import open_store
from services.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STRONG = "9c1f4e0b7a2d46e8b3f5"
GOOD = {
    "environment": "production",
    "database_url": f"postgresql+psycopg://ladder:{STRONG}@postgres:5432/ladder",
    "broker_url": f"redis://:{STRONG}@redis:6379/0",
    "artifacts_url": "s3://ladder/artifacts",
    "s3_endpoint_url": "http://minio:9000",
    "s3_access_key_id": "ladder-app",
    "s3_secret_access_key": STRONG,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No LADDER_* or AWS_* variable and no .env from the outside."""
    for name in list(os.environ):
        if name.startswith(("LADDER_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def refusal(**settings) -> str:
    """The one message with which these settings are refused."""
    with pytest.raises(ValidationError) as e:
        Settings(**settings)
    assert e.value.error_count() == 1
    return e.value.errors()[0]["msg"]


def test_environment_is_a_closed_choice(monkeypatch):
    for typo in ("prod", "Production", "production "):
        msg = refusal(environment=typo)
        assert "'development'" in msg and "'production'" in msg
    monkeypatch.setenv("LADDER_ENVIRONMENT", "prodution")
    assert "'production'" in refusal()
    monkeypatch.setenv("LADDER_ENVIRONMENT", "production")
    assert "PostgreSQL" in refusal()  # the real word reaches the production checks


def test_a_good_production_config_passes():
    s = Settings(**GOOD)
    assert s.environment == "production" and not s.embedded
    assert Settings(**{**GOOD, "artifacts_url": "file:///srv/ladder", "shared_artifact_dir": True}).artifacts == "file:///srv/ladder"
    no_keys = {k: v for k, v in GOOD.items() if not k.startswith("s3_access") and not k.startswith("s3_secret")}
    assert Settings(**no_keys).s3_access_key_id is None  # boto3's own lookup, e.g. an instance role


WEAK_DB = [f"postgresql+psycopg://ladder:{p}@postgres/ladder"
           for p in ("ladder", "postgres", "password", "PASSWORD", "minioadmin", "", "short", "p%61ssword")]
REFUSED = [
    ({"database_url": None}, "LADDER_DATABASE_URL (or LADDER_DATABASE_URL_FILE) pointing at PostgreSQL"),
    ({"database_url": "sqlite:////srv/ladder.db"}, "not SQLite"),
    ({"broker_url": None}, "production needs LADDER_BROKER_URL"),
    *[({"database_url": url}, "LADDER_DATABASE_URL carries a default or weak password") for url in WEAK_DB],
    ({"broker_url": "redis://redis:6379/0"}, "LADDER_BROKER_URL has no password: set Redis' requirepass"),
    ({"broker_url": "redis://:@redis:6379/0"}, "LADDER_BROKER_URL carries a default or weak password"),
    ({"broker_url": "redis://:ladder@redis:6379/0"}, "LADDER_BROKER_URL carries a default or weak password"),
    ({"broker_url": "amqp://guest:guest@rabbit:5672//"}, "LADDER_BROKER_URL carries a default or weak password"),
    ({"s3_access_key_id": "minioadmin", "s3_secret_access_key": "minioadmin"}, "the S3 credentials are a default or a weak secret"),
    ({"s3_secret_access_key": "ladder-minio-secret"}, "bucket-scoped user"),
    ({"s3_secret_access_key": ""}, "bucket-scoped user"),
    ({"artifacts_url": "file:///srv/ladder"}, "set LADDER_SHARED_ARTIFACT_DIR=true if every API and worker mounts"),
    ({"artifacts_url": None}, "use s3://bucket/prefix"),  # the default: a directory under data_dir
]


@pytest.mark.parametrize(("change", "message"), REFUSED)
def test_production_refuses(change, message):
    msg = refusal(**{**GOOD, **change})
    assert message in msg
    assert "\n" not in msg


@pytest.mark.parametrize("change", [{"database_url": WEAK_DB[0]}, {"broker_url": "redis://redis:6379/0"},
                                    {"artifacts_url": None}, {"s3_secret_access_key": "minioadmin"}])
def test_development_allows_what_production_refuses(change):
    Settings(**{**GOOD, **change, "environment": "development"})


def test_production_checks_boto3s_own_s3_credentials(monkeypatch):
    no_keys = {k: v for k, v in GOOD.items() if k not in ("s3_access_key_id", "s3_secret_access_key")}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minioadmin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minioadmin")
    assert "S3 credentials" in refusal(**no_keys)


def test_s3_keys_come_in_pairs():
    assert "together" in refusal(s3_access_key_id="ladder-app")
    assert "together" in refusal(s3_secret_access_key=STRONG)


def test_a_refusal_does_not_print_the_secrets_it_was_given():
    with pytest.raises(ValidationError) as e:
        Settings(**{**GOOD, "broker_url": None})
    assert STRONG not in str(e.value)


def test_secrets_are_read_from_files(tmp_path, monkeypatch):
    files = {}
    for name in ("database_url", "broker_url", "s3_access_key_id", "s3_secret_access_key"):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(f"  {GOOD[name]}\n")  # surrounding whitespace (an editor's newline) is dropped
        monkeypatch.setenv(f"LADDER_{name.upper()}_FILE", str(files[name]))
    monkeypatch.setenv("LADDER_ENVIRONMENT", "production")
    monkeypatch.setenv("LADDER_ARTIFACTS_URL", GOOD["artifacts_url"])
    s = Settings()
    for name in files:
        assert getattr(s, name) == GOOD[name]
    assert Settings(broker_url_file=files["broker_url"]).broker_url == GOOD["broker_url"]  # and as keyword arguments
    # a weak password in a file is refused like one in a variable
    files["broker_url"].write_text("redis://:ladder@redis:6379/0\n")
    assert "LADDER_BROKER_URL carries a default or weak password" in refusal()


@pytest.mark.parametrize(("content", "message"), [
    (None, "LADDER_DATABASE_URL_FILE={path}: cannot read it (No such file or directory)"),
    ("dir", "LADDER_DATABASE_URL_FILE={path}: cannot read it (Is a directory)"),
    ("\n", "LADDER_DATABASE_URL_FILE={path} is empty"),
    (b"\xff\xfe", "LADDER_DATABASE_URL_FILE={path}: not UTF-8 text"),
])
def test_a_secret_file_that_cannot_be_used_is_a_clear_error(tmp_path, monkeypatch, content, message):
    path = tmp_path / "database_url.txt"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv("LADDER_DATABASE_URL_FILE", str(path))
    assert message.format(path=path) in refusal()


def test_a_secret_and_its_file_together_are_refused(tmp_path, monkeypatch):
    (tmp_path / "url").write_text(GOOD["database_url"])
    monkeypatch.setenv("LADDER_DATABASE_URL_FILE", str(tmp_path / "url"))
    monkeypatch.setenv("LADDER_DATABASE_URL", GOOD["database_url"])
    assert "set LADDER_DATABASE_URL or LADDER_DATABASE_URL_FILE, not both" in refusal()


def test_the_s3_credentials_reach_the_store(tmp_path):
    from services.context import open_artifacts

    store = open_artifacts(Settings(**{**GOOD, "environment": "development", "database_url": None, "broker_url": None,
                                       "data_dir": tmp_path}))
    credentials = store.s3._request_signer._credentials
    assert (credentials.access_key, credentials.secret_key) == ("ladder-app", STRONG)
    assert open_store("s3://b/p", None, "us-east-1", "k", "s" * 8).s3._request_signer._credentials.access_key == "k"


# --- docker-compose.yml ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_only_on_loopback(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"api": ["127.0.0.1:8000:8000"]}


def test_compose_runs_the_service_in_production_with_secrets_from_files(compose):
    services, secrets = compose["services"], compose["secrets"]
    for name in ("api", "worker", "migrate"):
        env, mounted = services[name]["environment"], set(services[name]["secrets"])
        assert env["LADDER_ENVIRONMENT"] == "production"
        for var in ("LADDER_DATABASE_URL", "LADDER_BROKER_URL", "LADDER_S3_ACCESS_KEY_ID", "LADDER_S3_SECRET_ACCESS_KEY"):
            assert var not in env
            secret = env[f"{var}_FILE"].removeprefix("/run/secrets/")
            assert secret in mounted and secret in secrets
        assert not any(k.startswith("AWS_") for k in env)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_USER" not in services["postgres"]["environment"]  # the superuser is "postgres", not the app's role
    assert {"MINIO_ROOT_USER_FILE", "MINIO_ROOT_PASSWORD_FILE"} <= set(services["minio"]["environment"])
    assert "requirepass" in " ".join(services["redis"]["command"])
    assert all(s["file"].startswith("./secrets/") for s in secrets.values())
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_compose_holds_no_password(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"://[^\s/@:]*:[^\s/@…]+@", text)  # no URL with credentials (the comments write "…")
    for bad in ("minioadmin", "ladder-minio-secret", "--requirepass", "${POSTGRES_PASSWORD", "${MINIO_ROOT"):
        assert bad not in text
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if re.search(r"(PASSWORD|SECRET|ACCESS_KEY|_KEY_ID|ROOT_USER)$", key):
                pytest.fail(f"{name}: {key} is set in the compose file; use {key}_FILE and a secret")
            if key.endswith("_FILE"):  # a mounted secret: /run/secrets/NAME, or NAME for MinIO
                assert str(value).removeprefix("/run/secrets/") in svc["secrets"], f"{name}: {key}"


def test_compose_gives_the_sandbox_what_it_needs_and_no_gpu_in_the_base_file(compose):
    services = compose["services"]
    for name in ("api", "worker"):
        assert "seccomp=unconfined" in services[name]["security_opt"]
    assert "reservations" not in services["worker"].get("deploy", {}).get("resources", {})  # GPUs: docker-compose.gpu.yml
    init = services["postgres"]["volumes"][1].split(":")
    assert init[1] == "/docker-entrypoint-initdb.d"
    script = ROOT / init[0] / "10-ladder-role.sh"
    assert script.stat().st_mode & stat.S_IXUSR and "NOSUPERUSER" in script.read_text()
    assert (ROOT / services["minio-init"]["volumes"][0].split(":")[0]).is_file()


def test_make_secrets_writes_every_secret_and_a_config_production_accepts(tmp_path, compose, monkeypatch):
    if not shutil.which("bash") or not shutil.which("od"):
        pytest.skip("needs bash and od")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "make-secrets", tmp_path / "scripts")
    subprocess.run(["bash", "scripts/make-secrets"], cwd=tmp_path, check=True, capture_output=True)
    for secret in compose["secrets"].values():
        assert (tmp_path / secret["file"]).read_text().strip()
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    env = compose["services"]["api"]["environment"]
    for key, value in env.items():  # the api's environment, its /run/secrets/NAME read from ./secrets/NAME.txt
        if key.endswith("_FILE"):
            name = value.removeprefix("/run/secrets/")
            value = str(tmp_path / compose["secrets"][name]["file"])
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.environment == "production" and s.broker_url.startswith("redis://:")
    db_password = (tmp_path / "secrets/db_password.txt").read_text()
    assert s.database_url == f"postgresql+psycopg://ladder:{db_password}@postgres:5432/ladder"
