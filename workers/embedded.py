"""The embedded worker: a thread in the API process that runs stages from an in-memory queue,
through the same `run_stage` as Celery workers. For a first run and demos (one job at a time)."""

import logging
import threading
import time

from services import faults
from services.context import Context
from services.dispatch import LocalQueue
from workers.runner import run_stage

log = logging.getLogger(__name__)


class EmbeddedWorker(threading.Thread):
    """Runs the stages of `queue` (the context's dispatcher) one after another."""

    def __init__(self, ctx: Context, queue: LocalQueue):
        super().__init__(daemon=True, name="ladder-embedded-worker")
        self.ctx, self.queue = ctx, queue

    def stop(self) -> None:
        """Finish the current stage, then end."""
        self.queue.close()

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                run_stage(self.ctx, *item)
            except faults.Unavailable as e:  # the database stayed away: the stage waits its turn again
                log.warning("embedded worker: %s of job %s handed back: %s", item[1], item[0], e)
                time.sleep(self.ctx.settings.reconcile_every_s)
                self.queue.enqueue(*item)
            except Exception:
                log.exception("embedded worker: %s of job %s", item[1], item[0])
