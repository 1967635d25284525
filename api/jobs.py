"""Job routes: submit a hardening job, list, poll, cancel, download the model and the report."""

import base64
import contextlib
import hashlib
import itertools
import logging
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.deps import ContextDep, TenantDep, in_session
from api.problems import Problem, responses
from api.schemas import JobOut, JobPage
from services import faults, scratch
from services.context import Context
from services.jobs import repository, service
from services.jobs.submission import submit
from services.uploads import (
    PARTS,
    Limits,
    check_part,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["jobs"])
CURSOR = r"^[A-Za-z0-9_-]+={0,2}$"  # the `next` link's cursor: URL-safe base64 of "created_at|id"
JobId = Annotated[uuid.UUID, PathParam(description="the job's id, as POST /v1/harden answered it")]
_WHAT = {
    "model": "weights as safetensors (a state dict), or a torch.export .pt2 archive with architecture 'custom'",
    "model_spec": 'JSON: {"architecture", "num_classes", "input_shape": [C,H,W], "mean", "std", "latent_layer"?}',
    "train_data": ".npz with x and y, or a .zip of one folder of images per class",
    "test_data": "optional, same formats as train_data; default: a stratified hold-out of train_data",
    "validation_data": "optional, same formats, only with select.max_clean_drop: the data checkpoints are chosen on "
                       "(rows the uploaded model never trained on); default: a stratified split of train_data",
    "config": "optional JSON of method settings (LadderConfig); unknown keys are refused",
}


def _part_schema(name: str) -> dict[str, Any]:
    """One part of the multipart body in the OpenAPI document, from its rule in services.uploads.PARTS."""
    rule = PARTS[name]
    names = " or ".join(f"*{s}" for s in rule.suffixes)
    how = f"a file named {names}" if rule.file else f"a field, or a file named {names}"
    schema: dict[str, Any] = {"type": "string", "description": f"{_WHAT[name]}. Sent as {how}; media type "
                              f"{', '.join(sorted(rule.content_types))}; once; at most LADDER_MAX_{rule.cap.upper()}."}
    if rule.file:
        schema["format"] = "binary"
    else:
        schema["contentMediaType"] = "application/json"
    return schema


HARDEN_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": [n for n, rule in PARTS.items() if rule.required], "additionalProperties": False,
               "properties": {name: _part_schema(name) for name in PARTS}},
    "encoding": {name: {"contentType": ", ".join(sorted(rule.content_types))} for name, rule in PARTS.items()},
}}}}


def _too_large(name: str, size: int | None, cap: int) -> str:
    given = f" ({size:,} bytes)" if size is not None else ""
    return f"part {name!r} is larger than the {cap:,}-byte limit{given}; send a smaller file"


class _Sink:
    """A file part written straight to `path` in the upload's folder, hashed as the parser writes it: the one copy
    of the upload the API makes (Starlette would spool it to a temporary file of its own first)."""

    def __init__(self, path: Path):
        self.path, self.f, self.sha = path, open(path, "w+b"), hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        self.f.close()


class _JobParts(MultiPartParser):
    """Starlette's multipart parser, refusing a part of a job by name as soon as its headers arrive (unknown,
    sent twice, a file part sent as a field, a wrong media type or file kind) and as soon as its bytes pass its cap;
    anything else it cannot parse is a 400. So Starlette's own limits on parts are never the ones that answer.
    A file part is written to `folder`/<part name> as it arrives (_Sink), not to Starlette's spooled file."""

    def __init__(self, request: Request, stream: Any, limits: Limits, folder: Path):
        super().__init__(request.headers, stream, max_files=len(PARTS), max_fields=len(PARTS), max_part_size=limits.json_bytes)
        self.limits, self.folder, self.seen, self.size = limits, folder, set[str](), 0

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        if b"name" in options:
            name = options[b"name"].decode("utf-8", "replace")
            if name not in PARTS:
                shown = repr(name[:80] + ("…" if len(name) > 80 else ""))
                raise Problem(422, f"unknown part {shown}; send {', '.join(PARTS)}")
            if name in self.seen:
                raise Problem(422, f"part {name!r} was sent more than once; send it once")
            if PARTS[name].file and b"filename" not in options:
                raise Problem(422, f"part {name!r} must be a file upload (curl: -F {name}=@FILE)")
            self.seen.add(name)
        super().on_headers_finished()  # no name: a MultiPartException
        part = self._current_part
        if part.file is not None:
            check_part(part.field_name, part.file.filename, part.file.content_type)
            spooled = part.file.file  # Starlette's, still empty: swapped for the part's file in the upload's folder
            self._files_to_close_on_error.remove(spooled)  # type: ignore[arg-type]
            spooled.close()
            sink = _Sink(self.folder / part.field_name)  # a name from PARTS, checked above
            part.file.file = sink  # type: ignore[assignment]  # it writes, seeks, reads and closes like the spooled file
            self._files_to_close_on_error.append(sink)  # type: ignore[arg-type]
        self.size = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        name = self._current_part.field_name
        self.size += end - start
        cap = getattr(self.limits, PARTS[name].cap)
        if self.size > cap:
            raise Problem(413, _too_large(name, None, cap))
        super().on_part_data(data, start, end)


async def _parts(request: Request, limits: Limits, folder: Path) -> FormData:
    """The job's parts: fields in memory (capped at json_bytes), files written to `folder` as they arrive."""
    media, _ = parse_options_header(request.headers.get("content-type", ""))
    if media != b"multipart/form-data":
        raise Problem(415, "send the job as multipart/form-data with parts model, model_spec, train_data "
                           "(and optionally test_data, validation_data, config)")
    async with contextlib.aclosing(request.stream()) as stream:
        try:
            return await _JobParts(request, stream, limits, folder).parse()
        except MultiPartException as e:
            raise Problem(400, f"the multipart body cannot be parsed ({e.message}); send parts {', '.join(PARTS)} "
                               "as multipart/form-data (curl: -F name=@FILE)") from e


def _receive(form: FormData, folder: Path, limits: Limits) -> tuple[dict[str, Path], dict[str, str | None], dict[str, str]]:
    """Every part as a file in `folder` with its SHA-256: file parts are there already (_Sink), fields are written
    (names, types and sizes were checked as the parts arrived)."""
    names = list(form.keys())
    missing = [n for n, rule in PARTS.items() if rule.required and n not in names]
    if missing:
        raise Problem(422, f"missing part(s) {', '.join(missing)}; a job needs model, model_spec and train_data")
    paths, filenames, shas = {}, {}, {}
    for name in names:
        value = form[name]
        if isinstance(value, UploadFile):
            sink: _Sink = value.file  # type: ignore[assignment]  # put there by _JobParts
            sink.f.flush()  # a full disk shows here at the latest, while _spooling still answers for it
            paths[name], filenames[name], shas[name] = sink.path, value.filename, sink.sha.hexdigest()
            continue
        data, cap = value.encode(), getattr(limits, PARTS[name].cap)
        if len(data) > cap:  # a field whose text encodes to more bytes than arrived
            raise Problem(413, _too_large(name, None, cap))
        paths[name], filenames[name], shas[name] = folder / name, None, hashlib.sha256(data).hexdigest()
        paths[name].write_bytes(data)
    return paths, filenames, shas


@contextlib.contextmanager
def _spooling(settings: Any) -> Iterator[None]:
    """While the upload is written to the API's temporary folder: that disk filling up is a 507 with Retry-After
    naming it (not the artifact store, whose errors the app's Errors middleware answers), and one warning line."""
    try:
        yield
    except OSError as e:
        if faults.classify(e) != faults.STORAGE_FULL:
            raise
        log.warning("POST /v1/harden: 507, the API's space for uploads (%s) is full (%s)", tempfile.gettempdir(), faults.describe(e))
        raise Problem(507, f"the API's space for uploads is full; send the request again in {settings.retry_after_s} s "
                           "(operators: free space in its temporary folder, TMPDIR)",
                      {"Retry-After": str(settings.retry_after_s)}) from e


def _location(job: Any) -> dict[str, str]:
    return {"Location": f"/v1/jobs/{job.id}", "Retry-After": "5"}


@router.post("/harden", status_code=202, response_model=JobOut, openapi_extra=HARDEN_BODY,
             responses={**responses(400, 401, 408, 413, 415, 422, 429, 503, 507), 202: {"description": "accepted; poll the Location"}})
async def harden(
    request: Request, response: Response, tenant: TenantDep, ctx: ContextDep,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="same key + same parts → the same job")] = None,
) -> JobOut:
    """Submit a model and its data for hardening."""
    limits = Limits.from_settings(ctx.settings)
    with _spooling(ctx.settings):
        folder = scratch.directory("upload")  # named after this process: the sweeper removes it if the process dies
    with folder as tmp:
        with _spooling(ctx.settings):
            form = await _parts(request, limits, Path(tmp))
            try:
                paths, filenames, shas = await run_in_threadpool(_receive, form, Path(tmp), limits)
            finally:
                await form.close()
        job, created = await run_in_threadpool(submit, ctx, tenant, idempotency_key, paths, filenames, shas)
    response.headers.update(_location(job))
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


def _job(session: Any, tenant: uuid.UUID, job_id: uuid.UUID) -> Any:
    job = repository.get_for_tenant(session, tenant, job_id)
    if job is None:
        raise Problem(404, f"no job {job_id} for this API key")
    return job


def _cursor(job: Any) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


@router.get("/jobs", response_model=JobPage, responses=responses(401, 422, 503))
async def list_jobs(ctx: ContextDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[str | None, Query(description="the cursor of the previous page's `next` link",
                                                        pattern=CURSOR, max_length=200)] = None) -> JobPage:
    """The caller's jobs, newest first."""
    before = None
    if cursor:
        try:
            at, _, jid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
            before = (datetime.fromisoformat(at), uuid.UUID(jid))
        except ValueError as e:
            raise Problem(422, "cursor is not one this API gave; use the `next` link of the previous page") from e

    def page(session) -> JobPage:
        jobs = repository.page(session, tenant, limit + 1, before)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(items=[JobOut.of(j) for j in jobs],
                       next=f"/v1/jobs?limit={limit}&cursor={_cursor(jobs[-1])}" if more else None)

    return await in_session(ctx, page)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=responses(401, 404, 422, 503))
async def get_job(job_id: JobId, ctx: ContextDep, tenant: TenantDep) -> Response:
    """A job's status, stage, progress, timings and error."""
    body = await in_session(ctx, lambda s: JobOut.of(_job(s, tenant, job_id)).model_dump_json())
    return Response(body, media_type="application/json")  # serialised once: this is the route clients poll


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, responses=responses(401, 404, 409, 422, 503))
async def cancel_job(job_id: JobId, ctx: ContextDep, tenant: TenantDep) -> JobOut:
    """Cancel a queued job now, or a running one at its next batch."""
    def cancel(session) -> JobOut:
        _job(session, tenant, job_id)
        job = repository.get(session, job_id, lock=True)
        assert job is not None  # _job found it, and jobs are never deleted under a tenant's request
        return JobOut.of(service.request_cancel(session, job, ctx.store))

    return await in_session(ctx, cancel, write=True)  # committed, and its artifacts deleted, before the answer goes out


def _finished(job: Any, what: str) -> None:
    if job.status != "succeeded":
        raise Problem(409, f"job {job.id} is {job.status}; the {what} is ready once its status is succeeded")


@router.get("/jobs/{job_id}/model", response_class=Response, responses={
    **responses(401, 404, 409, 422, 503), 200: {"content": {"application/octet-stream": {}},
            "description": "the hardened weights (safetensors state dict); ETag = SHA-256"}, 304: {"description": "not modified"}})
async def get_model(job_id: JobId, ctx: ContextDep, tenant: TenantDep,
                    if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The hardened weights as safetensors, with a strong ETag (their SHA-256)."""
    return await _artifact(ctx, tenant, job_id, "model", if_none_match, "application/octet-stream",
                           {"Content-Disposition": f'attachment; filename="hardened-{job_id}.safetensors"'})


async def _artifact(ctx: Context, tenant: Any, job_id: uuid.UUID, name: str, if_none_match: str | None,
                    media_type: str, headers: dict[str, str]) -> Response:
    """A finished job's stored artifact, streamed with a strong ETag (its SHA-256), or 304."""
    def stored(session) -> Any:
        job = _job(session, tenant, job_id)
        _finished(job, "model" if name == "model" else "report")
        art = repository.artifact(session, job.id, name)
        if art is None and name == "report.html":
            raise Problem(404, f"job {job.id} has no report page (it could not be rendered; the worker's log says why); "
                               f"GET /v1/jobs/{job.id}/report has every number")
        if art is None:
            raise Problem(409, f"job {job.id} has no stored {name}; submit it again")
        return art

    art = await in_session(ctx, stored)
    etag = f'"{art.sha256}"'
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    # the first chunk is read before the answer starts: a store that cannot be read is a 503 with Retry-After
    # (Errors), not a 200 cut short
    chunks = ctx.store.stream(art.key)
    first = await run_in_threadpool(next, chunks, b"")
    return StreamingResponse(itertools.chain([first], chunks), media_type=media_type,
                             headers={"ETag": etag, "Content-Length": str(art.size), **headers})


@router.get("/jobs/{job_id}/report", responses=responses(401, 404, 409, 422, 503))
async def get_report(job_id: JobId, ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    """The evaluation report (JSON, schema ladder.report/2: docs/report.md), stored with the job."""
    def report(session) -> dict[str, Any]:
        job = _job(session, tenant, job_id)
        _finished(job, "report")
        return job.report

    return await in_session(ctx, report)


@router.get("/jobs/{job_id}/report.html", response_class=Response, responses={
    **responses(401, 404, 409, 422, 503), 200: {"content": {"text/html": {}},
            "description": "the evaluation report as one self-contained page; ETag = SHA-256"},
            304: {"description": "not modified"}})
async def get_report_html(job_id: JobId, ctx: ContextDep, tenant: TenantDep,
                          if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The evaluation report as one self-contained HTML page (tables, plots, generated examples)."""
    return await _artifact(ctx, tenant, job_id, "report.html", if_none_match, "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"})
