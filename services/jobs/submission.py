"""A job's submission, behind `POST /v1/harden`: the parts (already on disk, hashed) validated, an
Idempotency-Key looked up once, the parts stored, the job created; on failure nothing stays behind."""

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from services import faults
from services.bounds import check_bounds
from services.checkpoints import inputs_digest
from services.context import Context
from services.jobs import repository, service
from services.jobs.models import Job
from services.uploads import Limits, check_data, check_model, check_splits, parse_config, parse_spec

SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "graph": ".graph.safetensors", "npz": ".npz", "zip": ".zip"}


def submit(ctx: Context, tenant: uuid.UUID, key: str | None, paths: dict[str, Path], filenames: dict[str, str | None],
           shas: dict[str, str]) -> tuple[Job, bool]:
    """Validate the parts (files in `paths`, with their SHA-256 in `shas`), store them and create the job; (job,
    created: False for an Idempotency-Key replay). Nothing stays behind on failure."""
    limits = Limits.from_settings(ctx.settings)
    request_digest = hashlib.sha256(json.dumps(sorted(shas.items())).encode()).hexdigest()
    if key is not None:
        with ctx.db.reading() as s:
            earlier = repository.by_idempotency_key(s, tenant, key)
            if earlier is not None:
                return service.replay(earlier, request_digest), False
    with ctx.db.reading() as s:
        service.refuse_if_full(s, tenant, ctx.settings.max_active_jobs_per_tenant)
    spec = parse_spec(paths["model_spec"].read_bytes())
    config = parse_config(paths["config"].read_bytes() if "config" in paths else None)
    check_bounds(config, ctx.settings)
    inputs: dict[str, Any] = {}
    fmt = check_model(paths["model"], filenames["model"] or "model", spec, limits)
    inputs["model"] = {"format": fmt}
    for part in ("train_data", "test_data", "validation_data"):
        if part in paths:
            info = check_data(paths[part], filenames[part] or part, spec, limits, part)
            inputs[part] = {"format": info.format, "samples": info.n, "class_counts": info.class_counts}
    check_splits(inputs["train_data"]["class_counts"], config, "test_data" in paths, "validation_data" in paths)
    for part in inputs:
        inputs[part] |= {"sha256": shas[part], "size": paths[part].stat().st_size, "filename": filenames[part]}
    digest = inputs_digest(spec, config, [shas.get(p) for p in ("model", "train_data", "test_data", "validation_data")])
    job_id = uuid.uuid4()
    stored = {}
    try:
        for part in inputs:
            k = f"jobs/{job_id}/inputs/{part}{SUFFIX[inputs[part]['format']]}"
            stored[f"input.{part}"] = (k, *ctx.store.put(k, paths[part]))
        with ctx.db.session() as s:
            job, created = service.create(s, service.NewJob(
                job_id, tenant, key, request_digest, digest, spec.model_dump(mode="json"),
                config.model_dump(mode="json"), inputs, stored), ctx.dispatcher,
                ctx.settings.max_active_jobs_per_tenant)
    except BaseException as e:
        if faults.classify(e) == faults.DATABASE:  # the commit may have landed with its answer lost: keep the inputs,
            e.add_note(f"jobs/{job_id} kept: the sweeper removes it if no job row owns it")  # the sweeper decides
            raise
        try:
            ctx.store.delete_prefix(f"jobs/{job_id}")
        except Exception as cleanup:  # the store is down: the answer is about the first error, its log line says this too
            e.add_note(f"jobs/{job_id} not deleted ({faults.describe(cleanup)}); the sweeper removes it")
        raise
    if not created:  # a concurrent request with the same key created the job first
        ctx.store.delete_prefix(f"jobs/{job_id}")
    return job, created
