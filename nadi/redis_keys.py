"""Redis key names shared by the processor (writer) and the API and pipelines (readers).

Every key belongs to one database: it starts with ``nadi:{<db id>}:``, where the id is the
uuid in the database's ``nadi_instance`` table (dbt_or_sql/0010). A recreated database, or a
second deployment sharing one Redis, has another id and so never reads these keys. (The braces
are a Redis Cluster hash tag: one database's keys share a slot, as the ring's Lua needs.)

Readers need two names, both from ``RedisKeys``::

    keys = await RedisKeys.load(pool_or_connection)  # once, at start-up
    keys.live          # stream: the live fan-out, one entry per processor ring write
    keys.ring(token)   # stream: the instrument's ring buffer (MAXLEN-bounded)

The ring writer's bookkeeping (nadi.ring), per trading day (``day`` = days since 1970-01-01 of
the Asia/Kolkata date):

- ``ra:{day}:{token}``   bitmap of the sequence ids appended to the ring (``:big``: a set for
  ids >= BITMAP_MAX_SEQ), which makes appends idempotent whatever order ticks come in
- ``rl:{day}``           hash token -> highest sequence appended (compared with the
  database's ingest_state to see a ring that is behind the database)
- ``rfloor:{day}``       hash token -> the sequence the ring (re)started at

All keys expire after ``Settings.dedup_ttl_s`` without writes. Redis holds no dedup or sequence
state any more: the database does (ingest_state, maintained in the ingest transaction).
``DATABASES`` (a set, not namespaced) lists the database ids that have used this Redis, so a
worker can log that it shares Redis with another database.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

DATABASES = "nadi:databases"
LEGACY_LIVE = "nadi:live"  # the un-namespaced live stream of releases before migration 0010
# Key name parts after the database prefix (the ring's Lua gets them via script_prefixes()).
LIVE = "live"
RING = "ring:"
TOP = "rl:"
FLOOR = "rfloor:"
APPENDED = "ra:"
BIG = ":big"  # suffix of an appended-bitmap key: the set of ids >= BITMAP_MAX_SEQ
# Sequence ids at or above this go to a set instead of a bitmap, so a hostile or odd feed
# cannot make Redis allocate a 512 MB bitmap. 2**24 bits = 2 MB per instrument-day.
BITMAP_MAX_SEQ = 1 << 24


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The key names of one database's Redis state."""

    db_id: str  # nadi_instance.id, as 32 hex digits

    @classmethod
    async def load(cls, db: asyncpg.Pool | asyncpg.Connection) -> RedisKeys:
        """The keys of the database ``db`` connects to (needs migration 0010)."""
        db_id = await db.fetchval("SELECT id FROM nadi_instance")
        if db_id is None:
            raise RuntimeError("nadi_instance is empty: run `nadi migrate`")
        return cls(db_id.hex)

    @property
    def prefix(self) -> str:
        return f"nadi:{{{self.db_id}}}:"

    @property
    def live(self) -> str:
        return f"{self.prefix}{LIVE}"

    def ring(self, token: int) -> str:
        return f"{self.prefix}{RING}{token}"

    def ring_top(self, day: int) -> str:
        return f"{self.prefix}{TOP}{day}"

    def ring_floor(self, day: int) -> str:
        return f"{self.prefix}{FLOOR}{day}"

    def ring_appended(self, day: int, token: int) -> str:
        return f"{self.prefix}{APPENDED}{day}:{token}"

    def script_prefixes(self) -> list[str]:
        """The prefixes the ring's Lua builds its keys from: ring, top, floor, appended (each
        followed by the token or day) and the big-set suffix."""
        p = self.prefix
        return [p + RING, p + TOP, p + FLOOR, p + APPENDED, BIG]
