"""`nadi services up|down|status`: the local PostgreSQL+TimescaleDB, Redis and Kafka."""

from __future__ import annotations

import time

from infra.kafka_server import KafkaServer
from infra.paths import Paths
from infra.postgres import Postgres
from infra.proc import say
from infra.redis_server import RedisServer
from nadi.settings import Settings


class LocalStack:
    """The three services, in start order. Every operation is idempotent."""

    def __init__(self, settings: Settings) -> None:
        self.paths = Paths.from_settings(settings)
        self.postgres = Postgres(settings, self.paths)
        self.redis = RedisServer(settings, self.paths)
        self.kafka = KafkaServer(settings, self.paths)

    def up(self) -> float:
        t0 = time.monotonic()
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        self.redis.start()
        self.kafka.start()
        took = time.monotonic() - t0
        say(f"all services up in {took:.1f}s")
        return took

    def down(self) -> None:
        self.kafka.stop()
        self.redis.stop()
        self.postgres.stop()

    def status(self) -> list[dict[str, object]]:
        return [self.postgres.status(), self.redis.status(), self.kafka.status()]
