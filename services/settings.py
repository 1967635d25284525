"""Every setting of the service in one object, read from `LADDER_*` environment variables (or .env).

With nothing set, the service runs embedded: SQLite and a local artifact directory under
`LADDER_DATA_DIR`, and an in-process worker instead of Celery. Set `LADDER_DATABASE_URL` and
`LADDER_BROKER_URL` (and, for several machines, `LADDER_ARTIFACTS_URL=s3://bucket/prefix`) to run
the API and Celery workers against PostgreSQL, Redis and a shared store. Secrets can come from
files instead (`LADDER_DATABASE_URL_FILE=/run/secrets/...`), and `LADDER_ENVIRONMENT=production`
refuses the embedded defaults and default passwords.
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1 << 20

# Secrets from LADDER_<NAME>_FILE, not secrets_dir: each variable names its file, and a missing file is an error, not skipped.
SECRET_FIELDS = ("database_url", "broker_url", "s3_access_key_id", "s3_secret_access_key")
# Refused in production (any case), as is any password shorter than 8 characters: defaults of the images and of older compose files.
WEAK_PASSWORDS = frozenset({"", "ladder", "postgres", "minioadmin", "password", "guest", "redis", "admin", "root", "secret",
                            "changeme", "ladder-minio-secret"})


class Settings(BaseSettings):
    """The service's configuration (environment variables `LADDER_<FIELD>`)."""

    # hide_input_in_errors: a refused setting's error must not print the URLs and keys it was given
    model_config = SettingsConfigDict(env_prefix="LADDER_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "production"] = Field("development", description="production refuses unsafe defaults")
    data_dir: Path = Field(Path("ladder-data"), description="embedded database and local artifacts live here")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://host:6379/0; default: an in-process worker")
    artifacts_url: str | None = Field(None, description="file:///path or s3://bucket/prefix; default: data_dir/artifacts")
    s3_endpoint_url: str | None = Field(None, description="for S3-compatible stores (MinIO, …)")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = Field(None, description="S3 credentials; default: boto3's own lookup (AWS_* variables, instance role)")
    s3_secret_access_key: str | None = None
    shared_artifact_dir: bool = Field(False, description="production: every API and worker mounts the file:// artifact directory")
    # LADDER_<NAME>_FILE: read <name> from this file (docker/Kubernetes secrets); see SECRET_FIELDS
    database_url_file: Path | None = None
    broker_url_file: Path | None = None
    s3_access_key_id_file: Path | None = None
    s3_secret_access_key_file: Path | None = None

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
    max_num_classes: int = Field(100_000, ge=2, description="a spec's num_classes (its last layer is num_classes × the latent size)")
    max_model_parameters: int = Field(
        500_000_000, ge=1, description="parameters of a zoo network, counted on the meta device before any weight is read")
    pt2_load_timeout_s: int = 120
    pt2_load_memory_bytes: int = 8192 * MB
    pt2_max_concurrent: int = Field(2, ge=1, description="sandboxed .pt2 loads at once per process; more wait, then answer 503")
    # a request body that stalls is answered 408 and its connection closed (api/app.py, BodyTimeout)
    body_read_timeout_s: float = Field(60.0, gt=0, description="seconds allowed between two chunks of a request body (nginx: 60)")
    body_total_timeout_s: float = Field(3600.0, gt=0, description="seconds allowed for a whole request body (2 GiB at 0.6 MB/s)")
    header_timeout_s: float = Field(60.0, gt=0, description="seconds allowed for a request's line and headers (api/app.py, GuardedHttp)")

    # workers
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where stages compute: auto (the first visible CUDA device, else the CPU), cpu, cuda, cuda:N")
    gpu_data_share: float | None = Field(
        None, ge=0, le=1, description="share of a GPU's free memory a stage's data may take on it (the rest streams "
                                      "from pinned host memory); None = the method's default (services/method/placement.py)")
    queue: str = "ladder"
    # Redis hands an unacknowledged task out again after this. Heartbeats, not this timeout, decide who runs a stage: a
    # copy delivered while its stage still runs finds a live holder and is dropped (BUSY), so it need not outlast the
    # longest stage; it bounds how long a killed worker's message lingers (docs/deployment.md, "Faults").
    visibility_timeout_s: int = 3600
    heartbeat_s: float = 10.0
    stale_after_s: float = 60.0  # a running job whose heartbeat is older is taken over
    requeue_after_s: float = 900.0  # a queued job no worker took within this is enqueued again
    reconcile_every_s: float = 5.0
    enqueue_retry_after_s: float = Field(10.0, gt=0, description="a stage whose message could not be sent is sent again by the "
                                         "reconciler after this")
    infra_retry_s: float = Field(300.0, ge=1, description="how long a worker retries its claim, the broker or the artifact store "
                                 "before it hands the stage back (claim, broker) or fails the job, keeping its stages (store)")
    store_min_free_bytes: int = Field(1024 * MB, ge=0, description="a file:// store keeps this much free: a write that would "
                                      "leave less is refused as storage_full, and /readyz answers 503 below it")
    retry_after_s: int = Field(10, ge=1, description="the Retry-After of a 503 or 507 answer (database, broker or store trouble)")
    sweep_grace_s: float = Field(3600.0, gt=0, description="the reconciler removes stored files no job owns, and temp folders "
                                 "of dead processes, once they are this old")
    max_attempts: int = 3  # per stage; a stage that loses its worker this often fails the job
    progress_every_s: float = 1.0
    api_key_cache_s: float = 30.0  # a revoked key may still work this long on a running API

    # what one job may cost, checked at submission (services/bounds.py); the defaults admit the paper's protocol
    max_epochs: int = Field(100, ge=1, description="finetune.epochs, generator.max_epochs, evaluate.surrogate_epochs (authors: 100)")
    max_samples: int = Field(60_000, ge=1, description="every sample count of a config (full MNIST: 60,000 training images)")
    max_steps: int = Field(1000, ge=1, description="iterations of an attack or solver: PGD (evaluation, baselines), CW, the SVM's")
    max_eps_values: int = Field(20, ge=1, description="values in perturb.eps or perturb.crossing_quantiles")
    max_variants: int = Field(6, ge=0, description="models in variants (6: every defence and ablation)")
    max_active_jobs_per_tenant: int = Field(4, ge=0, description="queued + running jobs of one tenant; more answer 429; 0 = no cap")

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """LADDER_<NAME>_FILE: the value of <name> is that file's content (surrounding whitespace dropped)."""
        if not isinstance(data, dict):
            return data
        for name in SECRET_FIELDS:
            path = data.get(f"{name}_file")
            if not path:
                continue
            var = f"LADDER_{name.upper()}"
            if data.get(name):
                raise ValueError(f"set {var} or {var}_FILE, not both")
            try:
                value = Path(path).read_text().strip()
            except OSError as e:
                raise ValueError(f"{var}_FILE={path}: cannot read it ({e.strerror or e})") from e
            except UnicodeDecodeError as e:
                raise ValueError(f"{var}_FILE={path}: not UTF-8 text") from e
            if not value:
                raise ValueError(f"{var}_FILE={path} is empty")
            data = {**data, name: value}
        return data

    @model_validator(mode="after")
    def _check_production(self) -> "Settings":
        """S3 keys come in pairs; what production refuses (each message says what to set instead)."""
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("set LADDER_S3_ACCESS_KEY_ID and LADDER_S3_SECRET_ACCESS_KEY together (or neither, for boto3's own lookup)")
        if self.environment != "production":
            return self
        if not self.database_url or self.database_url.startswith("sqlite"):
            raise ValueError("production needs LADDER_DATABASE_URL (or LADDER_DATABASE_URL_FILE) pointing at PostgreSQL, not SQLite")
        if not self.broker_url:
            raise ValueError("production needs LADDER_BROKER_URL (or _FILE), e.g. redis://:PASSWORD@redis:6379/0: "
                             "the embedded worker is for development")
        if _weak(urlsplit(self.database_url).password):
            raise ValueError("LADDER_DATABASE_URL carries a default or weak password: "
                             "give the database role a random one of 8+ characters (scripts/make-secrets)")
        broker_password = urlsplit(self.broker_url).password
        if broker_password is None:
            raise ValueError("LADDER_BROKER_URL has no password: set Redis' requirepass and put it in the URL, redis://:PASSWORD@host:6379/0")
        if _weak(broker_password):
            raise ValueError("LADDER_BROKER_URL carries a default or weak password: "
                             "give Redis a random one of 8+ characters (scripts/make-secrets)")
        scheme = urlsplit(self.artifacts).scheme
        if scheme == "s3":
            given = self.s3_access_key_id is not None  # else boto3 reads its own AWS_* variables
            key_id = self.s3_access_key_id if given else os.environ.get("AWS_ACCESS_KEY_ID")
            secret = self.s3_secret_access_key if given else os.environ.get("AWS_SECRET_ACCESS_KEY")
            if (key_id or "").lower() == "minioadmin" or _weak(secret):
                raise ValueError("the S3 credentials are a default or a weak secret: give the service its own bucket-scoped user, "
                                 "with a random secret, in LADDER_S3_ACCESS_KEY_ID / LADDER_S3_SECRET_ACCESS_KEY (or _FILE)")
        if scheme == "file" and not self.shared_artifact_dir:
            raise ValueError("LADDER_ARTIFACTS_URL is a local directory but API and workers need one store: use s3://bucket/prefix, "
                             "or set LADDER_SHARED_ARTIFACT_DIR=true if every API and worker mounts that same directory")
        return self

    @model_validator(mode="after")
    def _check(self) -> "Settings":
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


def _weak(password: str | None) -> bool:
    """A known default, or under 8 characters (None, no password in the URL, is not weak by itself)."""
    if password is None:
        return False
    password = unquote(password)
    return len(password) < 8 or password.lower() in WEAK_PASSWORDS


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
