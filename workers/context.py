"""What a worker or the API needs, built once per process from the settings."""

import os
import secrets
import socket
from dataclasses import dataclass, field
from functools import lru_cache

from services.artifacts import ArtifactStore, open_store
from services.db import Database
from services.jobs.service import Dispatcher
from services.settings import Settings, get_settings


@dataclass
class Context:
    """Settings, database, artifact store and the dispatcher that sends stages to workers."""

    settings: Settings
    db: Database
    store: ArtifactStore
    dispatcher: Dispatcher | None = None
    # with a random part: a restarted container has the same hostname and pids, and must not pass for the dead holder
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")


def build(settings: Settings, dispatcher: Dispatcher | None = None) -> Context:
    """A context for these settings."""
    store = open_store(settings.artifacts, settings.s3_endpoint_url, settings.s3_region,
                       settings.s3_access_key_id, settings.s3_secret_access_key, min_free_bytes=settings.store_min_free_bytes)
    return Context(settings, Database(settings.database, settings.db_pool_size), store, dispatcher)


@lru_cache
def celery_context() -> Context:
    """The context of a Celery worker process (its dispatcher sends the next stage through Celery)."""
    from workers.celery_app import CeleryDispatcher, app

    settings = get_settings()
    return build(settings, CeleryDispatcher(app, patience_s=settings.infra_retry_s))
