"""Run one stage of one job: claim it, load the job's inputs and earlier stages from the artifact
store, run the method's stage, store its output, record the transition. Celery tasks and the
embedded worker both call `run_stage`, so both follow the same path.

Infrastructure errors (services/faults.py) never fail a job as internal_error. The claim is retried
with backoff for LADDER_INFRA_RETRY_S, then faults.Unavailable hands the message back to the queue
(nothing was claimed, nothing is counted). A stage's end (done, failed, canceled) is retried until the
database answers: its output is stored, and handing it back would count an attempt and leave a hold
that drops the message as BUSY. Store operations are retried for LADDER_INFRA_RETRY_S; then the job
fails as storage_full / storage_unavailable, keeping its finished stages (`ladder jobs resume`).
"""

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import save_file
from sqlalchemy.orm import Session

from services import checkpoints, devices, faults, scratch
from services.artifacts import ArtifactStore, file_digest
from services.context import Context
from services.environment import environment
from services.errors import InputError
from services.jobs import repository, service
from services.jobs.models import STAGES
from services.jobs.service import Claim
from services.method import backoff, placement
from services.method.config import LadderConfig
from services.method.models import ModelSpec, device_of, net_weights
from services.method.pipeline import Run, split_inputs
from services.method.report import build_report, gallery
from services.report import page
from services.uploads import Limits, load_data, load_model

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stopped(Exception):
    """The job was canceled, or another worker took the stage over."""


def stage_key(job_id: uuid.UUID, inputs_digest: str, stage: str) -> str:
    """Where a stage's output is stored: keyed by job, the digest of its inputs and the stage."""
    return f"jobs/{job_id}/stages/{inputs_digest[:16]}/{stage}.safetensors"


def fetch_checked(store: "RetryingStore", key: str, path: Path, expected: str | None, what: str) -> tuple[str, int]:
    """Fetch an artifact to `path`; its (sha256, size), refused if it differs from the `expected` recorded SHA-256."""
    store.fetch(key, path)
    sha, size = file_digest(path)
    if expected is not None and sha != expected:
        raise RuntimeError(f"{what} does not match its recorded SHA-256")
    return sha, size


class RetryingStore:
    """The artifact store with each operation retried on infrastructure errors (faults.retry) for `budget_s`."""

    def __init__(self, store: ArtifactStore, budget_s: float, what: str):
        self.store, self.budget_s, self.what = store, budget_s, what

    def put(self, key: str, src: Path) -> tuple[str, int]:
        return faults.retry(lambda: self.store.put(key, src), f"{self.what}: storing {key}", self.budget_s)

    def fetch(self, key: str, dst: Path) -> None:
        return faults.retry(lambda: self.store.fetch(key, dst), f"{self.what}: fetching {key}", self.budget_s)

    def exists(self, key: str) -> bool:
        return faults.retry(lambda: self.store.exists(key), f"{self.what}: looking up {key}", self.budget_s)

    def stream(self, key: str):
        return self.store.stream(key)

    def delete_prefix(self, prefix: str) -> None:
        return faults.retry(lambda: self.store.delete_prefix(prefix), f"{self.what}: deleting {prefix}", self.budget_s)


class ArtifactStages:
    """A StageStore over the artifact store. Earlier stages must exist (and match their recorded
    SHA-256); the current stage's output may exist already if a worker died after writing it.
    Each output carries the seconds its work took (since this store was made) in its metadata, so
    an attempt that finds it stored can record the real time, not its own."""

    def __init__(self, store: RetryingStore, job_id: uuid.UUID, inputs_digest: str, stage: str,
                 recorded: dict[str, str], tmp: Path):
        self.store, self.job_id, self.digest, self.stage, self.recorded, self.tmp = store, job_id, inputs_digest, stage, recorded, tmp
        self.saved: dict[str, tuple[str, str, int]] = {}
        self.found_current = False
        self.work_seconds: float | None = None  # of the current stage: measured here, or read from a stored output
        self.started = time.perf_counter()
        self.current_notes: dict[str, Any] = {}  # written with the current stage's output (its batch halvings)
        self.found_notes: dict[str, dict[str, Any]] = {}  # read from each stage's stored output

    def load(self, stage: str) -> Any | None:
        """The stored output of `stage`, or None for the current stage when it is not there yet."""
        key = stage_key(self.job_id, self.digest, stage)
        earlier = STAGES.index(stage) < STAGES.index(self.stage)
        if not self.store.exists(key):
            if earlier:
                raise RuntimeError(f"the output of stage {stage} is missing from the artifact store")
            return None
        path = self.tmp / f"{stage}.safetensors"
        expected = self.recorded.get(f"stage.{stage}", "") if earlier else None  # an earlier stage must have been recorded
        sha, size = fetch_checked(self.store, key, path, expected, f"the output of stage {stage}")
        self.found_notes[stage] = checkpoints.notes(path)
        if stage == self.stage:
            self.found_current = True
            self.saved[stage] = (key, sha, size)
            self.work_seconds = checkpoints.work_seconds(path)
        return checkpoints.load(path)

    def notes(self, stage: str) -> dict[str, Any]:
        """The notes stored with a stage's output that this store loaded or saved."""
        return self.found_notes.get(stage, {})

    def save(self, stage: str, value: Any, notes: dict[str, Any] | None = None) -> None:
        """Store a stage's output (only the current stage is ever computed here) with its notes and this store's
        (its batch halvings)."""
        if stage != self.stage:
            raise RuntimeError(f"stage {stage} would be computed while running {self.stage}")
        path = self.tmp / f"{stage}.safetensors"
        key = stage_key(self.job_id, self.digest, stage)
        if self.store.exists(key):  # a worker that took this stage over wrote it first: its copy stands
            self.saved[stage] = (key, *fetch_checked(self.store, key, path, None, f"the output of stage {stage}"))
            self.work_seconds = checkpoints.work_seconds(path)
            self.found_notes[stage] = checkpoints.notes(path)
        else:
            self.work_seconds = time.perf_counter() - self.started
            self.found_notes[stage] = {**self.current_notes, **(notes or {})}
            checkpoints.save(value, path, seconds=self.work_seconds, notes=self.found_notes[stage])
            self.saved[stage] = (key, *self.store.put(key, path))


class Reporter:
    """The method's progress callback: writes progress and the heartbeat (throttled) and stops
    the stage between batches when the job is canceled or taken over."""

    def __init__(self, ctx: Context, job_id: uuid.UUID, stage: str):
        self.ctx, self.job_id, self.stage = ctx, job_id, stage
        self.last = 0.0
        self.failing = False  # one log line when writes start failing, one when they work again
        self.pause_until = 0.0  # after a failure, batches go on without trying for a while (a connect can take seconds)

    def __call__(self, stage: str, fraction: float, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if stage != self.stage or now < self.pause_until or (now - self.last < self.ctx.settings.progress_every_s and fraction < 1.0):
            return
        self.last = now
        try:
            with self.ctx.db.session() as s:
                stop = service.record_progress(s, self.job_id, self.stage, self.ctx.worker_id, min(fraction, 1.0), metrics)
        except Exception as e:  # the database's trouble must not stop the work: the next batch writes progress again
            if faults.classify(e) is None:
                raise
            if not self.failing:
                log.warning("job %s: progress not written until the database answers (%s)", self.job_id, faults.describe(e))
            self.failing, self.pause_until = True, time.monotonic() + 5.0
            return
        if self.failing:
            log.warning("job %s: progress written again", self.job_id)
            self.failing = False
        if stop:
            raise Stopped()


class Heartbeat(threading.Thread):
    """Beats while a stage runs, also through long stretches without batches."""

    def __init__(self, ctx: Context, job_id: uuid.UUID, stage: str):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.ctx, self.job_id, self.stage = ctx, job_id, stage
        self.done = threading.Event()

    def run(self) -> None:
        every = self.ctx.settings.heartbeat_s
        wait, failing = every, False
        while not self.done.wait(wait):
            try:
                with self.ctx.db.session() as s:
                    service.heartbeat(s, self.job_id, self.stage, self.ctx.worker_id)
                wait, failing = every, False
            except Exception as e:  # a missed beat is not fatal: the next comes sooner, so the stage is not taken as stale
                wait = min(every, 1.0)
                if faults.classify(e) is None:
                    log.exception("heartbeat of job %s failed", self.job_id)
                elif not failing:
                    log.warning("heartbeat of job %s failed (%s); trying every %g s", self.job_id, faults.describe(e), wait)
                failing = True


def _inputs(ctx: Context, store: RetryingStore, job: Any, arts: dict[str, Any],
            tmp: Path) -> tuple[Any, ModelSpec, Any, Any, Any, LadderConfig]:
    spec = ModelSpec.model_validate(job.spec)
    config = LadderConfig.model_validate(job.config)
    loaded = {}
    for part in ("model", "train_data", "test_data", "validation_data"):
        art = arts.get(f"input.{part}")
        if art is not None:
            loaded[part] = tmp / Path(art.key).name
            fetch_checked(store, art.key, loaded[part], art.sha256, f"the uploaded {part}")
    fmt = job.inputs
    # on LADDER_DEVICE: every stage follows the model's device (resolved here, in the stage's own process: the Celery
    # parent that forks it never initialises CUDA)
    model = load_model(loaded["model"], fmt["model"]["format"], spec, Limits.from_settings(ctx.settings))
    model = model.to(devices.resolve(ctx.settings.device))
    placement.set_share(ctx.settings.gpu_data_share)
    train = load_data(loaded["train_data"], fmt["train_data"]["format"], spec, "train_data")
    test = load_data(loaded["test_data"], fmt["test_data"]["format"], spec, "test_data") if "test_data" in loaded else None
    train, test = split_inputs(train, test, config, spec.num_classes)
    val = (load_data(loaded["validation_data"], fmt["validation_data"]["format"], spec, "validation_data")
           if "validation_data" in loaded else None)
    return model, spec, train, test, val, config


def _results(ctx: Context, store: RetryingStore, stages: "ArtifactStages", job: Any, run: Run, tmp: Path,
             done: dict[str, tuple[float | None, float | None]]) -> tuple[dict, dict]:
    """The report and the stored results: hardened (LADDER) weights, the other models, the report's page.
    `done`: (work seconds, reuse seconds) of each finished stage."""
    artifacts = {}
    for name, model in run.models().items():
        if name == "vanilla":
            continue
        path = tmp / f"{name}.safetensors"
        save_file(net_weights(model), str(path), metadata={"ladder.model": name, "ladder.job": str(job.id)})
        key = f"jobs/{job.id}/results/{name}.safetensors"
        artifacts["model" if name == "ladder" else f"model.{name}"] = (key, *store.put(key, path))
    work = {k: w for k, (w, _) in done.items() if w is not None}  # a done stage has its seconds
    reused = {k: r for k, (_, r) in done.items() if r is not None}
    report = build_report(run, work, reused, environment(run.device))
    notes = {**stages.found_notes, "report": stages.current_notes}  # the earlier stages' outputs, and this stage's own
    report["memory_backoff"] = {s: n["batch_halvings"] for s, n in notes.items() if n.get("batch_halvings")}
    html = page(report, lambda: gallery(run))
    if html is not None:  # a page that failed to render is logged; the job keeps its weights and report
        path = tmp / "report.html"
        path.write_text(html, encoding="utf-8")
        key = f"jobs/{job.id}/results/report.html"
        artifacts["report.html"] = (key, *store.put(key, path))
    return report, artifacts


def _transact(ctx: Context, what: str, fn: Callable[[Session], T], budget_s: float = math.inf) -> T:
    """`fn` in one transaction, the whole transaction retried on database errors (faults.retry) for `budget_s`
    (default: until the database answers): each caller's `fn` can run twice (a commit whose answer was lost),
    and service.py's steps allow it."""
    def once() -> T:
        with ctx.db.session() as s:
            return fn(s)

    return faults.retry(once, what, budget_s, cap_s=5.0)


def run_stage(ctx: Context, job_id: uuid.UUID, stage: str) -> Claim:
    """Claim and run one stage of a job; what the claim decided. faults.Unavailable (the database or
    the broker stayed away) means: hand the stage back to the queue."""
    me, budget = ctx.worker_id, ctx.settings.infra_retry_s
    what = f"job {job_id}: {stage}"

    def take(s: Session) -> tuple[Claim, Any, dict, dict]:
        outcome = service.claim(s, job_id, stage, me, ctx.settings.stale_after_s, ctx.settings.max_attempts, ctx.store)
        if outcome is not Claim.RUN:
            return outcome, None, {}, {}
        job = repository.get(s, job_id)
        assert job is not None  # claimed just now
        done = {r.stage: (r.seconds, r.reused_seconds) for r in job.stages if r.status == "done"}
        return outcome, job, {a.name: a for a in repository.artifacts(s, job_id)}, done

    outcome, job, arts, done = _transact(ctx, f"{what}: claim", take, budget)
    if outcome is not Claim.RUN:
        return outcome
    log.info("job %s: %s (attempt %d)", job_id, stage, job.attempt)
    store = RetryingStore(ctx.store, budget, what)
    beat = Heartbeat(ctx, job_id, stage)
    beat.start()
    started = time.perf_counter()
    try:
        with scratch.directory("stage") as tmp_dir:  # named after this process: the sweeper removes it if the process dies
            tmp = Path(tmp_dir)
            model, spec, train, test, val, config = _inputs(ctx, store, job, arts, tmp)
            log.info("job %s: %s computes on %s", job_id, stage, device_of(model))  # where the model is, not the setting
            reporter = Reporter(ctx, job_id, stage)
            stages = ArtifactStages(store, job_id, job.inputs_digest, stage, {k: a.sha256 for k, a in arts.items()}, tmp)
            def attempt(cfg: LadderConfig) -> Any:
                run = Run(model, spec, train, test, cfg, stages, reporter, val)
                if stage == "report":
                    return _results(ctx, store, stages, job, run, tmp, done)
                return run.output(stage)

            def halve(changed: dict[str, int]) -> None:  # kept with the stage's output, shown in the report
                stages.current_notes.setdefault("batch_halvings", []).append(changed)

            outcome = backoff.with_backoff(attempt, config, stage, device_of(model), halve)
            report, computed = None, True
            if stage == "report":
                report, artifacts = outcome
            else:
                computed = not stages.found_current
                artifacts = {f"stage.{stage}": stages.saved[stage]}
        elapsed = time.perf_counter() - started
        seconds = elapsed if stage == "report" or computed else stages.work_seconds
        reused = None if computed else elapsed
        _transact(ctx, f"{what}: recording its end", lambda s: service.complete_stage(
            s, job_id, stage, me, seconds, computed, artifacts, ctx.dispatcher, ctx.store, report, reused))
    except Stopped:
        def stopped(s: Session) -> None:
            job = repository.get(s, job_id)
            if job is not None and job.cancel_requested:
                service.stop(s, job_id, stage, me, "canceled", ctx.store)

        _transact(ctx, f"{what}: stopping", stopped)
        log.info("job %s: %s stopped", job_id, stage)
    except (InputError, backoff.OutOfMemory) as e:
        code, message = ("invalid_input" if isinstance(e, InputError) else "out_of_memory"), str(e)
        if code == "out_of_memory":
            log.error("job %s: %s", job_id, message)
        _transact(ctx, f"{what}: failing it", lambda s: service.stop(s, job_id, stage, me, "failed", ctx.store, code, message))
    except Exception as e:
        fault = faults.classify(e)
        if fault in (faults.DATABASE, faults.BROKER):  # raised by the method's own code, outside every retry
            raise faults.Unavailable(fault, str(e)) from e  # the stage goes back to the queue; its stored work stays
        if fault is None:
            log.exception("job %s: stage %s failed", job_id, stage)
            failure, message = "internal_error", (f"stage {stage} failed ({type(e).__name__}); "
                                                  "the operators have the traceback in the worker log")
        else:  # the store: the job fails, its finished stages stay for `ladder jobs resume` once the store is back
            failure = fault
            log.error("job %s: stage %s failed: %s", job_id, stage, e)  # the details (paths, endpoints) stay in the log
            message = (f"stage {stage} stopped: {faults.WHAT[fault]}; the stages finished before it are kept, and once "
                       f"the store is fixed an operator resumes the job with `ladder jobs resume {job_id}`")
        _transact(ctx, f"{what}: failing it", lambda s: service.stop(s, job_id, stage, me, "failed", ctx.store, failure, message))
    finally:
        beat.done.set()
    return Claim.RUN
