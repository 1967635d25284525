"""Which errors are the infrastructure's, not the method's or the input's: a lost database connection, an
unreachable broker, a full or unreachable artifact store. Those are retried with backoff and never fail a job
as `internal_error`; `Unavailable` is what is left when one outlasts its retries, named by its code."""

import errno
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

DATABASE = "database_unavailable"
BROKER = "broker_unavailable"
STORAGE_FULL = "storage_full"
STORAGE_UNAVAILABLE = "storage_unavailable"
CODES = (DATABASE, BROKER, STORAGE_FULL, STORAGE_UNAVAILABLE)
STORAGE = (STORAGE_FULL, STORAGE_UNAVAILABLE)
WHAT = {DATABASE: "the database is unreachable", BROKER: "the broker is unreachable",
        STORAGE_FULL: "the artifact store or the scratch disk is full", STORAGE_UNAVAILABLE: "the artifact store is unreachable"}

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_STORE_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE}  # a network file system that went away
_S3_FULL = {"XMinioStorageFull", "InsufficientStorage"}
_S3_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "XMinioServerNotInitialized"}

T = TypeVar("T")
log = logging.getLogger(__name__)


class Unavailable(Exception):
    """An infrastructure error that outlasted its retries; `code` is one of CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (self.code, str(self))


def classify(exc: BaseException) -> str | None:
    """The code of an infrastructure error (itself or its explicit cause), None for any other error."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 4:
        code = _classify_one(e)
        if code is not None:
            return code
        e, seen = e.__cause__, seen + 1
    return None


def _classify_one(e: BaseException) -> str | None:
    if isinstance(e, Unavailable):
        return e.code
    module = type(e).__module__.split(".")[0]
    if module == "sqlalchemy":
        from sqlalchemy import exc as sa

        # OperationalError: connection lost, server restarting, SQLite busy; a pool timeout; a statement on a dead connection
        if isinstance(e, sa.OperationalError | sa.InterfaceError | sa.TimeoutError):
            return DATABASE
        if isinstance(e, sa.DBAPIError) and e.connection_invalidated:
            return DATABASE
        return None
    if module == "psycopg":
        import psycopg

        return DATABASE if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError) else None
    if module in ("redis", "kombu", "amqp"):
        import kombu.exceptions
        import redis

        return BROKER if isinstance(e, redis.ConnectionError | redis.TimeoutError | kombu.exceptions.OperationalError) else None
    if module in ("botocore", "boto3", "s3transfer", "urllib3"):
        return _classify_s3(e)
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return STORAGE_FULL
    if module == "safetensors" and any(f"os error {n})" in str(e) for n in _FULL_ERRNOS):  # SafetensorError: not an OSError
        return STORAGE_FULL
    if isinstance(e, OSError) and e.errno in _STORE_ERRNOS:
        return STORAGE_UNAVAILABLE
    return None


def _classify_s3(e: BaseException) -> str | None:
    from botocore import exceptions as bc

    if isinstance(e, bc.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if err.get("Code") in _S3_FULL or status == 507:
            return STORAGE_FULL
        return STORAGE_UNAVAILABLE if err.get("Code") in _S3_BUSY or status >= 500 else None
    if isinstance(e, bc.HTTPClientError | bc.ConnectionError | bc.NoCredentialsError | bc.ReadTimeoutError):
        return STORAGE_UNAVAILABLE
    if type(e).__name__ in ("RetriesExceededError", "S3UploadFailedError"):  # s3transfer wraps the error it gave up on
        return STORAGE_UNAVAILABLE
    return None


def describe(e: BaseException) -> str:
    """A short description for a log line or a job's error (the error's type and first line, never a traceback)."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def retry(fn: Callable[[], T], what: str, budget_s: float, *, first_s: float = 0.5, cap_s: float = 10.0,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, tried again with exponential backoff while it raises an infrastructure error, for up to `budget_s`;
    then Unavailable. Any other error passes at once. One warning when trouble starts, one line when it ends."""
    started = time.monotonic()
    delay, first = first_s, None
    while True:
        try:
            value = fn()
        except Exception as e:
            code = classify(e)
            if code is None:
                raise
            waited = time.monotonic() - started
            if first is None:
                first = e
                until = "until it answers" if math.isinf(budget_s) else f"for up to {budget_s:g} s"
                log.warning("%s: %s (%s); retrying %s", what, WHAT[code], describe(e), until)
            if waited + delay > budget_s:
                raise Unavailable(code, f"{what}: {WHAT[code]}, for {waited:.0f} s ({describe(e)})") from e
            sleep(delay)
            delay = min(cap_s, delay * 2)
            continue
        if first is not None:
            log.warning("%s: recovered after %.1f s", what, time.monotonic() - started)
        return value
