"""Removes what crashes leave behind and nothing else: stored job folders whose job row does not exist (an API
killed between storing an upload and committing its job, a job row deleted by hand), temporary files of
interrupted writes to the store, and temp folders of dead processes. Everything must be older than a grace
period first: an upload stores its files before its row commits, so a young folder may still get its row.
A folder of a job that exists is never touched here, whatever its status (a failed job keeps its stage
outputs so an operator can resume it). The API's reconciler runs it (`Sweeper`); a pass is idempotent, so
several API processes may run it at once."""

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from services import scratch
from services.artifacts import JOBS, ArtifactStore
from services.db import Database
from services.faults import WHAT, classify, describe
from services.jobs.models import Job
from services.scratch import age_text

log = logging.getLogger(__name__)
BATCH = 500  # job ids per database query


@dataclass
class Swept:
    """What one pass removed."""

    orphans: list[str] = field(default_factory=list)  # job ids whose folder (jobs/<id>/) went
    partials: list[str] = field(default_factory=list)  # interrupted writes to the store
    scratch: list[str] = field(default_factory=list)  # temp folders of dead processes

    def __bool__(self) -> bool:
        return bool(self.orphans or self.partials or self.scratch)


def sweep(db: Database, store: ArtifactStore, grace_s: float, *, now: float | None = None,
          tmp_root: Path | None = None) -> Swept:
    """One pass: remove job folders with no job row, interrupted writes and dead processes' temp folders, each
    once nothing under it was written for `grace_s` (`now`: epoch seconds; `tmp_root`: default the temp dir)."""
    now = time.time() if now is None else now
    swept = Swept()
    old = {}  # job id → newest mtime under its folder
    for name, newest in store.job_prefixes():
        try:
            job_id = uuid.UUID(name)
        except ValueError:  # the service names folders by job id only: not ours to judge
            continue
        if now - newest >= grace_s and str(job_id) == name:
            old[job_id] = newest
    ids = list(old)
    for i in range(0, len(ids), BATCH):
        batch = ids[i:i + BATCH]
        with db.reading() as s:
            known = set(s.scalars(select(Job.id).where(Job.id.in_(batch))))
        for job_id in batch:
            if job_id in known:
                continue
            store.delete_prefix(f"{JOBS}/{job_id}")
            log.warning("sweeper: removed %s/%s/ (no such job; last written %s ago)", JOBS, job_id, age_text(now - old[job_id]))
            swept.orphans.append(str(job_id))
    for what, mtime in store.remove_partials(now - grace_s):
        log.warning("sweeper: removed %s (an interrupted write, %s old)", what, age_text(now - mtime))
        swept.partials.append(what)
    swept.scratch = [path for path, _ in scratch.sweep_scratch(grace_s, root=tmp_root, now=now)]
    return swept


def every_s(grace_s: float) -> float:
    """How often the reconciler sweeps: a quarter of the grace period, between 1 s and 5 minutes (a pass lists
    the whole store, so not every few seconds; the first pass runs at once, to clean up after a crash)."""
    return min(max(grace_s / 4, 1.0), 300.0)


class Sweeper:
    """`sweep` for a loop that calls it often (the reconciler): runs a pass when one is due, never raises."""

    def __init__(self, db: Database, store: ArtifactStore, grace_s: float, interval_s: float | None = None,
                 tmp_root: Path | None = None):
        self.db, self.store, self.grace_s, self.tmp_root = db, store, grace_s, tmp_root
        self.interval_s = every_s(grace_s) if interval_s is None else interval_s
        self.next_at = 0.0

    def __call__(self) -> Swept | None:
        """A pass if one is due (None if not, or if it failed: a store or database outage is one warning line)."""
        at = time.monotonic()
        if at < self.next_at:
            return None
        self.next_at = at + self.interval_s
        try:
            return sweep(self.db, self.store, self.grace_s, tmp_root=self.tmp_root)
        except Exception as e:
            code = classify(e)
            if code is None:
                log.exception("sweeper pass failed")
            else:
                log.warning("sweeper pass skipped: %s (%s); next in %g s", WHAT[code], describe(e), self.interval_s)
            return None
