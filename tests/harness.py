"""Real processes for the service tests: a fresh PostgreSQL database migrated by Alembic, a Redis
queue of its own, `ladder serve` and `ladder worker` as subprocesses, talked to over HTTP."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import redis

# a LadderConfig small enough for a whole job in well under a minute on 2 cores (tests' quick_config, bench/gpu.py --quick)
QUICK_CONFIG = {
    "boundary": {"samples_per_class": 60, "holdout_per_class": 20, "attention_steps": 5},
    "generator": {"max_epochs": 3, "time_budget_s": 20},
    "perturb": {"samples_per_class": 40, "calibration_samples": 400},
    "finetune": {"epochs": 1},
    "evaluate": {"max_samples": 200, "attack": {"pgd_steps": 5}, "surrogate_epochs": 1,
                 "cw": {"max_samples": 20, "binary_search_steps": 2, "max_iter": 10},
                 "jsma": {"max_samples": 10}, "autoattack": {"max_samples": 20}},
    # off, so that jobs on a few images per class stay valid; the tests of checkpoint selection turn it on
    "select": {"max_clean_drop": None},
}
PG_ADMIN = os.environ.get("LADDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LADDER_TEST_REDIS", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parent.parent


def require_services() -> None:
    """Fail (not skip) when PostgreSQL or Redis is down: scripts/test starts them."""
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except (psycopg.Error, redis.RedisError) as e:
        raise RuntimeError(f"PostgreSQL and Redis must run for these tests (scripts/test starts them): {e}") from e


def create_database() -> tuple[str, str]:
    """A new, empty PostgreSQL database; (its SQLAlchemy URL, its name)."""
    name = f"ladder_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}", name


def drop_database(name: str) -> None:
    """Drop a test database, closing its connections."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.out = open(log, "ab")
        self.p = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                                  stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a Celery worker and its pool children alike)."""
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass
        self.p.wait(timeout=60)

    def stop(self) -> None:
        """Ask politely, then insist."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.out.close()

    def tail(self, n: int = 3000) -> str:
        """The end of its log, for failure messages."""
        return self.log.read_bytes()[-n:].decode(errors="replace")


class Server(Proc):
    """`ladder serve` on a free port, waited for until `probe` answers 200 (/healthz for a server whose /readyz is
    meant to answer 503)."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 1, log_level: str = "warning", probe: str = "/readyz"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--port", str(self.port), "--workers", str(workers), "--log-level", log_level], env, log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"ladder serve exited:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}{probe}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"ladder serve not ready ({probe}):\n{self.tail()}")


EMBEDDED = {"LADDER_DATABASE_URL": "", "LADDER_BROKER_URL": "", "LADDER_ARTIFACTS_URL": ""}  # over any outer setting


def embedded_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of an embedded `ladder serve` (SQLite, local artifacts, in-process worker) in `data_dir`."""
    return {**EMBEDDED, "LADDER_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **settings}


def worker(env: dict[str, str], log: Path) -> Proc:
    """`ladder worker` (a real Celery worker: prefork, one child per stage)."""
    return Proc(["worker", "--log-level", "info"], env, log)


def create_key(env: dict[str, str], tenant: str) -> str:
    """`ladder keys create --tenant NAME`; the key it printed."""
    out = subprocess.run([sys.executable, "-m", "services.cli", "keys", "create", "--tenant", tenant], env={**os.environ, **env},
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def wait_for(job_url: str, key: str, done, timeout: float = 300, every: float = 0.3) -> dict:
    """Poll a job until `done(job)`; the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(job_url, headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        if done(job):
            return job
        time.sleep(every)
    raise TimeoutError(f"{job_url}: still {job.get('status')} at {job.get('progress')}")


def submit_parts(url: str, key: str, parts: dict[str, tuple[str, bytes, str]], **headers: str) -> httpx.Response:
    """POST /v1/harden with every part as a file part (name → (file name, bytes, media type)), as `curl -F name=@FILE` sends them."""
    return httpx.post(f"{url}/v1/harden", files=parts, headers={"Authorization": f"Bearer {key}", **headers}, timeout=120)


def expect_refusal(case, r: httpx.Response) -> None:
    """The answer a bad upload (tests/bad_uploads.py's BadUpload) must get: its status, as problem details whose
    detail holds its fragment, and no stack trace."""
    assert r.status_code == case.status, (case.name, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json", case.name
    problem = r.json()
    assert problem["status"] == case.status and case.fragment in problem["detail"].lower(), (case.name, problem)
    assert "Traceback" not in r.text


def send_corpus(url: str, key: str, cases: list, after=None) -> None:
    """Send every bad upload to a server and check each answer; `after(case)` runs after each one."""
    for case in cases:
        expect_refusal(case, submit_parts(url, key, case.parts))
        if after is not None:
            after(case)


class Recorder:
    """A dispatcher that only remembers what it was asked to send (the job state machine's tests)."""

    def __init__(self):
        self.sent: list[tuple[uuid.UUID, str]] = []

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        self.sent.append((job_id, stage))
