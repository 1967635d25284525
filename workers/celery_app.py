"""The Celery app: Redis broker, one task per stage, the settings long GPU jobs need (service.md).

Progress and results live in the database, not in a result backend. A task is acknowledged only
after it returns (acks_late); if its process dies, the message goes back to the queue
(reject_on_worker_lost) and the job's attempt counter keeps a poisonous stage from looping. A
stage that the database or the broker kept from running or recording is rejected back to the
queue (faults.Unavailable), never failed.
"""

import logging
import uuid

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_ready
from celery.worker.consumer import Consumer
from celery.worker.state import maybe_shutdown
from kombu import Queue

from services import faults, scratch
from services.jobs.models import STAGES
from services.settings import get_settings
from workers.context import celery_context
from workers.runner import run_stage  # imported once in the parent: a stage's fresh child inherits the method, no import of its own

log = logging.getLogger(__name__)

settings = get_settings()
app = Celery("ladder", broker=settings.broker_url or "memory://")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=1,  # a fresh process per stage: GPU memory and any leak go with it
    worker_concurrency=1,
    worker_pool="prefork",
    task_ignore_result=True,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a worker outlives any broker outage (Celery's default gives up after ~100 tries)
    worker_cancel_long_running_tasks_on_connection_loss=False,  # a stage keeps running through one (Celery 6 flips this)
    task_queues=[Queue(settings.queue)],
    task_default_queue=settings.queue,
    worker_hijack_root_logger=False,
    worker_consumer="workers.celery_app:PromptConsumer",
)


class PromptConsumer(Consumer):
    """Celery's consumer, trying a lost broker again every 2 s at most (Celery's own waits grow to 30 s), so
    stages flow again within seconds of Redis' return."""

    def ensure_connected(self, conn):
        def errback(exc, interval):
            log.warning("broker %s unreachable (%s); trying again in %.1f s", conn.as_uri(), faults.describe(exc), interval)

        conn = conn.ensure_connection(errback, self.app.conf.broker_connection_max_retries, interval_start=0.5,
                                      interval_step=0.5, interval_max=2.0, callback=maybe_shutdown)
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        return conn


@worker_ready.connect
def _sweep_scratch(**_) -> None:
    """The temp folders of this machine's dead stage processes (the API's reconciler sweeps only its own machine's)."""
    scratch.sweep_scratch(settings.sweep_grace_s)


class CeleryDispatcher:
    """Sends a job's stage to the Celery queue, trying an unreachable broker again for `patience_s` (a worker
    waits for it: the next stage is its job; the API does not: a request must not hang, the reconciler resends)."""

    def __init__(self, celery: Celery, patience_s: float = 0.0):
        self.celery, self.patience_s = celery, patience_s

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        """Send the stage's task (call only after the database commit)."""
        def send() -> None:
            self.celery.send_task(task_name(stage), args=[str(job_id)], queue=settings.queue)

        if self.patience_s > 0:
            faults.retry(send, f"job {job_id}: sending {stage}", self.patience_s, cap_s=2.0)
        else:
            send()  # kombu's own publish retries (about a second), then the caller logs it once


def task_name(stage: str) -> str:
    """The Celery task of a stage."""
    return f"ladder.{stage}"


def _stage_task(stage: str):
    @app.task(name=task_name(stage))
    def run(job_id: str) -> str:
        # BUSY (another worker's heartbeat is fresh) is dropped too: if that worker dies, the
        # reconciler enqueues the stage again once its heartbeat is stale
        try:
            return run_stage(celery_context(), uuid.UUID(job_id), stage).value
        except faults.Unavailable as e:
            log.warning("job %s: %s handed back to the queue: %s", job_id, stage, e)
            raise Reject(str(e), requeue=True) from e

    run.__doc__ = f"Run the {stage} stage of a job."
    return run


tasks = {stage: _stage_task(stage) for stage in STAGES}
