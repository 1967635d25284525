"""Job routes: submit a hardening job, list, poll, cancel, download the model and the report."""

import base64
import hashlib
import io
import json
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

import services
from api.deps import ContextDep, TenantDep, in_session
from api.problems import Problem
from api.schemas import JobOut, JobPage, ProblemOut
from services.bounds import check_bounds
from services.jobs import repository, service
from services.method.pipeline import STAGE_SCHEMA
from services.uploads import PARTS, Limits, check_data, check_model, check_part, parse_config, parse_spec
from workers.context import Context

router = APIRouter(prefix="/v1", tags=["jobs"])
PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": ProblemOut, "description": what} for code, what in {
        401: "missing or unknown API key", 404: "no such job for this tenant", 409: "not allowed in the job's state",
        413: "a part or the request is too large", 415: "a part has the wrong type", 422: "invalid content (the detail says what to fix)",
    }.items()
}
CHUNK = 1 << 20
SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "npz": ".npz", "zip": ".zip"}
HARDEN_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["model", "model_spec", "train_data"],
    "properties": {
        "model": {"type": "string", "format": "binary", "description": "weights as safetensors (state dict), or a torch.export .pt2 archive with architecture 'custom'"},
        "model_spec": {"type": "string", "description": 'JSON: {"architecture", "num_classes", "input_shape": [C,H,W], "mean", "std", "latent_layer"?}'},
        "train_data": {"type": "string", "format": "binary", "description": ".npz with x and y, or a .zip of one folder of images per class"},
        "test_data": {"type": "string", "format": "binary", "description": "optional, same formats; default: a stratified hold-out of train_data"},
        "config": {"type": "string", "description": "optional JSON of method settings (LadderConfig); unknown keys are refused"},
    }}}}}}


def _too_large(name: str, size: int | None, cap: int) -> str:
    given = f" ({size:,} bytes)" if size is not None else ""
    return f"part {name!r} is larger than the {cap:,}-byte limit{given}; send a smaller file"


def _receive(form: FormData, tmp: Path, limits: Limits) -> tuple[dict[str, Path], dict[str, str | None], dict[str, str]]:
    """Copy every part to `tmp`, hashing it and checking names, types and size caps as the bytes are copied."""
    names = list(form.keys())
    for name in names:
        if name not in PARTS:
            raise Problem(422, f"unknown part {name!r}; send {', '.join(PARTS)}")
        if len(form.getlist(name)) > 1:
            raise Problem(422, f"part {name!r} was sent more than once; send it once")
    missing = [n for n, rule in PARTS.items() if rule.required and n not in names]
    if missing:
        raise Problem(422, f"missing part(s) {', '.join(missing)}; a job needs model, model_spec and train_data")
    paths, filenames, shas = {}, {}, {}
    for name in names:
        value, cap = form[name], getattr(limits, PARTS[name].cap)
        if isinstance(value, UploadFile):
            check_part(name, value.filename, value.content_type)
            if value.size is not None and value.size > cap:
                raise Problem(413, _too_large(name, value.size, cap))
            value.file.seek(0)
            source, filenames[name] = value.file, value.filename
        else:
            if name not in ("model_spec", "config"):
                raise Problem(422, f"part {name!r} must be a file upload (curl: -F {name}=@FILE)")
            source, filenames[name] = io.BytesIO(value.encode()), None
        h, size = hashlib.sha256(), 0
        paths[name] = tmp / name
        with open(paths[name], "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > cap:  # a part whose size was not announced
                    raise Problem(413, _too_large(name, None, cap))
                h.update(chunk)
                out.write(chunk)
        shas[name] = h.hexdigest()
    return paths, filenames, shas


def _submit(ctx: Context, tenant: uuid.UUID, key: str | None, paths: dict[str, Path], filenames: dict[str, str | None],
            shas: dict[str, str]):
    """Validate the parts, store them and create the job; (job, created). Nothing stays behind on failure."""
    limits = Limits.from_settings(ctx.settings)
    request_digest = hashlib.sha256(json.dumps(sorted(shas.items())).encode()).hexdigest()
    if key is not None:
        with ctx.db.reading() as s:
            earlier = repository.by_idempotency_key(s, tenant, key)
            if earlier is not None:
                return service.replay(earlier, request_digest), False
    spec = parse_spec(paths["model_spec"].read_bytes())
    config = parse_config(paths["config"].read_bytes() if "config" in paths else None)
    check_bounds(config, ctx.settings)
    inputs: dict[str, Any] = {}
    fmt = check_model(paths["model"], filenames["model"] or "model", spec, limits)
    inputs["model"] = {"format": fmt}
    for part in ("train_data", "test_data"):
        if part in paths:
            info = check_data(paths[part], filenames[part] or part, spec, limits, part)
            inputs[part] = {"format": info.format, "samples": info.n, "class_counts": info.class_counts}
    if "test_data" not in paths:
        _check_holdout(inputs["train_data"]["class_counts"], config.test_fraction)
    for part in inputs:
        inputs[part] |= {"sha256": shas[part], "size": paths[part].stat().st_size, "filename": filenames[part]}
    inputs_digest = hashlib.sha256(json.dumps([
        services.__version__, STAGE_SCHEMA, spec.model_dump(mode="json"), config.model_dump(mode="json"),
        [shas.get(p) for p in ("model", "train_data", "test_data")],
    ]).encode()).hexdigest()
    job_id = uuid.uuid4()
    stored = {}
    try:
        for part in inputs:
            k = f"jobs/{job_id}/inputs/{part}{SUFFIX[inputs[part]['format']]}"
            stored[f"input.{part}"] = (k, *ctx.store.put(k, paths[part]))
        with ctx.db.session() as s:
            job, created = service.create(s, service.NewJob(
                job_id, tenant, key, request_digest, inputs_digest, spec.model_dump(mode="json"),
                config.model_dump(mode="json"), inputs, stored), ctx.dispatcher)
    except BaseException:
        ctx.store.delete_prefix(f"jobs/{job_id}")
        raise
    if not created:  # a concurrent request with the same key created the job first
        ctx.store.delete_prefix(f"jobs/{job_id}")
    return job, created


def _check_holdout(counts: list[int], fraction: float) -> None:
    """Without test data, a stratified hold-out must leave ≥ 3 training samples per class and some test samples."""
    held = [round(c * fraction) for c in counts]
    if sum(held) == 0:
        raise Problem(422, f"a {fraction:.0%} hold-out of train_data is empty; send test_data or raise config test_fraction")
    short = [c for c, (n, h) in enumerate(zip(counts, held, strict=True)) if n - h < 3]
    if short:
        raise Problem(422, f"class {short[0]} keeps {counts[short[0]] - held[short[0]]} training samples after the "
                           f"{fraction:.0%} hold-out; send at least 4 per class, or send test_data")


def _location(job: Any) -> dict[str, str]:
    return {"Location": f"/v1/jobs/{job.id}", "Retry-After": "5"}


@router.post("/harden", status_code=202, response_model=JobOut, openapi_extra=HARDEN_BODY,
             responses={**PROBLEMS, 202: {"description": "accepted; poll the Location"}})
async def harden(
    request: Request, response: Response, tenant: TenantDep, ctx: ContextDep,
    idempotency_key: Annotated[str | None, Header(max_length=200, description="same key + same parts → the same job")] = None,
) -> JobOut:
    """Submit a model and its data for hardening."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Problem(415, "send the job as multipart/form-data with parts model, model_spec, train_data (and optionally test_data, config)")
    limits = Limits.from_settings(ctx.settings)
    with tempfile.TemporaryDirectory(prefix="ladder-upload-") as tmp:
        try:
            form = await request.form(max_files=len(PARTS), max_fields=len(PARTS), max_part_size=limits.json_bytes)
        except MultiPartException as e:
            raise Problem(422, f"the multipart body cannot be read ({e.message}); send parts {', '.join(PARTS)}") from e
        try:
            paths, filenames, shas = await run_in_threadpool(_receive, form, Path(tmp), limits)
        finally:
            await form.close()
        job, created = await run_in_threadpool(_submit, ctx, tenant, idempotency_key, paths, filenames, shas)
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


@router.get("/jobs", response_model=JobPage, responses=PROBLEMS)
async def list_jobs(ctx: ContextDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[str | None, Query(description="the `next` of the previous page")] = None) -> JobPage:
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


@router.get("/jobs/{job_id}", response_model=JobOut, responses=PROBLEMS)
async def get_job(job_id: uuid.UUID, ctx: ContextDep, tenant: TenantDep) -> Response:
    """A job's status, stage, progress, timings and error."""
    body = await in_session(ctx, lambda s: JobOut.of(_job(s, tenant, job_id)).model_dump_json())
    return Response(body, media_type="application/json")  # serialised once: this is the route clients poll


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, responses=PROBLEMS)
async def cancel_job(job_id: uuid.UUID, ctx: ContextDep, tenant: TenantDep) -> JobOut:
    """Cancel a queued job now, or a running one at its next batch."""
    def cancel(session) -> JobOut:
        _job(session, tenant, job_id)
        return JobOut.of(service.request_cancel(session, repository.get(session, job_id, lock=True), ctx.store))

    return await in_session(ctx, cancel, write=True)  # committed, and its artifacts deleted, before the answer goes out


def _finished(job: Any, what: str) -> None:
    if job.status != "succeeded":
        raise Problem(409, f"job {job.id} is {job.status}; the {what} is ready once its status is succeeded")


@router.get("/jobs/{job_id}/model", responses={**PROBLEMS, 200: {"content": {"application/octet-stream": {}},
            "description": "the hardened weights (safetensors state dict); ETag = SHA-256"}, 304: {"description": "not modified"}})
async def get_model(job_id: uuid.UUID, ctx: ContextDep, tenant: TenantDep,
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
    return StreamingResponse(ctx.store.stream(art.key), media_type=media_type,
                             headers={"ETag": etag, "Content-Length": str(art.size), **headers})


@router.get("/jobs/{job_id}/report", responses=PROBLEMS)
async def get_report(job_id: uuid.UUID, ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    """The evaluation report (JSON, schema ladder.report/2: docs/report.md), stored with the job."""
    def report(session) -> dict[str, Any]:
        job = _job(session, tenant, job_id)
        _finished(job, "report")
        return job.report

    return await in_session(ctx, report)


@router.get("/jobs/{job_id}/report.html", responses={**PROBLEMS, 200: {"content": {"text/html": {}},
            "description": "the evaluation report as one self-contained page; ETag = SHA-256"},
            304: {"description": "not modified"}})
async def get_report_html(job_id: uuid.UUID, ctx: ContextDep, tenant: TenantDep,
                          if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The evaluation report as one self-contained HTML page (tables, plots, generated examples)."""
    return await _artifact(ctx, tenant, job_id, "report.html", if_none_match, "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"})
