"""The reconciler: a thread in each API process that, every few seconds, sends again the stages whose
worker died (stale heartbeat), whose message the broker lost (requeue window) or whose message was never
sent (enqueue_pending: the broker was down), and now and then sweeps what crashed processes left behind."""

import logging
import threading
import time

from services import faults
from services.context import Context
from services.jobs import service
from services.sweeper import Sweeper

log = logging.getLogger(__name__)


class Reconciler(threading.Thread):
    """Runs `service.reconcile` every LADDER_RECONCILE_EVERY_S. After a database outage it takes no stage over
    for LADDER_STALE_AFTER_S: the workers' heartbeats could not be written either, and they resume with the
    database; a stage whose worker is really gone is taken over once that grace has passed."""

    def __init__(self, ctx: Context):
        super().__init__(daemon=True, name="ladder-reconciler")
        self.ctx, self.done = ctx, threading.Event()
        self.outage = False  # the last pass could not reach the database
        self.hold_until = 0.0  # monotonic time until which no stale stage is taken over
        self.sweeper = Sweeper(ctx.db, ctx.store, ctx.settings.sweep_grace_s)

    def run(self) -> None:
        while not self.done.wait(self.ctx.settings.reconcile_every_s):
            self.once()
            self.sweeper()  # its own, slower pace (services/sweeper.py)

    def once(self) -> list:
        """One pass; what it sent again."""
        s = self.ctx.settings
        now = time.monotonic()
        stale = s.stale_after_s if now >= self.hold_until else None
        try:
            with self.ctx.db.session() as session:
                sent = service.reconcile(session, stale, s.requeue_after_s, self.ctx.dispatcher, s.enqueue_retry_after_s)
        except Exception as e:
            if faults.classify(e) != faults.DATABASE:
                log.exception("reconciler pass failed")
                return []
            if not self.outage:
                log.warning("reconciler: %s (%s); stages are taken over again %g s after it returns",
                            faults.WHAT[faults.DATABASE], faults.describe(e), s.stale_after_s)
            self.outage = True
            return []
        if self.outage:
            self.outage, self.hold_until = False, now + s.stale_after_s
            log.warning("reconciler: the database is back; no stage is taken over for %g s", s.stale_after_s)
        for job_id, stage in sent:
            log.warning("reconciler: job %s sent again at %s", job_id, stage)
        return sent
