"""What the API and a worker need, built once per process from the settings: the one place the service is wired.

The dispatcher is passed in (services/dispatch.py): the API and the workers choose it, the context only holds it.
"""

import os
import secrets
import socket
from dataclasses import dataclass, field

from services.artifacts import ArtifactStore, open_store
from services.db import Database
from services.jobs.service import Dispatcher
from services.settings import Settings


@dataclass(frozen=True)
class Context:
    """Settings, database, artifact store and the dispatcher that sends stages to workers."""

    settings: Settings
    db: Database
    store: ArtifactStore
    dispatcher: Dispatcher
    # with a random part: a restarted container has the same hostname and pids, and must not pass for the dead holder
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")


def open_artifacts(settings: Settings) -> ArtifactStore:
    """The artifact store these settings name."""
    return open_store(settings.artifacts, settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id,
                      settings.s3_secret_access_key, min_free_bytes=settings.store_min_free_bytes)


def build(settings: Settings, dispatcher: Dispatcher) -> Context:
    """A context for these settings, sending stages through `dispatcher`."""
    return Context(settings, Database(settings.database, settings.db_pool_size), open_artifacts(settings), dispatcher)
