"""The FastAPI app: job routes, health, metrics, problem details, the request size cap, and the
reconciler (plus, when embedded, the in-process worker)."""

import logging
import threading
import time
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text
from starlette.types import ASGIApp, Receive, Scope, Send

import services
from api import jobs, problems
from api.problems import Problem, problem
from services.jobs import service
from services.jobs.models import Job
from services.settings import Settings, get_settings
from workers.context import Context, build

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuses a request body over the cap: at once by its Content-Length, else as the bytes arrive."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request is larger than {self.limit:,} bytes; send smaller files or ask the operator to raise LADDER_MAX_REQUEST_BYTES"
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await problem(413, too_big)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise Problem(413, too_big)
            return message

        await self.app(scope, counted, send)


class Metrics:
    """Prometheus metrics: requests by route and status, latency, and jobs by status (read at scrape)."""

    def __init__(self, ctx: Context):
        self.registry = CollectorRegistry()
        self.requests = Counter("ladder_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("ladder_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
                                 buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30))
        self.ctx = ctx
        self.registry.register(self)

    def collect(self):
        """Jobs per status, straight from the database."""
        gauge = GaugeMetricFamily("ladder_jobs", "jobs by status", labels=["status"])
        with self.ctx.db.reading() as s:
            for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
                gauge.add_metric([status], n)
        yield gauge

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        """Count one request under its route template (not its path: ids would explode the labels)."""
        name = getattr(scope.get("route"), "path", "unmatched")
        self.requests.labels(scope["method"], name, str(status)).inc()
        self.latency.labels(name).observe(seconds)


class Observe:
    """Times every HTTP request into the metrics (plain ASGI: no per-request task or thread)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - started)


class Reconciler(threading.Thread):
    """Every few seconds, enqueue again the jobs whose worker died or whose message was lost."""

    def __init__(self, ctx: Context):
        super().__init__(daemon=True, name="ladder-reconciler")
        self.ctx, self.done = ctx, threading.Event()

    def run(self) -> None:
        s = self.ctx.settings
        while not self.done.wait(s.reconcile_every_s):
            try:
                with self.ctx.db.session() as session:
                    sent = service.reconcile(session, s.stale_after_s, s.requeue_after_s, self.ctx.dispatcher)
                for job_id, stage in sent:
                    log.warning("reconciler: job %s enqueued again at %s", job_id, stage)
            except Exception:
                log.exception("reconciler pass failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for these settings (default: from the environment)."""
    settings = settings or get_settings()
    ctx = build(settings)
    if settings.embedded:
        from workers.embedded import EmbeddedWorker

        embedded = EmbeddedWorker(ctx)  # also the context's dispatcher

        def broker_ok() -> bool:
            return embedded.is_alive()
    else:
        from workers.celery_app import CeleryDispatcher, app as celery

        ctx.dispatcher = CeleryDispatcher(celery)
        broker = redis.Redis.from_url(settings.broker_url, socket_timeout=1, socket_connect_timeout=1)

        def broker_ok() -> bool:
            try:
                return bool(broker.ping())
            except redis.RedisError:
                return False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reconciler = Reconciler(ctx)
        if settings.embedded:
            embedded.start()
            with ctx.db.session() as s:  # nothing else can be running this database's jobs: resume them now
                service.reconcile(s, 0, 0, ctx.dispatcher)
        reconciler.start()
        yield
        reconciler.done.set()
        if settings.embedded:
            embedded.stop()

    app = FastAPI(
        title="ladder", version=services.__version__, lifespan=lifespan,
        description="Harden image classifiers against adversarial attacks with LADDER. "
                    "Submit a model and its data, poll the job, download hardened weights and the report.",
    )
    app.state.ctx = ctx
    problems.install(app)
    app.include_router(jobs.router)
    metrics = Metrics(ctx)

    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "database or broker unreachable"}})
    def readyz():
        """The database and the broker (or the embedded worker) are reachable."""
        checks = {}
        try:
            with ctx.db.reading() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"unreachable ({type(e).__name__})"
        checks["broker" if not settings.embedded else "worker"] = "ok" if broker_ok() else "unreachable"
        if any(v != "ok" for v in checks.values()):
            return problem(503, "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"))
        return {"status": "ok", **checks}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
