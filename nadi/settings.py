"""Typed settings for every Nadi process.

One object reads the environment (and an optional ``.env``); nothing else in the code base reads
``os.environ``. Invalid values fail at start-up with pydantic's message, never later.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from string import Formatter
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _local(*parts: str) -> Path:
    """A default under ``./.nadi`` of the directory the command runs in (the checkout's root
    for make, CI and the tests; wherever an installed ``nadi`` is run from otherwise)."""
    return Path.cwd().joinpath(".nadi", *parts)


# API key scopes (issue 10): what a key may do. ``admin`` includes the others.
API_SCOPES = ("read", "replay", "admin")
BARE_KEY_SCOPES = frozenset({"read", "replay"})
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+/=")


def parse_api_keys(text: str | None) -> dict[str, frozenset[str]]:
    """``NADI_API_KEYS`` -> {key: scopes}. Grammar: entries separated by ``;``, each
    ``key`` or ``key:scope,scope``; a bare key has ``read`` and ``replay``. The older form,
    comma-separated bare keys (``k1,k2``), is read as well. ValueError says what is wrong
    (never echoing a key)."""
    out: dict[str, frozenset[str]] = {}
    for n, entry in enumerate((text or "").split(";"), 1):
        entry = entry.strip()
        if not entry:
            continue
        pairs: list[tuple[str, str | None]]
        if ":" in entry:
            head, _, tail = entry.partition(":")
            pairs = [(head.strip(), tail)]
        else:
            pairs = [(k.strip(), None) for k in entry.split(",") if k.strip()]
        for key, scope_text in pairs:
            if not key or not set(key) <= _KEY_CHARS:
                raise ValueError(
                    f"NADI_API_KEYS entry {n}: a key is 1+ characters of [A-Za-z0-9-_.~+/=]"
                )
            if scope_text is None:
                scopes = BARE_KEY_SCOPES
            else:
                names = {s.strip() for s in scope_text.split(",") if s.strip()}
                bad = sorted(names - set(API_SCOPES))
                if bad or not names:
                    raise ValueError(
                        f"NADI_API_KEYS entry {n}: scopes must be among {', '.join(API_SCOPES)}"
                        + (f" (got {', '.join(bad)})" if bad else " (none given)")
                    )
                scopes = frozenset(names)
            if key in out and out[key] != scopes:
                raise ValueError(f"NADI_API_KEYS entry {n}: a key is listed twice, scopes differ")
            out[key] = scopes
    return out


def _dsn_as(owner_dsn: str, role: str) -> str:
    """``owner_dsn`` (host, port, database, options) with user ``role`` and no password."""
    u = urlsplit(owner_dsn)
    host = u.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{role}@{host}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


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

    # Least-privilege database roles (issue 10; dbt_or_sql/0013_roles.sql). ``pg_dsn`` is the
    # owner's (migrations). Unset (""), each of these is ``pg_dsn`` with user nadi_ingest,
    # nadi_api or nadi_maint and no password (local trust): read them through the
    # ``ingest_dsn``/``api_dsn``/``maint_dsn`` properties, which follow ``pg_dsn`` (so a
    # model_copy onto another database moves them too). Set real DSNs in production.
    pg_ingest_dsn: str = Field("", description="the processor's DSN (role nadi_ingest)")
    pg_api_dsn: str = Field("", description="the API's DSN (role nadi_api, read-only)")
    pg_maint_dsn: str = Field("", description="Dagster maintenance and repairs (nadi_maint)")
    # The Dagster webserver has no auth of its own: it binds loopback unless the operator says a
    # proxy in front of it authenticates (README, "Dagster behind an authenticating proxy").
    dagster_host: str = Field("127.0.0.1", description="Dagster webserver bind address")
    dagster_port: int = Field(3000, ge=1, le=65535, description="Dagster webserver port")
    dagster_behind_auth_proxy: bool = Field(
        False, description="allow a non-loopback dagster_host: a proxy in front does auth"
    )

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
    # WebSocket /ws limits (issue 10; DESIGN.md section 7). Per connection unless said
    # otherwise; exceeding one gets an ``error`` frame with a code or a close code, never a
    # crash (README, "WebSocket"). ``ws_queue_size`` bounds the live lane (drop-oldest); the
    # catch-up/control lane holds about as much and is filled only as the client reads.
    ws_queue_size: int = Field(1000, ge=10, description="outbound live messages per connection")
    ws_stall_timeout_s: float = Field(
        30.0, gt=0, description="disconnect a client stalled this long"
    )
    ws_max_message_bytes: int = Field(
        16_384, ge=256, description="largest client message (bytes); larger closes with 1009"
    )
    ws_max_frame_bytes: int = Field(
        262_144, ge=4096, description="largest outbound frame (coalesced messages, bytes)"
    )
    ws_max_subscriptions: int = Field(200, ge=1, description="instruments per connection")
    ws_subscribes_per_s: float = Field(
        20.0, gt=0, description="subscribe/unsubscribe messages per second (burst: as many)"
    )
    ws_max_connections_per_key: int = Field(
        2000, ge=1, description="open /ws connections per API key (auth off: all together)"
    )
    ws_catchup_concurrency: int = Field(
        8, ge=1, le=256, description="catch-up reads (Redis or database) in flight per API process"
    )
    replay_chunk_rows: int = Field(5000, ge=100, description="rows per keyset page of a replay")

    # --- API processes and live fan-out (issue 12)
    api_workers: int = Field(
        0, ge=0, le=64, description="`nadi api` processes; 0: chosen for this machine"
    )
    ws_flush_interval_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="with a wide fan-out, live reads (so frames per connection) at most this "
        "often; 0: as fast as ticks come",
    )

    # Orchestration (issue "Orchestration").
    recovery_url: str = Field(
        "http://127.0.0.1:8765", description="the exchange recovery (retransmission) service"
    )
    bhavcopy_dir: Path = Field(default_factory=lambda: _local("bhavcopy"))
    gap_repair_max_attempts: int = Field(3, ge=1)

    # --- EOD reconciliation (issue 13): where NSE's two zipped UDiFF bhavcopy files of a day
    # come from: ``bhavcopy_dir`` first, then this URL template. Fields: {filename} (NSE's
    # name), {segment} (CM/FO), {segment_lower}, {yyyymmdd}, {date} (YYYY-MM-DD). Empty: the
    # recovery service's /v1/bhavcopy/{filename}. NSE's archive:
    # https://nsearchives.nseindia.com/content/{segment_lower}/{filename}
    bhavcopy_url: str = Field("", description="URL template of a day's bhavcopy file")

    @field_validator("bhavcopy_url")
    @classmethod
    def _bhavcopy_url_ok(cls, v: str) -> str:
        names = {f for _, f, _, _ in Formatter().parse(v) if f is not None}
        allowed = {"filename", "segment", "segment_lower", "yyyymmdd", "date"}
        if bad := sorted(names - allowed):
            raise ValueError(f"unknown fields {bad} (allowed: {sorted(allowed)})")
        if (
            v
            and "filename" not in names
            and not (names & {"yyyymmdd", "date"} and names & {"segment", "segment_lower"})
        ):
            raise ValueError("needs {filename}, or a date field and a segment field")
        return v

    @property
    def bhavcopy_url_template(self) -> str:
        """``bhavcopy_url``, or the recovery service's bhavcopy endpoint."""
        return self.bhavcopy_url or f"{self.recovery_url.rstrip('/')}/v1/bhavcopy/{{filename}}"

    # --- gap repair in batches (issue 13): the sensor claims open gaps per trading day in
    # batches, one run each, and keeps at most gap_repair_max_runs runs queued or running.
    gap_repair_batch_size: int = Field(500, ge=1, le=10_000, description="gaps per repair run")
    gap_repair_concurrency: int = Field(
        8, ge=1, le=64, description="recovery-service requests in flight per repair run"
    )
    gap_repair_max_runs: int = Field(
        2, ge=1, le=64, description="gap-repair runs queued or running at once (sensor stops)"
    )
    gap_repair_sensor_interval_s: int = Field(
        5, ge=1, le=3600, description="seconds between evaluations of gap_repair_sensor"
    )
    gap_repair_grace_s: float = Field(
        10.0, ge=0, description="gaps younger than this are left to late arrivals"
    )
    gap_repair_retry_s: float = Field(
        30.0, ge=0, description="after a failed attempt, wait this x 2^(attempts - 1)"
    )
    gap_repair_claim_timeout_s: float = Field(
        120.0, gt=0, description="a claim whose run never appeared is released after this"
    )

    # Storage policies (issue 9). Dagster runs candle refresh, retention and compression on
    # both editions; TimescaleDB's own policy jobs are installed only when asked for (their
    # background worker fails on some builds, and then a job reports failure after its work).
    timescale_policies: bool = Field(
        False, description="also install TimescaleDB policy jobs (Timescale license)"
    )
    retention_days: int = Field(0, ge=0, description="drop tick chunks older; 0 keeps all")
    compress_after_days: int = Field(
        7, ge=1, description="compress tick chunks older than this (Timescale license)"
    )

    # --- history import (issue 14, `nadi import`): the folder the Dagster imports asset
    # watches (files named by trading day, see pipelines/assets/imports.py) and the rows per
    # chunk the importer reads, stages and writes at a time (its memory is about this).
    import_dir: Path = Field(default_factory=lambda: _local("import"))
    import_chunk_rows: int = Field(250_000, ge=1000, le=10_000_000)

    # Where local services keep data, builds and logs (git-ignored).
    home: Path = Field(default_factory=_local)
    dagster_home: Path = Field(
        default_factory=lambda: _local("dagster"), validation_alias=AliasChoices("DAGSTER_HOME")
    )
    kafka_version: str = "4.3.1"
    kafka_heap: str = "1G"
    kafka_controller_port: int = Field(0, ge=0, le=65535, description="0: broker port + 1")

    # The second cluster with the Timescale-licensed TimescaleDB (issue 9): same host, user and
    # trust rules as NADI_PG_DSN, its own port; built from this source (tarball or unpacked
    # tree). CI runs in a fresh clone with shared/ beside it, hence the default.
    pg_tsl_port: int = Field(5433, ge=1, le=65535)
    timescale_src: Path = Field(
        default_factory=lambda: Path.cwd().parent / "shared/vendor/timescaledb-2.19.3.tar.gz"
    )

    # The demo platform of `nadi up`: a live simulated feed with a few gaps, reorders and bad
    # packets, so the repair paths have work to show, and this many processor workers (their
    # Prometheus ports are metrics_port, metrics_port + 1, ...).
    demo_rate: float = Field(1000.0, gt=0, description="ticks/s of the demo feed")
    demo_gap_rate: float = Field(
        0.0001, ge=0, le=1, description="a gap every ~10 s: each is one repair run to watch"
    )
    demo_reorder_rate: float = Field(0.001, ge=0, le=1)
    demo_bad_rate: float = Field(0.0002, ge=0, le=1)
    demo_workers: int = Field(2, ge=1, le=64)

    # --- monitoring (issue 13): the console of `nadi up`, the Dagster/database exporter and
    # the local Prometheus of `nadi services up --monitoring` (all loopback).
    status_interval_s: float = Field(5.0, gt=0, description="`nadi up` status line period")
    exporter_port: int = Field(
        9208, ge=1, le=65535, description="pipelines.exporter (Dagster and gap gauges)"
    )
    exporter_interval_s: float = Field(5.0, gt=0, description="exporter collection period")
    prometheus_port: int = Field(9090, ge=1, le=65535, description="local Prometheus")

    # --- Kite Connect ticker (issue 14, `nadi feed kite`; README "Kite feed"). The access
    # token is the user's, from Kite's daily login flow; Nadi only reads it.
    kite_ws_url: str = Field(
        "wss://ws.kite.trade",
        description="ticker WebSocket URL (tests and proxies point elsewhere)",
    )
    kite_api_key: str = Field("", description="Kite Connect API key")
    kite_access_token: str = Field("", repr=False, description="today's Kite access token")
    kite_heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="reconnect a connection silent this long (Kite beats each second)"
    )
    kite_reconnect_max_delay_s: float = Field(
        60.0, gt=0, description="longest wait between reconnect attempts (exponential backoff)"
    )
    kite_metrics_port: int = Field(9128, ge=0, le=65535, description="0: no /metrics")

    @field_validator("pg_dsn", "pg_ingest_dsn", "pg_api_dsn", "pg_maint_dsn")
    @classmethod
    def _pg_dsn_is_postgres(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("postgresql", "postgres"):
            raise ValueError("a NADI_PG_*DSN must be a postgresql:// URL")
        return v

    @field_validator("api_keys")
    @classmethod
    def _api_keys_parse(cls, v: str | None) -> str | None:
        parse_api_keys(v)
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
    def pg_tsl_dsn(self) -> str:
        """NADI_PG_DSN moved to the Timescale-edition cluster (NADI_PG_TSL_PORT)."""
        return on_port(self.pg_dsn, self.pg_tsl_port)

    @property
    def ingest_dsn(self) -> str:
        """The processor's DSN: NADI_PG_INGEST_DSN, else ``pg_dsn`` as nadi_ingest."""
        return self.pg_ingest_dsn or _dsn_as(self.pg_dsn, "nadi_ingest")

    @property
    def api_dsn(self) -> str:
        """The API's DSN: NADI_PG_API_DSN, else ``pg_dsn`` as nadi_api."""
        return self.pg_api_dsn or _dsn_as(self.pg_dsn, "nadi_api")

    @property
    def maint_dsn(self) -> str:
        """Dagster maintenance's DSN: NADI_PG_MAINT_DSN, else ``pg_dsn`` as nadi_maint."""
        return self.pg_maint_dsn or _dsn_as(self.pg_dsn, "nadi_maint")

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
    def api_key_scopes(self) -> dict[str, frozenset[str]]:
        """{key: scope names}; empty when auth is off. See :func:`parse_api_keys`."""
        return parse_api_keys(self.api_keys)

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(self.api_key_scopes)

    def env(self, *fields: str) -> dict[str, str]:
        """This process's environment with ``NADI_<FIELD>`` set from each named field, so a
        child process (a worker, the API) reads the same services and limits. A field that is
        None is removed, so the child never inherits another value for it."""
        out = dict(os.environ)
        for name in fields:
            key = f"NADI_{name.upper()}"
            value = getattr(self, name)
            if value is None:
                out.pop(key, None)
            else:
                out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


# The fields a processor worker needs to join another process's pipeline (Settings.env).
WORKER_FIELDS = (
    "pg_dsn", "redis_url", "kafka_bootstrap", "topic_ticks", "topic_dlq", "group_id",
    "batch_max_records",
)  # fmt: skip


def on_port(dsn: str, port: int) -> str:
    """``dsn`` with its port replaced (user, host, database and query kept)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rpartition("@")
    host = netloc[2].rsplit(":", 1)[0] if parts.port is not None else netloc[2]
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}{netloc[1]}{host}:{port}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
