"""The FastAPI app: job routes, health, metrics, problem details, the request size cap and body
timeouts, and the reconciler (plus, when embedded, the in-process worker)."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from http import HTTPStatus

import anyio
import redis
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import services
from api import jobs, problems
from api.problems import MEDIA_TYPE, Problem, problem
from services import dispatch, faults
from services.context import Context, build
from services.jobs import service
from services.jobs.models import Job
from services.settings import Settings, get_settings
from workers.reconciler import Reconciler

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's "client closed request": the metrics' status of a request whose client hung up first
MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers (nginx: 4 × 8 KiB; h11: 16 KiB)


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks against slow or huge request heads: the request line and
    headers must arrive within LADDER_HEADER_TIMEOUT_S (else 408, or a plain close if nothing came) and stay under
    MAX_HEADER_BYTES (else 431); the connection is closed either way. uvicorn's timeout_keep_alive only covers the
    idle time after an answer, and its header limit (h11_max_incomplete_event_size) applies to h11 alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_timeout_s = get_settings().header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes, self._head_begun, self._head_too_large = 0, False, False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_begun = 0, True
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_begun = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:  # raised by _count inside the parser, which uvicorn reports as a 400
            return self._answer(431, f"the request line and headers are larger than {MAX_HEADER_BYTES:,} bytes; "
                                     "send fewer or shorter headers")
        super().send_400_response(msg)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEADER_BYTES:
            self._head_too_large = True
            raise ValueError("request head too large")

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # an answer is going out: close after it
            self.cycle.keep_alive = False
        elif self._head_begun:
            log.warning("408: a request's line and headers were not complete after %g s", self._head_timeout_s)
            self._answer(408, f"the request line and headers were not complete after {self._head_timeout_s:g} s "
                              "(LADDER_HEADER_TIMEOUT_S); send the request again")
        else:
            self.transport.close()  # connected and never sent anything

    def _answer(self, status: int, detail: str) -> None:
        body = problem(status, detail).body
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
            status, HTTPStatus(status).phrase.encode(), MEDIA_TYPE.encode(), len(body), body))
        self.transport.close()


class BodyLimit:
    """Refuses a request body over the cap: at once by its Content-Length, else as the bytes arrive."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = (f"the request is larger than {self.limit:,} bytes; send smaller files or ask the operator to raise "
                   "LADDER_MAX_REQUEST_BYTES")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await problem(413, too_big)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise Problem(413, too_big)
            return message

        await self.app(scope, counted, send)


class BodyTimeout:
    """Answers 408 and closes the connection when a request body stalls: no chunk for `gap_s`, or not all of it
    within `total_s` of the request's start. Only while the app waits for the body: once it has all of it, or has
    begun its answer, receive() is passed through (a streamed download waits on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, gap_s: float, total_s: float):
        self.app, self.gap_s, self.total_s = app, gap_s, total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, waiting, seen = time.monotonic(), True, 0

        async def timed() -> Message:
            nonlocal waiting, seen
            if not waiting:
                return await receive()
            left = self.total_s - (time.monotonic() - started)
            with anyio.move_on_after(max(0.0, min(self.gap_s, left))) as timer:
                message = await receive()
            if timer.cancelled_caught:
                if left <= self.gap_s:
                    detail = (f"the request body was not complete after {self.total_s:g} s ({seen:,} bytes arrived); "
                              "send it over a faster connection, or ask the operator to raise LADDER_BODY_TOTAL_TIMEOUT_S")
                else:
                    detail = (f"the request body stalled: nothing arrived for {self.gap_s:g} s after {seen:,} bytes; "
                              "send it again (the limit is LADDER_BODY_READ_TIMEOUT_S)")
                log.warning("%s %s: 408, %s", scope["method"], scope["path"], detail.partition(";")[0])
                raise Problem(408, detail, {"Connection": "close"})
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                waiting = False
            return message

        async def sent(message: Message) -> None:
            nonlocal waiting
            if message["type"] == "http.response.start":
                waiting = False
            await send(message)

        await self.app(scope, timed, sent)


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
    """Times every HTTP request into the metrics (plain ASGI: no per-request task or thread). A client that hangs
    up before the answer is one warning line and status 499, not an unhandled error."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except ClientDisconnect:
            status = status or CLIENT_CLOSED  # the status of the answer, if it had begun
            log.warning("%s %s: the client closed the connection before the answer was sent (%d)",
                        scope["method"], scope["path"], status)
        finally:
            self.metrics.observe(scope, status or 500, time.perf_counter() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for these settings (default: from the environment)."""
    settings = settings or get_settings()
    if settings.embedded:
        from workers.embedded import EmbeddedWorker

        local = dispatch.LocalQueue()
        ctx = build(settings, local)
        embedded = EmbeddedWorker(ctx, local)

        def broker_ok() -> bool:
            return embedded.is_alive()
    else:
        ctx = build(settings, dispatch.CeleryDispatcher(dispatch.celery(settings), settings.queue))
        broker = redis.Redis.from_url(settings.broker_url or "", socket_timeout=1, socket_connect_timeout=1)

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
    problems.document(app)
    metrics = Metrics(ctx)

    # the last added runs first: Observe sees every answer, BodyLimit's and BodyTimeout's included; Errors, the
    # innermost, turns what the routes raise and no handler took (an outage, a bug) into an answer
    app.add_middleware(problems.Errors, retry_after_s=settings.retry_after_s)
    app.add_middleware(BodyTimeout, gap_s=settings.body_read_timeout_s, total_s=settings.body_total_timeout_s)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(Observe, metrics=metrics)

    @app.get("/healthz", tags=["ops"], responses=problems.responses())
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses=problems.responses(503))
    def readyz():
        """The database, the broker (or the embedded worker) and the artifact store are usable."""
        checks = {}
        try:
            with ctx.db.reading() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"unreachable ({type(e).__name__})"
        checks["broker" if not settings.embedded else "worker"] = "ok" if broker_ok() else "unreachable"
        checks["store"] = store_state()
        if any(v != "ok" for v in checks.values()):
            return problem(503, "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
                           {"Retry-After": str(settings.retry_after_s)})
        return {"status": "ok", **checks}

    def store_state() -> str:
        """'ok', or why the store is not usable (ArtifactStore.health: None when it is, else a short reason)."""
        try:
            reason = ctx.store.health()
        except Exception as e:  # a health check that cannot reach the store says so
            return f"unreachable ({faults.describe(e)})"
        return "ok" if reason is None else reason

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=problems.responses(503))
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics (jobs by status are read from the database: 503 while it is unavailable)."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
