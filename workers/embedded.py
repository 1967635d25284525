"""The embedded worker: a thread in the API process that runs stages from an in-memory queue,
through the same `run_stage` as Celery workers. For a first run and demos (one job at a time)."""

import logging
import queue
import threading
import time
import uuid

from services import faults
from workers.context import Context
from workers.runner import run_stage

log = logging.getLogger(__name__)


class EmbeddedWorker(threading.Thread):
    """Runs queued stages one after another; also the dispatcher that queues them."""

    def __init__(self, ctx: Context):
        super().__init__(daemon=True, name="ladder-embedded-worker")
        self.ctx = ctx
        self.queue: queue.Queue[tuple[uuid.UUID, str] | None] = queue.Queue()
        ctx.dispatcher = self

    def enqueue(self, job_id: uuid.UUID, stage: str) -> None:
        """Queue a stage."""
        self.queue.put((job_id, stage))

    def stop(self) -> None:
        """Finish the current stage, then end."""
        self.queue.put(None)

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                run_stage(self.ctx, *item)
            except faults.Unavailable as e:  # the database stayed away: the stage waits its turn again
                log.warning("embedded worker: %s of job %s handed back: %s", item[1], item[0], e)
                time.sleep(self.ctx.settings.reconcile_every_s)
                self.queue.put(item)
            except Exception:
                log.exception("embedded worker: %s of job %s", item[1], item[0])
