"""The commands that run and administer a deployment: `ladder serve`, `worker`, `migrate`, `keys` and `jobs resume`
(services/cli.py parses the command line and dispatches here)."""

import argparse
import os
import sys
from datetime import UTC, datetime

from rich.console import Console

import services
from services.errors import InputError

console = Console(stderr=True)


def _migrated_database(settings):
    """The configured database, refused unless at this code's schema (Alembic's head); the embedded
    SQLite one is created and migrated on first use."""
    from alembic.util import CommandError

    from services.db import Database
    from services.migrate import require_head, upgrade

    if settings.database.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            upgrade(settings.database)
        except CommandError:  # at a revision this code does not know: require_head says so in words
            require_head(settings.database)
            raise
    require_head(settings.database)
    return Database(settings.database)


def cmd_migrate(args: argparse.Namespace) -> None:
    """Bring the configured database to the newest schema."""
    from services.migrate import upgrade
    from services.settings import get_settings

    url = get_settings().database
    upgrade(url, args.revision)
    print(f"database at revision {args.revision}")


def cmd_keys(args: argparse.Namespace) -> None:
    """Create an API key for a tenant and print it (the only time it is shown)."""
    from services.settings import get_settings
    from services.tenants.service import create_key

    db = _migrated_database(get_settings())
    with db.session() as s:
        key = create_key(s, args.tenant)
    print(key)


def _utc(t: datetime | None) -> str:
    """A stored time in UTC, to the second (PostgreSQL answers in its session's time zone); "-" for none."""
    return "-" if t is None else f"{t.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def cmd_keys_list(args: argparse.Namespace) -> None:
    """List API keys (prefix, tenant, created, revoked; never the keys), of one tenant or all."""
    from services.settings import get_settings
    from services.tenants.service import list_keys

    db = _migrated_database(get_settings())
    with db.reading() as s:
        keys = list_keys(s, args.tenant)
    if not keys:
        console.print("no API keys yet; create one with: ladder keys create --tenant NAME")
        return
    rows = [("prefix", "tenant", "created", "revoked"),
            *((k.prefix, k.tenant, _utc(k.created_at), _utc(k.revoked_at)) for k in keys)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), r[3], sep="  ")


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    """Revoke one API key, named by the prefix `ladder keys list` shows (or the whole key)."""
    from services.settings import get_settings
    from services.tenants.service import revoke

    settings = get_settings()
    db = _migrated_database(settings)
    with db.session() as s:
        key, now = revoke(s, args.prefix)
    if not now:
        print(f"{key.prefix} (tenant {key.tenant}) was already revoked at {_utc(key.revoked_at)}")
        return
    # the API caches a key it has seen (LADDER_API_KEY_CACHE_S), so say how long it may still pass
    print(f"revoked {key.prefix} (tenant {key.tenant}); a running API may still accept it for up to "
          f"{settings.api_key_cache_s:g} s (LADDER_API_KEY_CACHE_S)")


def _local_key(settings, db) -> str | None:
    """The embedded default's single local key: created on the first start, kept in data_dir."""
    from sqlalchemy import func, select

    from services.tenants.models import ApiKey
    from services.tenants.service import create_key

    path = settings.data_dir / "local-api-key"
    with db.session() as s:
        if s.scalar(select(func.count()).select_from(ApiKey)):
            return path.read_text().strip() if path.exists() else None
        key = create_key(s, "local")
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def cmd_serve(args: argparse.Namespace) -> None:
    """Run the API (embedded: SQLite, local artifacts and an in-process worker)."""
    import uvicorn

    from api.app import GuardedHttp, create_app
    from services.settings import get_settings

    settings = get_settings()
    if args.workers > 1 and settings.embedded:
        raise InputError("--workers > 1 needs LADDER_BROKER_URL and a PostgreSQL LADDER_DATABASE_URL: "
                         "the embedded worker lives in one process")
    db = _migrated_database(settings)
    host, port = args.host or settings.host, args.port or settings.port
    mode = "embedded (SQLite, local artifacts, in-process worker)" if settings.embedded else "with Celery workers"
    console.print(f"ladder {services.__version__} serving on http://{host}:{port} {mode}; API docs at /docs")
    if settings.embedded:
        from services.devices import check

        device = check(settings.device)  # in a child process: the API itself never initialises CUDA
        console.print("the embedded worker computes on " + ", ".join(f"{k} {v}" for k, v in device.items() if v))
        key = _local_key(settings, db)
        if key:
            console.print(f"local API key: {key}  (also in {settings.data_dir / 'local-api-key'})")
    db.engine.dispose()  # the app opens its own
    common = {"host": host, "port": port, "log_level": args.log_level, "access_log": args.log_level == "debug",
              "http": GuardedHttp}  # httptools with a deadline and a size cap on request heads
    if args.workers > 1:
        uvicorn.run("api.app:create_app", factory=True, workers=args.workers, **common)  # each process reads the same settings
    else:
        uvicorn.run(create_app(settings), **common)


def cmd_worker(args: argparse.Namespace) -> None:
    """Run a Celery worker (one process per GPU; stages run in a fresh child each)."""
    from services.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        raise InputError("set LADDER_BROKER_URL (e.g. redis://localhost:6379/0) and LADDER_DATABASE_URL to run a worker; "
                         "without them `ladder serve` runs its own")
    from services.migrate import require_head

    require_head(settings.database)  # a worker older or newer than the schema would write wrong rows
    if args.gpus:
        sys.exit(_gpu_workers(args))
    from services.devices import check

    device = check(settings.device)  # in a child process: this one forks the stages and must not initialise CUDA
    console.print(f"ladder worker {args.name}: stages compute on " + ", ".join(f"{k} {v}" for k, v in device.items() if v))
    from workers.celery_app import create_app

    app = create_app(settings)
    # no mingle or gossip: workers share nothing but the queue, and mingle costs a second at every (re)connect
    app.worker_main(["worker", "-Q", settings.queue, "-c", "1", "-P", "prefork", "--loglevel", args.log_level.upper(),
                     "-n", args.name, "--without-mingle", "--without-gossip"])


def _gpu_workers(args: argparse.Namespace) -> int:
    """`ladder worker --gpus 0,1`: one worker process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES) and
    named after it; SIGTERM / SIGINT go to all; when one ends, the others are stopped and its exit status is ours
    (an orchestrator restarts the lot)."""
    import signal
    import subprocess
    import time

    gpus = [g.strip() for g in args.gpus.split(",")]
    if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus {args.gpus!r}: give distinct GPU indices, e.g. --gpus 0,1 (as nvidia-smi numbers them)")
    procs = {g: subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--name", f"ladder-gpu{g}@%h",
                                  "--log-level", args.log_level],
                                 env={**os.environ, "CUDA_VISIBLE_DEVICES": g, "LADDER_DEVICE": "cuda"}) for g in gpus}

    def forward(signum, _frame):
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(p.poll() is None for p in procs.values()):
        time.sleep(0.5)
    gpu, first = next((g, p) for g, p in procs.items() if p.poll() is not None)
    console.print(f"the worker of GPU {gpu} ended ({first.returncode}); stopping the others")
    forward(signal.SIGTERM, None)
    for p in procs.values():
        p.wait()
    return first.returncode


def cmd_jobs_resume(args: argparse.Namespace) -> None:
    """Queue again jobs the infrastructure failed (storage_full, …): they go on from their kept stages."""
    import uuid

    from sqlalchemy import select

    from services.jobs.models import Job
    from services.jobs.service import RESUMABLE, Conflict, resume
    from services.settings import get_settings

    if bool(args.ids) == args.all:
        raise InputError("name the jobs to resume (ladder jobs resume ID ...) or give --all, not both")
    try:
        ids = [uuid.UUID(i) for i in args.ids]
    except ValueError as e:
        raise InputError(f"not a job id: {e}; give the ids the API answered (GET /v1/jobs lists them)") from e
    db = _migrated_database(get_settings())
    if args.all:
        with db.reading() as s:
            ids = list(s.scalars(select(Job.id).where(Job.status == "failed", Job.error_code.in_(RESUMABLE))
                                 .order_by(Job.created_at)))
        if not ids:
            print(f"no failed job to resume (none failed with {', '.join(RESUMABLE)})")
            return
    for job_id in ids:
        try:
            with db.session() as s:
                job = resume(s, job_id)
                stage = job.stage
        except Conflict as e:
            raise InputError(str(e)) from e
        print(f"job {job_id} queued again at {stage}; the reconciler of a running API sends it within seconds")
