"""Every setting of the service in one object, read from `LADDER_*` environment variables (or .env).

With nothing set, the service runs embedded: SQLite and a local artifact directory under
`LADDER_DATA_DIR`, and an in-process worker instead of Celery. Set `LADDER_DATABASE_URL` and
`LADDER_BROKER_URL` (and, for several machines, `LADDER_ARTIFACTS_URL=s3://bucket/prefix`) to run
the API and Celery workers against PostgreSQL, Redis and a shared store.
"""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1 << 20


class Settings(BaseSettings):
    """The service's configuration (environment variables `LADDER_<FIELD>`)."""

    model_config = SettingsConfigDict(env_prefix="LADDER_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="development or production; production refuses unsafe defaults")
    data_dir: Path = Field(Path("ladder-data"), description="embedded database and local artifacts live here")
    database_url: str | None = Field(None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://host:6379/0; default: an in-process worker")
    artifacts_url: str | None = Field(None, description="file:///path or s3://bucket/prefix; default: data_dir/artifacts")
    s3_endpoint_url: str | None = Field(None, description="for S3-compatible stores (MinIO, …)")
    s3_region: str = "us-east-1"

    db_pool_size: int = Field(40, description="database connections per process (the API's threadpool has 40 threads)")

    host: str = "127.0.0.1"
    port: int = 8000

    # uploads (bytes): every cap is checked while the bytes arrive, before anything is stored
    max_request_bytes: int = 2048 * MB
    max_model_bytes: int = 1024 * MB
    max_data_bytes: int = 1536 * MB
    max_json_bytes: int = 64 * 1024
    max_unzipped_bytes: int = 4096 * MB
    max_zip_ratio: int = 200
    max_zip_members: int = 100_000  # zipfile keeps ~0.5 kB per member in memory
    pt2_load_timeout_s: int = 120
    pt2_load_memory_bytes: int = 8192 * MB

    # workers
    queue: str = "ladder"
    visibility_timeout_s: int = 6 * 3600  # longer than the longest stage, or Redis redelivers a running task
    heartbeat_s: float = 10.0
    stale_after_s: float = 60.0  # a running job whose heartbeat is older is taken over
    requeue_after_s: float = 900.0  # a queued job no worker took within this is enqueued again
    reconcile_every_s: float = 30.0
    max_attempts: int = 3  # per stage; a stage that loses its worker this often fails the job
    progress_every_s: float = 1.0
    api_key_cache_s: float = 30.0  # a revoked key may still work this long on a running API

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.environment == "production" and (not self.database_url or self.database_url.startswith("sqlite")):
            raise ValueError("production needs LADDER_DATABASE_URL pointing at PostgreSQL")
        if self.broker_url and (not self.database_url or self.database_url.startswith("sqlite")):
            raise ValueError("with LADDER_BROKER_URL set, API and workers share jobs through LADDER_DATABASE_URL: point it at PostgreSQL")
        return self

    @property
    def embedded(self) -> bool:
        """True when no broker is set: jobs run in an in-process worker."""
        return not self.broker_url

    @property
    def database(self) -> str:
        """The database URL, SQLite under data_dir by default."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'ladder.db').resolve()}"

    @property
    def artifacts(self) -> str:
        """The artifact store URL, a local directory under data_dir by default."""
        return self.artifacts_url or (self.data_dir / "artifacts").resolve().as_uri()


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
