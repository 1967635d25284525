"""Errors as RFC 9457 problem details: `type`, `title`, `status`, `detail`; never a stack trace.

Infrastructure errors (services.faults: the database or the broker unreachable, the artifact store full or
unreachable) are answered 503 or 507 with Retry-After by `Errors`, one warning line each, never a 500.

Also what the OpenAPI document says about them: `responses(...)` declares the errors a route can
answer, and `document(app)` states every error response as `application/problem+json` with the
ProblemOut schema (FastAPI would say `application/json`)."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import ProblemOut
from services import faults
from services.errors import InputError, NotFound, TooLarge, Unavailable, WrongMediaType
from services.jobs.service import Conflict, IdempotencyMismatch, TooManyJobs

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"

# every error status the API answers, and when
WHEN: dict[int, str] = {
    400: "the multipart body is malformed (no boundary, broken framing, a part without a name)",
    401: "missing or unknown API key",
    404: "no such job for this API key",
    408: "the request body stalled (LADDER_BODY_READ_TIMEOUT_S between two chunks) or took longer than "
         "LADDER_BODY_TOTAL_TIMEOUT_S; the connection is closed",
    409: "not allowed in the job's state",
    413: "a part or the whole request is larger than its cap",
    415: "not multipart/form-data, or a part has the wrong media type or file kind",
    422: "unusable content or parameters (the detail says what to fix)",
    429: "the tenant has as many queued and running jobs as it may; retry after Retry-After seconds",
    500: "internal error; the API log has the details",
    503: "the database, the broker or the artifact store is unreachable, or the server is busy; retry after Retry-After seconds",
    507: "the artifact store, or the API's space for uploads, is full; retry after Retry-After seconds",
}
_RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    408: {"Connection": {"description": "close", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before submitting again", "schema": {"type": "integer"}}},
    503: {"Retry-After": _RETRY_AFTER},
    507: {"Retry-After": _RETRY_AFTER},
}
# what an infrastructure error is answered: (status, what the client is told)
OUTAGES: dict[str, tuple[int, str]] = {
    faults.DATABASE: (503, "the database is unavailable"),
    faults.BROKER: (503, "the job queue (broker) is unreachable"),
    faults.STORAGE_FULL: (507, "the artifact store is full"),
    faults.STORAGE_UNAVAILABLE: (503, "the artifact store is unreachable"),
}


class Problem(Exception):
    """An HTTP error with a message that says what to fix."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem-details response."""
    title = HTTPStatus(status).phrase
    body = {"type": f"https://ladder.dev/problems/{title.lower().replace(' ', '-')}", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def retry_later(status: int, what: str, retry_after_s: int) -> JSONResponse:
    """The answer to an outage: what is wrong, and to send the request again after Retry-After seconds."""
    detail = f"{what}; send the request again in {retry_after_s} s (the API log has the details)"
    return problem(status, detail, {"Retry-After": str(retry_after_s)})


class Errors:
    """Answers the errors no route handles: an infrastructure error (faults.classify) is 503 or 507 with
    Retry-After and one warning line; any other is 500 with its traceback logged once. Plain ASGI inside the
    exception handlers' reach: Starlette's handler for Exception logs nothing but re-raises, so uvicorn logged
    each traceback a second time. A client that hung up passes through to Observe."""

    def __init__(self, app: ASGIApp, retry_after_s: int):
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sent(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except ClientDisconnect:
            raise
        except Exception as e:
            code = faults.classify(e)
            where = f"{scope['method']} {scope['path']}"
            if code is None:
                if started:  # nothing to answer with any more: uvicorn logs it and closes the connection
                    raise
                log.exception("unhandled error on %s", where)
                return await problem(500, "internal error; the operators have the details in the API log")(scope, receive, send)
            status, what = OUTAGES[code]
            if started:  # a download whose store failed midway: the client sees a short body and a closed connection
                log.warning("%s: %s midway through the answer (%s)", where, what, faults.describe(e))
                return
            notes = "".join(f"; {note}" for note in getattr(e, "__notes__", ()))  # e.g. what a failed upload left behind
            log.warning("%s: %d, %s (%s)%s", where, status, what, faults.describe(e), notes)
            await retry_later(status, what, self.retry_after_s)(scope, receive, send)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer these error statuses (500 is added: any route can)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 500}):
        out[code] = {"model": ProblemOut, "description": WHEN[code]}
        if code in _HEADERS:
            out[code]["headers"] = _HEADERS[code]
    return out


def document(app: FastAPI) -> None:
    """Make the app's OpenAPI document state every error response as problem details (application/problem+json)."""

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI's document, cached in app.openapi_schema: rewritten once, in place
            ref = {"$ref": "#/components/schemas/ProblemOut"}
            schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(
                "ProblemOut", ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}"))
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for code, response in operation.get("responses", {}).items():
                        if code[0] in "45":
                            response["content"] = {MEDIA_TYPE: {"schema": ref}}
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


# each kind of bad input and its answer, the most specific first; any other InputError is a 422
STATUSES: tuple[tuple[type[InputError], int], ...] = (
    (TooLarge, 413), (WrongMediaType, 415), (NotFound, 404), (TooManyJobs, 429), (Unavailable, 503))


def status_of(e: InputError) -> int:
    """The HTTP status of a kind of bad input."""
    return next((status for kind, status in STATUSES if isinstance(e, kind)), 422)


def install(app: FastAPI) -> None:
    """Turn every error the app can raise into problem details."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        return problem(e.status, e.detail, e.headers)

    @app.exception_handler(InputError)
    async def _input(request: Request, e: InputError) -> JSONResponse:
        status, headers = status_of(e), None
        if isinstance(e, TooManyJobs):
            headers = {"Retry-After": str(e.retry_after_s)}
        elif status == 503:  # every 503 says when to come back
            headers = {"Retry-After": str(request.app.state.ctx.settings.retry_after_s)}
        return problem(status, str(e), headers)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict) -> JSONResponse:
        return problem(422 if isinstance(e, IdempotencyMismatch) else 409, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return problem(422, f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return problem(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:  # what escapes Errors (a middleware's own)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal error; the operators have the details in the API log")
