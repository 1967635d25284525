"""Errors as RFC 9457 problem details: `type`, `title`, `status`, `detail`; never a stack trace.

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

from api.schemas import ProblemOut
from services.errors import InputError
from services.jobs.service import Conflict

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
    503: "the database or the broker is unreachable",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    408: {"Connection": {"description": "close", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before submitting again", "schema": {"type": "integer"}}},
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
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Turn every error the app can raise into problem details."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        return problem(e.status, e.detail, e.headers)

    @app.exception_handler(InputError)
    async def _input(request: Request, e: InputError) -> JSONResponse:
        return problem(getattr(e, "status", 422), str(e), getattr(e, "headers", None))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict) -> JSONResponse:
        status = 422 if "Idempotency-Key" in str(e) else 409
        return problem(status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return problem(422, f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return problem(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal error; the operators have the details in the API log")
