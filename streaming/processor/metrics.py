"""Prometheus metrics of the processor (module-level: one set per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TICKS_IN = Counter("nadi_ticks_in_total", "Messages consumed from the input topic")
TICKS_STORED = Counter("nadi_ticks_stored_total", "New rows written to ticks")
DUPLICATES = Counter(
    "nadi_duplicates_total",
    "Redundant packets dropped, by where they were caught",
    ["stage"],  # memory (this batch or recent ones) | database (its unique key)
)
CONFLICTS = Counter(
    "nadi_sequence_conflicts_total", "Same sequence seen with a different payload (first kept)"
)
GAPS = Counter("nadi_gaps_total", "Sequence gaps recorded")
GAPS_CLOSED = Counter("nadi_gaps_closed_total", "Gaps closed by late ticks")
STALE = Counter("nadi_ticks_stale_total", "Ticks stored as STALE (first after a gap)")
RECOVERED = Counter("nadi_ticks_recovered_total", "Ticks stored as RECOVERED (filled a gap)")
DLQ = Counter("nadi_dlq_total", "Messages sent to the dead-letter topic", ["reason"])
UNKNOWN_INSTRUMENT = Counter(
    "nadi_unknown_instrument_ticks_total", "Stored ticks whose token is not in instruments"
)
BATCH_SECONDS = Histogram(
    "nadi_batch_seconds",
    "Wall time to make one batch durable (decode to commit)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "nadi_batch_size",
    "Messages per batch",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000),
)
WRITE_RETRIES = Counter(
    "nadi_write_retries_total",
    "Batch steps retried after a failure",
    ["sink"],  # state (prepare: database state, ring check) | db | ring | dlq
)
PAUSED = Gauge("nadi_partitions_paused", "1 while the worker has paused its partitions")
LAG = Gauge("nadi_consumer_lag", "Messages behind the high watermark", ["partition"])
STATE_LOADS = Counter(
    "nadi_state_loads_total",
    "Batches by whether their sequence state was loaded from the database or already known",
    ["source"],  # database | memory
)
REDIS_STATE_DISCARDED = Counter(
    "nadi_redis_state_discarded_total",
    "Redis state found not to describe this database, discarded or ignored",
    # ring_behind (Redis older than the database) | ring_lost (Redis lost the ring's keys) |
    # other_database (keys of another database in this Redis) | legacy_keys (un-namespaced)
    ["reason"],
)
RING_AHEAD = Counter(
    "nadi_ring_ahead_total",
    "Instrument-days whose ring was ahead of the database (kept: redelivery is idempotent)",
)
STATE_MOVED = Counter(
    "nadi_ingest_state_moved_total",
    "Batches the database refused: classified against another state than it holds",
)
DB_TRANSACTIONS = Counter(
    "nadi_db_transactions_total", "Tick write transactions (several batches may share one)"
)
