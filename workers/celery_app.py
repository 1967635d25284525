"""The Celery worker app: Redis broker, one task per stage, the settings long GPU jobs need (service.md).

Progress and results live in the database, not in a result backend. A task is acknowledged only
after it returns (acks_late); if its process dies, the message goes back to the queue
(reject_on_worker_lost) and the job's attempt counter keeps a poisonous stage from looping. A
stage that the database or the broker kept from running or recording is rejected back to the
queue (faults.Unavailable), never failed.
"""

import logging
import uuid
from functools import lru_cache

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_ready
from celery.worker.consumer import Consumer
from celery.worker.state import maybe_shutdown

from services import dispatch, faults, scratch
from services.context import Context, build
from services.jobs.models import STAGES
from services.settings import Settings
from workers.runner import run_stage  # imported once in the parent: a stage's fresh child inherits the method, no import of its own

log = logging.getLogger(__name__)


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


def create_app(settings: Settings) -> Celery:
    """The worker's Celery app for these settings, with a task per stage. Each stage's process builds its context
    (database, store, a dispatcher that sends the next stage) the first time it runs one: after the fork."""
    app = dispatch.celery(settings)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,  # a fresh process per stage: GPU memory and any leak go with it
        worker_concurrency=1,
        worker_pool="prefork",
        broker_connection_max_retries=None,  # a worker outlives any broker outage (Celery's default gives up after ~100 tries)
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a stage keeps running through one (Celery 6 flips this)
        worker_hijack_root_logger=False,
        worker_consumer=f"{__name__}:PromptConsumer",
    )

    @lru_cache(maxsize=1)
    def context() -> Context:
        return build(settings, dispatch.CeleryDispatcher(app, settings.queue, patience_s=settings.infra_retry_s))

    def sweep_scratch(**_) -> None:
        """The temp folders of this machine's dead stage processes (the API's reconciler sweeps only its own machine's)."""
        scratch.sweep_scratch(settings.sweep_grace_s)

    worker_ready.connect(sweep_scratch, weak=False)
    for stage in STAGES:
        _stage_task(app, stage, context)
    return app


def _stage_task(app: Celery, stage: str, context):
    @app.task(name=dispatch.task_name(stage))
    def run(job_id: str) -> str:
        # BUSY (another worker's heartbeat is fresh) is dropped too: if that worker dies, the
        # reconciler enqueues the stage again once its heartbeat is stale
        try:
            return run_stage(context(), uuid.UUID(job_id), stage).value
        except faults.Unavailable as e:
            log.warning("job %s: %s handed back to the queue: %s", job_id, stage, e)
            raise Reject(str(e), requeue=True) from e

    run.__doc__ = f"Run the {stage} stage of a job."
    return run
