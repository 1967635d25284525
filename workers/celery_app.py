"""The Celery app: Redis broker, one task per stage, the settings long GPU jobs need (service.md).

Progress and results live in the database, not in a result backend. A task is acknowledged only
after it returns (acks_late); if its process dies, the message goes back to the queue
(reject_on_worker_lost) and the job's attempt counter keeps a poisonous stage from looping.
"""

import uuid

from celery import Celery
from kombu import Queue

from services.jobs.models import STAGES
from services.settings import get_settings

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
    task_queues=[Queue(settings.queue)],
    task_default_queue=settings.queue,
    worker_hijack_root_logger=False,
)


class CeleryDispatcher:
    """Sends a job's stage to the Celery queue."""

    def __init__(self, celery: Celery):
        self.celery = celery

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        """Send the stage's task (call only after the database commit)."""
        self.celery.send_task(task_name(stage), args=[str(job_id)], queue=settings.queue)


def task_name(stage: str) -> str:
    """The Celery task of a stage."""
    return f"ladder.{stage}"


def _stage_task(stage: str):
    @app.task(name=task_name(stage))
    def run(job_id: str) -> str:
        from workers.context import celery_context
        from workers.runner import run_stage

        # BUSY (another worker's heartbeat is fresh) is dropped too: if that worker dies, the
        # reconciler enqueues the stage again once its heartbeat is stale
        return run_stage(celery_context(), uuid.UUID(job_id), stage).value

    run.__doc__ = f"Run the {stage} stage of a job."
    return run


tasks = {stage: _stage_task(stage) for stage in STAGES}
