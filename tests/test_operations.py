"""Operations: the deployment files (compose, image, requirements and their lock, scripts/venv's reuse),
the schema check at start-up (`ladder serve` and `ladder worker` refuse a database not at Alembic's
head) and `ladder keys list / revoke`, against real PostgreSQL and a real `ladder serve`.

There is no Docker engine in the test environment: the compose file and the Dockerfile are checked
by reading them, deploy/minio-init.sh by running it with a stand-in `mc`."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from services.migrate import head, require_head, upgrade

from . import harness

ROOT = harness.ROOT
slow = pytest.mark.slow  # the tests that start PostgreSQL databases and ladder processes
DEV_TOOLS = ("pytest", "moto", "schemathesis", "playwright", "psutil", "hypothesis")


@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml")  # comes with uvicorn[standard]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- docker-compose.yml and deploy/ ----------------------------------------------------------------

def test_postgres_is_healthy_only_over_tcp_so_migrate_waits_for_the_real_server(compose):
    services = compose["services"]
    check = services["postgres"]["healthcheck"]["test"]
    assert check[0] == "CMD" and check[1] == "pg_isready", check
    # the image's init server listens on its unix socket only: a check without -h passes during init
    assert "-h" in check and check[check.index("-h") + 1] not in ("", "/var/run/postgresql"), check
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_ladder_service_reads_an_optional_env_file(compose):
    for name in ("api", "worker", "migrate"):
        assert compose["services"][name].get("env_file") == [{"path": "./ladder.env", "required": False}], name
    assert "ladder.env" in (ROOT / ".dockerignore").read_text().split()  # never baked into the image
    assert "ladder.env" in (ROOT / "docs/deployment.md").read_text()


def test_the_bucket_is_named_once_in_the_artifacts_url(compose):
    services = compose["services"]
    url = services["api"]["environment"]["LADDER_ARTIFACTS_URL"]
    assert url.startswith("${LADDER_ARTIFACTS_URL:-s3://"), url  # one value, changeable in .env
    for name in ("worker", "migrate", "minio-init"):
        assert services[name]["environment"]["LADDER_ARTIFACTS_URL"] == url, name
    script = (ROOT / "deploy/minio-init.sh").read_text()
    assert "LADDER_BUCKET" not in script and "LADDER_BUCKET" not in (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"""bucket=["']?\$\{[A-Z_]+:-""", script)  # no default name of its own


def _minio_init(tmp_path: Path, url: str | None) -> tuple[subprocess.CompletedProcess, str, str]:
    """deploy/minio-init.sh run with a stand-in `mc` that records its arguments and the policy it is given."""
    if not shutil.which("sh"):
        pytest.skip("needs sh")
    bin_dir, secrets = tmp_path / "bin", tmp_path / "secrets"
    bin_dir.mkdir(exist_ok=True)
    secrets.mkdir(exist_ok=True)
    for name in ("minio_root_user", "minio_root_password", "s3_access_key_id", "s3_secret_access_key"):
        (secrets / name).write_text(f"{name}-value\n")
    log, policy = tmp_path / "mc.log", tmp_path / "policy.json"
    mc = bin_dir / "mc"
    mc.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in "admin policy create "*) cp "$6" {policy} ;; esac\n')
    mc.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MINIO_INIT_SECRETS": str(secrets)}
    if url is not None:
        env["LADDER_ARTIFACTS_URL"] = url
    done = subprocess.run(["sh", str(ROOT / "deploy/minio-init.sh")], env=env, capture_output=True, text=True, timeout=30)
    return done, log.read_text() if log.exists() else "", policy.read_text() if policy.exists() else ""


def test_minio_init_creates_the_bucket_of_the_artifacts_url(tmp_path):
    done, calls, policy = _minio_init(tmp_path, "s3://acme-models/ladder/artifacts")
    assert done.returncode == 0, done.stderr
    assert "mb --ignore-existing local/acme-models\n" in calls
    assert "admin policy attach local acme-models-rw --user s3_access_key_id-value" in calls
    assert '"arn:aws:s3:::acme-models"' in policy and '"arn:aws:s3:::acme-models/*"' in policy
    assert "ladder" not in policy  # nothing of the default name left over


@pytest.mark.parametrize("url, says", [
    (None, "set LADDER_ARTIFACTS_URL"),
    ("file:///srv/ladder", "not s3://BUCKET/PREFIX"),
    ("s3://Acme/x", "not a valid S3 bucket name"),
    ('s3://a"b/x', "not a valid S3 bucket name"),  # would break out of the policy's JSON
    ("s3://ab/x", "not a valid S3 bucket name"),
])
def test_minio_init_refuses_an_unusable_artifacts_url(tmp_path, url, says):
    done, calls, _ = _minio_init(tmp_path, url)
    assert done.returncode != 0 and says in done.stderr, (done.returncode, done.stderr)
    assert calls == ""  # refused before touching MinIO


def test_the_api_spools_uploads_to_a_sized_scratch_of_its_own(compose):
    api = compose["services"]["api"]
    scratch = api["environment"]["TMPDIR"]
    assert scratch not in ("/tmp", "/var/tmp"), scratch
    mounts = [v for v in api.get("volumes", []) if isinstance(v, dict) and v.get("target") == scratch]
    assert len(mounts) == 1, api.get("volumes")
    (mount,) = mounts
    if mount["type"] == "tmpfs":
        assert re.fullmatch(r"\$\{LADDER_SCRATCH_SIZE:-\d+[kmg]?\}|\d+[kmg]?", str(mount["tmpfs"]["size"])), mount
    else:  # a named volume must be sized by its driver
        opts = compose["volumes"][mount["source"]]["driver_opts"]
        assert "size=" in opts.get("o", ""), opts
    # the api keeps the shared settings: its own environment is merged, not a replacement
    assert api["environment"]["LADDER_ENVIRONMENT"] == "production"
    assert api["environment"]["LADDER_DATABASE_URL_FILE"] == compose["services"]["worker"]["environment"]["LADDER_DATABASE_URL_FILE"]


# --- the image and the requirements -----------------------------------------------------------------

def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def _pins(path: Path) -> dict[str, str]:
    """name → version of every `name==version` line (names normalised as pip does)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", re.sub(r"\[.*\]", "", name)).lower()] = version.strip()
    return pins


def test_the_image_installs_the_runtime_lock_only():
    runtime = _dockerfile_stages()[-1]
    installs = [i for i in runtime if i.upper().startswith(("RUN ", "COPY ", "ADD ")) and "requirements" in i]
    assert installs, runtime
    joined = " ".join(installs)
    assert "requirements.lock" in joined and "--no-deps -r /tmp/requirements.lock" in joined
    assert "pip check" in joined
    assert "requirements-dev" not in joined and "requirements.txt" not in joined, installs
    assert not any(re.search(rf"pip install\b.*\b{tool}\b", i) for i in runtime for tool in DEV_TOOLS)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "requirements.lock" not in ignored and "*.lock" not in ignored


def test_requirements_split_into_runtime_and_dev_with_a_complete_lock():
    runtime, dev, lock = (_pins(ROOT / f) for f in ("requirements.txt", "requirements-dev.txt", "requirements.lock"))
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    for tool in DEV_TOOLS[:5]:
        assert tool in dev and tool not in runtime, tool
    for tool in DEV_TOOLS:
        assert tool not in lock, f"{tool} would ship in the image"
    assert runtime["torch"] == lock["torch"] == "2.14.1" and runtime["torchvision"] == lock["torchvision"] == "0.29.1"
    for name, version in runtime.items():  # the lock is resolved from requirements.txt: every pin as written
        assert lock.get(name) == version, (name, version, lock.get(name))
    assert len(lock) > 3 * len(runtime)  # transitive packages too (about 100: torch's nvidia-* wheels, ...)
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;]+", line), line


def test_the_lock_satisfies_the_packages_own_dependencies():
    """pip check in the image would fail otherwise (pyproject.toml's ranges against the lock's versions)."""
    import tomllib

    from packaging.requirements import Requirement

    lock = _pins(ROOT / "requirements.lock")
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock and req.specifier.contains(lock[name], prereleases=True), (spec, lock.get(name))


def test_scripts_venv_reuses_a_venv_until_any_requirements_file_changes(tmp_path):
    """scripts/venv on an existing .venv: nothing while the stamp matches, the dev requirements under the
    lock when any requirements file (or pyproject.toml) changes, never a new venv."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    for f in ("requirements.txt", "requirements-dev.txt", "requirements.lock", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    bin_dir, log = tmp_path / ".venv/bin", tmp_path / "pip.log"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # an existing venv's python
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    for exe in ("python", "pip"):
        (bin_dir / exe).chmod(0o755)

    def run() -> list[str]:
        log.unlink(missing_ok=True)
        done = subprocess.run(["bash", "scripts/venv"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": sys.executable})
        assert done.returncode == 0, done.stderr
        return log.read_text().splitlines() if log.exists() else []

    first = run()
    assert "install -q -r requirements-dev.txt -c requirements.lock" in first, first
    assert not any("-r requirements.txt" in c for c in first)  # dev includes it; the lock constrains both
    assert (bin_dir / "pip").read_text().startswith("#!/bin/sh\necho")  # the venv was kept, not remade
    assert run() == []  # reused
    for changed in ("requirements-dev.txt", "requirements.lock", "requirements.txt", "pyproject.toml"):
        with open(tmp_path / changed, "a") as f:
            f.write("\n# changed\n")
        assert "install -q -r requirements-dev.txt -c requirements.lock" in run(), changed
        assert run() == [], changed


# --- the schema check at start-up (real PostgreSQL) ----------------------------------------------

@pytest.fixture
def database():
    harness.require_services()
    url, name = harness.create_database()
    try:
        yield url
    finally:
        harness.drop_database(name)


def _service_env(url: str, tmp_path: Path, **more: str) -> dict[str, str]:
    return {"LADDER_DATABASE_URL": url, "LADDER_BROKER_URL": harness.REDIS_URL,
            "LADDER_ARTIFACTS_URL": (tmp_path / "artifacts").as_uri(), "LADDER_DATA_DIR": str(tmp_path / "data"),
            "LADDER_ENVIRONMENT": "development", "OMP_NUM_THREADS": "1", **more}


def _ladder(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `ladder` command in a subprocess; it must end on its own (a server that starts fails the test)."""
    try:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr[-2000:].decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")[-2000:]
        pytest.fail(f"ladder {' '.join(args)} did not stop within {timeout} s: it started against that database\n{tail}")


@slow
def test_serve_and_worker_refuse_a_database_behind_head(database, tmp_path):
    upgrade(database, "0001")
    need = head()
    assert need != "0001"  # a schema change since, so the tables exist but are not this code's
    env = _service_env(database, tmp_path)
    says = f"is at revision 0001, this code needs {need}; run: ladder migrate"
    for command in (["serve", "--port", str(harness.free_port())], ["worker"]):
        done = _ladder(env, *command)
        assert done.returncode == 2 and says in done.stderr, (command, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "database postgresql+psycopg://" in done.stderr
    upgrade(database)
    require_head(database)  # migrated: accepted


@slow
def test_the_schema_check_names_a_database_never_migrated_or_migrated_by_newer_code(database):
    from services.errors import InputError

    with pytest.raises(InputError, match=r"has no ladder schema .*; run: ladder migrate"):
        require_head(database)
    upgrade(database)
    engine = sa.create_engine(database)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    with pytest.raises(InputError, match=rf"at revision 0099, which this code does not know \(it needs {head()}\)"):
        require_head(database)


# --- ladder keys (real PostgreSQL, a real ladder serve) ---------------------------------------------

def _rows(listing: str) -> list[list[str]]:
    lines = listing.strip().splitlines()
    assert lines[0].split() == ["prefix", "tenant", "created", "revoked"], listing
    return [line.split() for line in lines[1:]]


@slow
def test_keys_list_and_revoke_through_the_cli_and_a_revoked_key_is_refused(database, tmp_path, monkeypatch, capsys):
    upgrade(database)
    env = _service_env(database, tmp_path, LADDER_API_KEY_CACHE_S="0.5")
    acme = harness.create_key(env, "acme")
    harness.create_key(env, "globex")
    server = harness.Server(env, tmp_path / "serve.log")
    try:
        auth = {"Authorization": f"Bearer {acme}"}
        assert httpx.get(f"{server.url}/v1/jobs", headers=auth, timeout=10).status_code == 200

        listed = _ladder(env, "keys", "list")
        assert listed.returncode == 0, listed.stderr
        rows = _rows(listed.stdout)
        assert [(r[1], r[3]) for r in rows] == [("acme", "-"), ("globex", "-")] and rows[0][0] == acme[:12], rows  # oldest first
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r[2]) for r in rows)
        assert not any(acme[12:] in line for line in listed.stdout.splitlines())  # never the key itself

        revoked = _ladder(env, "keys", "revoke", acme[:12])
        assert revoked.returncode == 0 and f"revoked {acme[:12]} (tenant acme)" in revoked.stdout, revoked.stderr
        deadline = time.monotonic() + 10  # LADDER_API_KEY_CACHE_S=0.5: the API's cache forgets it at once
        while (r := httpx.get(f"{server.url}/v1/jobs", headers=auth, timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)
        assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]

        acme_only = _ladder(env, "keys", "list", "--tenant", "acme")
        (row,) = _rows(acme_only.stdout)
        assert row[0] == acme[:12] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[3]), acme_only.stdout
    finally:
        server.stop()

    # the refusals, in this process (the same main() the console script runs; a fresh interpreter each costs seconds)
    from services.cli import main
    from services.settings import get_settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        for argv, code, says in [
            (["keys", "revoke", acme[:12]], 0, f"{acme[:12]} (tenant acme) was already revoked at"),
            (["keys", "revoke", "ldr_zzzzzzzz"], 2, "no API key has the prefix ldr_zzzzzzzz; `ladder keys list` shows them"),
            (["keys", "revoke", "ldr_"], 2, "'ldr_' is not a key prefix: give the 12 characters"),
            (["keys", "revoke", acme + "x"], 2, f"no API key is {acme[:12]}… (a whole key was given)"),
            (["keys", "list", "--tenant", "initech"], 2, "no tenant is named 'initech'"),
        ]:
            assert main(argv) == code, argv
            out, err = capsys.readouterr()
            assert says in (out if code == 0 else err), (argv, out, err)
            assert acme not in out + err  # a whole key is never echoed
    finally:
        get_settings.cache_clear()
