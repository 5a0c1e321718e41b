"""Redis key names shared by the processor (writer) and the API (reader).

Per trading day (``day`` = days since 1970-01-01 of the Asia/Kolkata date):
- ``nadi:dd:{day}:{token}``   bitmap of sequence ids persisted in TimescaleDB (dedup filter)
- ``nadi:rl:{day}``           hash token -> last in-order sequence appended to the ring
- ``nadi:rlate:{day}:{token}`` set of late (RECOVERED) sequences appended to the ring
- ``nadi:rfloor:{day}``       hash token -> first in-order sequence appended since the ring (re)started
- ``nadi:seq:{day}``          hash token -> last sequence id seen (SequenceTracker state)
Across days:
- ``nadi:ring:{token}``       stream, the instrument's ring buffer (MAXLEN-bounded)
- ``nadi:live``               stream, the live fan-out that API processes read
"""

from __future__ import annotations

LIVE_STREAM = "nadi:live"
# Sequence ids at or above this go to a set instead of a bitmap, so a hostile or odd feed
# cannot make Redis allocate a 512 MB bitmap. 2**24 bits = 2 MB per instrument-day.
BITMAP_MAX_SEQ = 1 << 24


def dedup_key(day: int, token: int) -> str:
    return f"nadi:dd:{day}:{token}"


def seq_state_key(day: int) -> str:
    return f"nadi:seq:{day}"


def ring_key(token: int) -> str:
    return f"nadi:ring:{token}"
