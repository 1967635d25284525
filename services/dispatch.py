"""How a job's next stage reaches a worker: a Celery task on the Redis broker, or the embedded worker's in-memory
queue. The API sends a job's first stage (and the reconciler's resends); a worker sends the next one."""

import queue
import uuid

from celery import Celery
from kombu import Queue

from services import faults
from services.settings import Settings


def task_name(stage: str) -> str:
    """The Celery task of a stage."""
    return f"ladder.{stage}"


def celery(settings: Settings) -> Celery:
    """A Celery app on the settings' broker, enough to send stages; workers/celery_app.py adds what running them needs."""
    app = Celery("ladder", broker=settings.broker_url or "memory://")
    app.conf.update(
        task_ignore_result=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(settings.queue)],
        task_default_queue=settings.queue,
    )
    return app


class CeleryDispatcher:
    """Sends a job's stage to the Celery queue, trying an unreachable broker again for `patience_s` (a worker
    waits for it: the next stage is its job; the API does not: a request must not hang, the reconciler resends)."""

    def __init__(self, app: Celery, queue_name: str, patience_s: float = 0.0):
        self.app, self.queue_name, self.patience_s = app, queue_name, patience_s

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        """Send the stage's task (call only after the database commit)."""
        def send() -> None:
            self.app.send_task(task_name(stage), args=[str(job_id)], queue=self.queue_name)

        if self.patience_s > 0:
            faults.retry(send, f"job {job_id}: sending {stage}", self.patience_s, cap_s=2.0)
        else:
            send()  # kombu's own publish retries (about a second), then the caller logs it once


class LocalQueue:
    """The embedded worker's queue (workers/embedded.py): stages in the order sent, and None to stop it."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[uuid.UUID, str] | None] = queue.Queue()

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        """Queue a stage."""
        self.items.put((job_id, stage))

    def close(self) -> None:
        """Let the worker finish its current stage, then end."""
        self.items.put(None)

    def get(self) -> tuple[uuid.UUID, str] | None:
        """The next stage, waiting for one; None once closed."""
        return self.items.get()
