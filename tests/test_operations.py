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


# --- CPU and GPU workers: docker-compose.yml alone, and with docker-compose.gpu.yml --------------------

@pytest.fixture(scope="module")
def gpu_overlay():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-)?([^}]*)\}")


def _interpolate(value, env: dict[str, str]):
    """Compose's ${NAME}, ${NAME-default} and ${NAME:-default} in every string, as `docker compose config` does."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        def one(m: re.Match) -> str:
            name, op, default = m.groups()
            if op == ":-":
                return env.get(name) or default
            return env.get(name, default if op == "-" else "")
        return _VARIABLE.sub(one, value)
    return value


def _merge(base, over):
    """`docker compose -f base -f over` for what these files hold: mappings merged key by key (environment,
    deploy, ...), scalars and sequences (command, device lists) replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def _project(*files: dict, env: dict[str, str] | None = None) -> dict[str, dict]:
    """The services of these compose files merged in order, variables interpolated from `env` (the .env file)."""
    merged: dict = {}
    for f in files:
        merged = _merge(merged, f)
    return _interpolate(merged, env or {})["services"]


def _workers(services: dict[str, dict]) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if svc.get("command", [])[:2] == ["ladder", "worker"]}


def _gpus(svc: dict) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _node_name(svc: dict) -> str:
    command = svc["command"]
    assert "--name" in command, command  # the default, ladder@%h, is the same for every worker of a host
    return command[command.index("--name") + 1]


def _queue(svc: dict) -> str:
    return svc.get("environment", {}).get("LADDER_QUEUE", "ladder")  # the setting's default


def _replicas(svc: dict) -> int:
    return int(svc.get("deploy", {}).get("replicas", 1))


def _mentions_a_gpu(node) -> list[str]:
    """Paths in a service's config that would ask Docker for a GPU (and fail on a host without the toolkit)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("devices", "gpus", "device_ids", "runtime") or (k == "driver" and v == "nvidia"):
                found.append(k)
            found += [f"{k}.{p}" for p in _mentions_a_gpu(v)]
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += [f"[{i}].{p}" for p in _mentions_a_gpu(v)]
    elif isinstance(node, str) and re.search(r"nvidia|\bcuda\b", node, re.I):
        found.append(node)
    return found


def test_the_base_file_needs_no_gpu_and_its_worker_computes_on_the_cpu_with_bounded_threads(compose):
    services = _project(compose)
    for name, svc in services.items():
        assert not _mentions_a_gpu(svc), (name, _mentions_a_gpu(svc))
    (name, worker), = _workers(services).items()
    assert name == "worker"
    env = worker["environment"]
    assert env["LADDER_DEVICE"] == "cpu"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(worker["cpus"]) == "2", (env, worker["cpus"])
    raw = compose["services"]["worker"]  # before interpolation: one variable sets threads and limit
    assert raw["cpus"] == raw["environment"]["OMP_NUM_THREADS"] == raw["environment"]["MKL_NUM_THREADS"], raw
    assert re.fullmatch(r"\$\{LADDER_WORKER_CPUS:-\d+\}", raw["cpus"]), raw["cpus"]
    six = _project(compose, env={"LADDER_WORKER_CPUS": "6"})["worker"]
    assert (six["cpus"], six["environment"]["OMP_NUM_THREADS"], six["environment"]["MKL_NUM_THREADS"]) == ("6",) * 3
    # a node name per replica: %h is the container's hostname, which differs per replica unless set here
    node = _node_name(worker)
    assert node.endswith("@%h") and node != "ladder@%h", node
    assert "hostname" not in worker and "container_name" not in worker, worker
    # the shared settings stay: its own environment is merged into x-ladder-env, not a replacement
    assert compose["x-ladder-env"].items() <= raw["environment"].items()
    assert "LADDER_QUEUE" not in raw["environment"] and "LADDER_QUEUE" not in services["api"]["environment"]


def test_no_worker_has_an_http_healthcheck_and_the_image_none_at_all(compose, gpu_overlay):
    runtime = _dockerfile_stages()[-1]
    checks = [i for i in runtime if i.upper().startswith("HEALTHCHECK")]
    assert checks in ([], ["HEALTHCHECK NONE"]), checks  # `docker run IMAGE ladder worker` must not inherit one
    for services in (_project(compose), _project(compose, gpu_overlay)):
        workers = _workers(services)
        assert workers
        for name, svc in workers.items():
            assert svc.get("healthcheck") == {"disable": True}, (name, svc.get("healthcheck"))
        assert services["migrate"]["healthcheck"] == {"disable": True}
        api = services["api"]["healthcheck"]  # moved out of the image: the API's check is the compose file's
        assert api["test"][0] == "CMD" and "/healthz" in " ".join(api["test"]), api
        assert "LADDER_PORT" in " ".join(api["test"])  # the port the API listens on, as the image's check did


def test_the_gpu_overlay_gives_each_gpu_worker_one_gpu_of_its_own(compose, gpu_overlay):
    services = _project(compose, gpu_overlay)
    gpu_workers = {name: svc for name, svc in _workers(services).items() if _gpus(svc)}
    assert set(gpu_workers) >= {"worker-gpu0", "worker-gpu1"}, set(gpu_workers)
    ids, names = [], []
    for name, svc in gpu_workers.items():
        (device,) = _gpus(svc)  # exactly one reservation, of exactly one GPU named by its index
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
        assert "count" not in device, device  # `count` hands GPU 0 to every replica
        (gpu,) = device["device_ids"]
        assert isinstance(gpu, str) and gpu.isdigit(), device
        assert name == f"worker-gpu{gpu}", (name, gpu)
        ids.append(gpu)
        node = _node_name(svc)
        assert node == f"ladder-gpu{gpu}@%h", (name, node)
        names.append(node)
        env = svc["environment"]
        assert env["LADDER_DEVICE"] == "cuda", name  # inside the container its one GPU is CUDA device 0
        assert _queue(svc) == _queue(services["api"]), name
        assert _replicas(svc) == 1, name  # a replica more would reserve the same GPU
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(svc["cpus"]), name
    assert len(set(ids)) == len(ids) and len(set(names)) == len(names), (ids, names)
    # the API never touches CUDA: no GPU, no device setting; only its queue changes
    assert not _mentions_a_gpu(services["api"]) and "LADDER_DEVICE" not in services["api"]["environment"]
    assert _queue(services["api"]) != "ladder"  # not the base's queue, so no worker of the base takes GPU jobs
    assert set(gpu_overlay["services"]["api"]) == {"environment"}
    assert set(gpu_overlay["services"]["api"]["environment"]) == {"LADDER_QUEUE"}


def test_with_the_overlay_no_cpu_worker_takes_gpu_jobs_unless_allowed(compose, gpu_overlay):
    def cpu_workers_on_the_api_queue(services):
        api = _queue(services["api"])
        return {name: _replicas(svc) for name, svc in _workers(services).items()
                if not _gpus(svc) and _queue(svc) == api and _replicas(svc) > 0}

    default = _project(compose, gpu_overlay)
    assert cpu_workers_on_the_api_queue(default) == {}
    assert default["worker"]["environment"]["LADDER_DEVICE"] == "cpu"  # the base's CPU worker, scaled to none
    assert _replicas(default["worker"]) == 0
    # allowed in .env: the CPU workers then read the GPU queue, and compute on the CPU
    allowed = _project(compose, gpu_overlay, env={"LADDER_CPU_WORKERS": "2"})
    assert cpu_workers_on_the_api_queue(allowed) == {"worker": 2}
    # without the overlay, the one CPU worker serves the API's queue
    assert cpu_workers_on_the_api_queue(_project(compose)) == {"worker": 1}


def test_the_gpu_workers_repeat_the_base_files_shared_settings(compose, gpu_overlay):
    """YAML anchors do not reach across files: the overlay repeats x-ladder, x-sandbox and x-worker."""
    base = compose["services"]["worker"]
    for name, svc in gpu_overlay["services"].items():
        if not name.startswith("worker-gpu"):
            continue
        for key in ("image", "build", "env_file", "secrets", "security_opt", "cap_drop", "init", "restart",
                    "stop_grace_period", "depends_on"):
            assert svc.get(key) == base.get(key), (name, key, svc.get(key), base.get(key))
        assert compose["x-ladder-env"].items() <= svc["environment"].items(), name
        for key, value in svc["environment"].items():
            assert not re.search(r"(PASSWORD|SECRET|ACCESS_KEY|_KEY_ID)$", key), (name, key)  # secrets as files
            if key.endswith("_FILE"):
                assert value.removeprefix("/run/secrets/") in svc["secrets"] and value.removeprefix("/run/secrets/") in compose["secrets"]
        assert re.fullmatch(r"\$\{LADDER_GPU_WORKER_CPUS:-\d+\}", svc["cpus"]), svc["cpus"]
    text = (ROOT / "docker-compose.gpu.yml").read_text()
    assert not re.search(r"://[^\s/@:]*:[^\s/@…]+@", text) and "ports" not in gpu_overlay["services"]["api"]
    import fnmatch  # the overlay stays out of the image too
    assert any(fnmatch.fnmatch("docker-compose.gpu.yml", p) for p in (ROOT / ".dockerignore").read_text().split())


def test_deployment_md_has_the_gpu_workers_recipe_matching_the_overlay(compose, gpu_overlay):
    doc = (ROOT / "docs/deployment.md").read_text()
    section = doc[doc.index("\n## GPU workers\n"):]
    section = section[:section.index("\n## ", 1)]
    for needed in ("R580", "Turing", "NVIDIA Container Toolkit", "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up",
                   "LADDER_DEVICE", "never touches", "ladder worker --gpus 0,1", "--no-healthcheck"):
        assert needed in section, needed
    assert "--scale worker=N` puts N workers" not in doc and "CPU only, for now" not in doc
    # the remote worker's docker run line: the overlay's GPU worker settings, one GPU, a unique node name
    (run,) = re.findall(r"```bash\n(N=\d+.*?docker run .*?)```", section, re.S)
    run = run.replace("\\\n", " ")
    given = dict(re.findall(r"-e ([A-Z0-9_]+)=(\S+)", run))
    gpu0 = gpu_overlay["services"]["worker-gpu0"]
    for key, value in _interpolate(compose["x-ladder-env"], {}).items():
        assert key in given, key
        if key.endswith("_FILE") or key == "LADDER_ENVIRONMENT":
            assert given[key] == value, key
    api_env = _project(compose, gpu_overlay)["api"]["environment"]
    assert given["LADDER_DEVICE"] == "cuda" and given["LADDER_QUEUE"] == api_env["LADDER_QUEUE"]
    for secret in gpu0["secrets"]:
        assert f":/run/secrets/{secret}:ro" in run, secret
    assert "--gpus device=$N" in run and '--name "ladder-gpu$N@$(hostname)"' in run and "--no-healthcheck" in run
    for opt in gpu0["security_opt"]:
        assert f"--security-opt {_interpolate(opt, {})}" in run, opt
    assert "--cap-drop ALL" in run and "--init" in run


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
