"""Service configuration: environment variables with prefix CARCERT_ (and an optional `.env` file).

The defaults describe the embedded all-in-one (`carcert up`): SQLite under ./var, the kombu
SQLAlchemy transport on SQLite as the broker, artifacts on the local disk. Production sets e.g.
CARCERT_DATABASE_URL=postgresql+psycopg://root@127.0.0.1:5432/test and
CARCERT_BROKER_URL=redis://127.0.0.1:6379/0. List values are given as JSON, e.g.
CARCERT_DATA_ROOTS='["/data", "./var/data"]'.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARCERT_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./var/carcert.db"
    broker_url: str = "sqla+sqlite:///./var/broker.db"
    artifact_root: Path = Path("./var/artifacts")
    artifact_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = "carcert/"
    # imagefolder:s3://<bucket>/<s3_prefix><s3_datasets_prefix>... datasets jobs may read (store.objects)
    s3_datasets_prefix: str = Field(default="datasets/", min_length=1)
    work_root: Path = Path("./var/work")
    data_roots: list[Path] = Field(default_factory=lambda: [Path("/usr/share/datasets"), Path("./var/data")])
    max_upload_bytes: int = 512 * MiB
    max_extract_bytes: int = 2048 * MiB  # total size of an extracted dataset archive
    max_extract_files: int = 200_000
    job_time_limit_s: int = 24 * 3600
    lease_seconds: int = 60
    max_attempts: int = 3  # a job whose worker died this many times is failed, not retried again
    queued_stale_seconds: int = 300  # a queued job untouched this long is dispatched again
    sweep_interval_s: float = 30.0  # how often a worker looks for stale jobs (0 = only at start)
    progress_interval_s: float = 0.5  # DB writes of progress at most this often
    # kombu's SQLAlchemy transport (the embedded broker) has no push: an idle worker polls the
    # queue table this often. kombu's default 1 s gave ~0.3 s of queue latency; 0.05 s gives ~50 ms
    # (0.1 s: ~75 ms, p90 ~120 ms on a loaded machine). Each poll is one short SQLite transaction
    # (~2 ms CPU), so an idle worker costs ~4 % of a core at 0.05 s (~2 % at 0.1 s).
    broker_poll_interval_s: float = Field(default=0.05, gt=0)
    queue: str = "carcert"  # Celery queue the API sends jobs to and workers consume
    # a sweep's variants run as separate tasks on any worker after the shared pretraining
    # (worker.fanout); off: the whole job runs on the worker that claimed it
    fan_out: bool = True
    # torch intra-op threads of each worker process (None: torch's default, all cores); `carcert up
    # --workers N` sets cores / N so N workers do not oversubscribe the CPU
    torch_threads: int | None = Field(default=None, ge=1)
    worker_index: int = 0  # picks the GPU of a worker process (CUDA_VISIBLE_DEVICES)
    gpus: list[str] | None = None  # GPU ids to spread workers over; default: all visible
    auth_disabled: bool = False
    # completion webhooks (worker.webhooks): HMAC key of X-Carcert-Signature (None: unsigned),
    # hosts exempt from the private-address refusal (comma separated), attempts and backoff
    webhook_secret: str | None = None
    webhook_allowed_hosts: str = ""
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff_s: float = Field(default=1.0, ge=0.0, le=600.0)  # delays: b, 2b, 4b, ...
    webhook_timeout_s: float = Field(default=10.0, gt=0.0, le=120.0)
    # the API's address as clients reach it: webhook events carry absolute links when set
    public_url: str | None = None
    # HMAC key of the signed, expiring report links (api/report_links.py); None: a random key per
    # API process (links stop working when it restarts; set it when several API processes serve)
    report_link_secret: str | None = None
    # finished jobs older than this many days are deleted by the workers' sweep (None: kept)
    retention_days: float | None = Field(default=None, gt=0)
    # job log lines kept per job (GET /jobs/{id}/logs); later lines are counted, not kept
    job_log_max_lines: int = Field(default=500, ge=10, le=100_000)

    def webhook_allowed(self) -> frozenset[str]:
        """CARCERT_WEBHOOK_ALLOWED_HOSTS as lower-case host names / IP literals."""
        return frozenset(
            h.strip().lower().strip("[]") for h in self.webhook_allowed_hosts.split(",") if h.strip()
        )

    # a job whose estimated work (core.work.estimate_work: forward/backward passes of one image)
    # exceeds this is refused with 422; 2e9 admits bench/table1's resnet18 sweep at the paper's
    # epochs on full Fashion-MNIST (5.7e8) with room, and refuses specs that would run for weeks
    max_job_work: int = Field(default=2_000_000_000, ge=1)
    # queued jobs one tenant may have at once; past it POST /jobs answers 429 with Retry-After
    tenant_max_queued: int = Field(default=100, ge=1)
    # bearer token that GET /metrics requires (per-tenant job counts); None: /metrics is open
    metrics_token: str | None = None
    # worker.tracking: one MLflow run per variant of each succeeded job when set
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "carcert"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests call get_settings.cache_clear() after changing env)."""
    return Settings()
