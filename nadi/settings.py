"""Typed settings for every Nadi process.

One object reads the environment (and an optional ``.env``); nothing else in the code base reads
``os.environ``. Invalid values fail at start-up with pydantic's message, never later.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Configuration of a Nadi process. Env names are the contract of DESIGN.md section 2."""

    model_config = SettingsConfigDict(
        env_prefix="NADI_", env_file=".env", extra="ignore", frozen=True
    )

    pg_dsn: str = "postgresql://postgres@127.0.0.1:5432/nadi"
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_ticks: str = "ticks.raw"
    topic_dlq: str = "ticks.dlq"
    topic_replay: str = "ticks.replay"
    ticks_partitions: int = Field(12, ge=1, le=1024)
    group_id: str = "nadi-processor"
    api_keys: str | None = None

    # Ingest validation (DESIGN.md section 4).
    max_future_skew_s: float = Field(
        300.0, gt=0, validation_alias=AliasChoices("NADI_MAX_FUTURE_SKEW", "NADI_MAX_FUTURE_SKEW_S")
    )
    max_tick_age_s: float = Field(
        7 * 86400.0, gt=0, validation_alias=AliasChoices("NADI_MAX_TICK_AGE", "NADI_MAX_TICK_AGE_S")
    )
    max_message_bytes: int = Field(4096, ge=256)

    # Processor tuning.
    batch_max_records: int = Field(5000, ge=1)
    batch_timeout_ms: int = Field(50, ge=1)
    ring_maxlen: int = Field(10_000, ge=10, description="entries kept per instrument ring")
    dedup_ttl_s: int = Field(2 * 86400, ge=60)
    metrics_port: int = Field(9108, ge=0, le=65535)

    # Processor: tests and state ownership (issue 8).
    fault: str | None = Field(
        None,
        description="tests only: '<crash point>:<n>' SIGKILLs the worker the n-th time it "
        "reaches that point (streaming/processor/crash.py)",
    )

    # API and WebSocket hub (issue "Serving").
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    allowed_origins: str = Field(
        "http://127.0.0.1:8000,http://localhost:8000",
        description="comma-separated Origin allowlist for browsers ('*' allows any)",
    )
    ws_queue_size: int = Field(1000, ge=10, description="outbound messages per connection")
    ws_stall_timeout_s: float = Field(
        30.0, gt=0, description="disconnect a client stalled this long"
    )
    ws_max_message_bytes: int = Field(16_384, ge=256, description="largest client message")
    ws_max_subscriptions: int = Field(200, ge=1, description="instruments per connection")
    ws_max_connections_per_key: int = Field(2000, ge=1)
    replay_chunk_rows: int = Field(5000, ge=100, description="rows per keyset page of a replay")

    # Orchestration (issue "Orchestration").
    recovery_url: str = Field(
        "http://127.0.0.1:8765", description="the exchange recovery (retransmission) service"
    )
    bhavcopy_dir: Path = _REPO_ROOT / ".nadi" / "bhavcopy"
    gap_repair_max_attempts: int = Field(3, ge=1)

    # Where local services keep data, builds and logs (git-ignored).
    home: Path = _REPO_ROOT / ".nadi"
    dagster_home: Path = Field(
        _REPO_ROOT / ".nadi" / "dagster", validation_alias=AliasChoices("DAGSTER_HOME")
    )
    kafka_version: str = "4.3.1"
    kafka_heap: str = "1G"
    kafka_controller_port: int = Field(0, ge=0, le=65535, description="0: broker port + 1")

    @field_validator("pg_dsn")
    @classmethod
    def _pg_dsn_is_postgres(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("postgresql", "postgres"):
            raise ValueError("NADI_PG_DSN must be a postgresql:// URL")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_redis(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("NADI_REDIS_URL must be a redis:// URL")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for server in v.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"NADI_KAFKA_BOOTSTRAP entry {server!r} is not host:port")
        return v

    # Derived views, kept here so every part agrees on them.
    @property
    def pg_host(self) -> str:
        return urlsplit(self.pg_dsn).hostname or "127.0.0.1"

    @property
    def pg_port(self) -> int:
        return urlsplit(self.pg_dsn).port or 5432

    @property
    def pg_user(self) -> str:
        return urlsplit(self.pg_dsn).username or "postgres"

    @property
    def pg_database(self) -> str:
        return urlsplit(self.pg_dsn).path.lstrip("/") or "nadi"

    @property
    def redis_port(self) -> int:
        return urlsplit(self.redis_url).port or 6379

    @property
    def redis_host(self) -> str:
        return urlsplit(self.redis_url).hostname or "127.0.0.1"

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap.split(",")[0].rpartition(":")[0]

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rpartition(":")[2])

    @property
    def origin_set(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def api_key_set(self) -> frozenset[str]:
        if not self.api_keys:
            return frozenset()
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
