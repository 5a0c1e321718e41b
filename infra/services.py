"""`nadi services up|down|status`: the local PostgreSQL+TimescaleDB, Redis and Kafka, and on
request a second PostgreSQL cluster with the Timescale-licensed TimescaleDB."""

from __future__ import annotations

import time

from infra.kafka_server import KafkaServer
from infra.paths import Paths
from infra.postgres import Postgres
from infra.proc import say
from infra.prometheus import PrometheusServer
from infra.redis_server import RedisServer
from infra.timescale_edition import BuildGone, SourceMissing, require_source
from nadi.settings import Settings


class LocalStack:
    """The services, in start order. Every operation is idempotent.

    The Timescale-edition cluster is built and created only when asked
    (``up(timescale_edition=True)``); once it exists (its data directory), a plain ``up``
    starts it too (from the build it was made with, never building), ``status`` lists it and
    ``down`` stops it. Prometheus (``up(monitoring=True)``) is the same: once configured, a
    plain ``up`` starts it too."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths.from_settings(settings)
        self.postgres = Postgres(settings, self.paths)
        self.postgres_tsl = Postgres(settings, self.paths, edition="timescale")
        self.redis = RedisServer(settings, self.paths)
        self.kafka = KafkaServer(settings, self.paths)
        self.prometheus = PrometheusServer(settings, self.paths)

    def _tsl_exists(self) -> bool:
        return (self.postgres_tsl.data / "PG_VERSION").exists()

    def up(
        self,
        timescale_edition: bool = False,
        skip_missing_source: bool = False,
        monitoring: bool = False,
    ) -> float:
        """Start everything; with ``timescale_edition`` also the TSL cluster (built if needed),
        with ``monitoring`` also Prometheus (loopback, the repository's scrape config and alert
        rules). ``skip_missing_source``: a missing NADI_TIMESCALE_SRC is reported, not an
        error."""
        t0 = time.monotonic()
        if timescale_edition:
            try:  # before anything starts: a wrong path fails in a second, not after Kafka
                require_source(self.settings.timescale_src)
            except SourceMissing as e:
                if not skip_missing_source:
                    raise
                say(f"{e}; starting the Apache edition only")
                timescale_edition = False
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        self.redis.start()
        self.kafka.start()
        if timescale_edition:
            self.postgres_tsl.start()
        elif self._tsl_exists():
            try:
                self.postgres_tsl.start(build=False)
            except BuildGone as e:
                say(f"{e}; `nadi services up --timescale-edition` rebuilds it")
        if monitoring or self.prometheus.config.exists():  # like the TSL cluster: once asked for
            self.prometheus.start()
        took = time.monotonic() - t0
        say(f"all services up in {took:.1f}s")
        return took

    def down(self) -> None:
        self.prometheus.stop()
        if self._tsl_exists():
            self.postgres_tsl.stop()
        self.kafka.stop()
        self.redis.stop()
        self.postgres.stop()

    def status(self) -> list[dict[str, object]]:
        rows = [self.postgres.status(), self.redis.status(), self.kafka.status()]
        if self._tsl_exists():
            rows.append(self.postgres_tsl.status())
        if self.prometheus.config.exists():  # started once with --monitoring
            rows.append(self.prometheus.status())
        return rows
