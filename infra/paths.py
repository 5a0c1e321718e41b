"""Where the local services keep data (``NADI_HOME``, default ``.nadi/``) and caches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nadi.settings import Settings


@dataclass(frozen=True)
class Paths:
    """Filesystem layout of the local stack. Data under ``home``; slow-to-make artefacts
    (Kafka jars, the TimescaleDB build) under the user's cache so a fresh clone reuses them."""

    home: Path
    cache: Path

    @classmethod
    def from_settings(cls, s: Settings) -> Paths:
        return cls(home=s.home.resolve(), cache=Path.home() / ".cache" / "nadi")

    @property
    def pg(self) -> Path:
        return self.home / "pg"

    @property
    def pg_tsl(self) -> Path:
        """The second cluster, with the Timescale-licensed TimescaleDB (issue 9)."""
        return self.home / "pg-tsl"

    @property
    def redis(self) -> Path:
        return self.home / "redis"

    @property
    def kafka(self) -> Path:
        return self.home / "kafka"

    @property
    def logs(self) -> Path:
        return self.home / "logs"
