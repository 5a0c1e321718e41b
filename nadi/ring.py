"""The Redis ring buffer: one stream per instrument (MAXLEN-bounded) plus the live fan-out.

Key names come from ``nadi.redis_keys.RedisKeys`` (namespaced by the database's identity).

Appends are idempotent, checked in the same Lua call as the XADD: a bitmap per
instrument-day of the sequence ids appended so far, so a redelivered or repeated tick never
goes in twice, whatever order it comes in. The ring of an instrument-day starts at a *floor*
(the first in-order tick appended, or the sequence after the database's last when the ring was
found behind the database and restarted): a tick the database already had (STORED_LATE) goes
in only at or above it and only if it is not in yet, so the ring stays a gap-free tail of
what is stored; a late tick new to the database (NEW_LATE) goes in whatever the floor.

An append may carry, per tick, the sequence the worker expects the ring to have reached (the
last sequence its batch was classified against; the ring is written first and in order, so its
top is never below that). A top below it means Redis lost data while the worker ran (restarted
from an older snapshot, flushed): the ring is restarted after the expected sequence in the same
call, as ``check`` does on first touch, and reported.

``check`` compares the ring's top (highest appended sequence) with the database's last
sequence of an instrument-day (ingest_state): behind, the ring is deleted and restarts after
the database's last (the catch-up reads the rest from the database); ahead (a database restored
from an older dump), it is kept, and the bitmap keeps redelivered ticks out.

The ring stream's entry id is the tick's *ring offset*, which WebSocket clients resume from.
The live fan-out stream gets one entry per append call: field ``p`` holds a JSON array of the
ticks (LiveTick) and field ``o`` their ring offsets, comma-separated and aligned (empty for a
tick already in the ring); ``decode_live_entry`` turns an entry into ``LiveEntry(o, t)`` items
in ring order, so readers decode once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import msgspec
import redis.asyncio as aioredis

from nadi.redis_keys import BITMAP_MAX_SEQ, RedisKeys
from nadi.tick import LiveTick, Tick

# How the script decides whether a tick may go into the ring (``modes``).
IN_ORDER = 1  # OK/STALE past the last sequence: anchors the ring (sets its floor if none)
NEW_LATE = 0  # out of order and new to the database: appended unless already in the ring
STORED_LATE = 2  # already stored: only at or above the floor and not in the ring


def _lua(name: str) -> str:
    return resources.files("nadi").joinpath("lua", name).read_text()


# Key prefixes arrive as arguments (RedisKeys.script_prefixes), so the names live in one place.
_APPEND = _lua("ring_append.lua")
_CHECK = _lua("ring_check.lua")

CONSISTENT, AHEAD, BEHIND, LOST = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class RingCheck:
    """An instrument-day whose ring did not match the database (``outcome``: AHEAD, BEHIND,
    LOST; the latter two were restarted)."""

    token: int
    day: int
    outcome: int


class LiveEntry(msgspec.Struct):
    """One tick of a live fan-out batch."""

    o: str  # ring offset (the instrument stream's entry id)
    t: LiveTick


_encode_json = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode
_live_payloads = msgspec.json.Decoder(list[LiveTick])


def decode_live_entry(fields: Mapping[bytes, bytes]) -> list[LiveEntry]:
    """The ticks of one ``nadi:live`` entry, in ring order. Fields: ``p`` a JSON array of
    LiveTick, ``o`` the comma-separated ring offsets aligned with it, empty where the tick was
    a redelivery that is already in the ring (those are skipped here)."""
    ticks = _live_payloads.decode(fields[b"p"])
    offsets = fields[b"o"].decode().split(",")
    return [LiveEntry(o, t) for o, t in zip(offsets, ticks, strict=True) if o]


IN_ORDER_STATUSES = frozenset(("OK", "STALE"))  # past the last sequence: increasing
_STATUS_TAIL = {s: f',"status":"{s}"}}'.encode() for s in ("OK", "STALE", "RECOVERED", "LATE")}


def live_payload(t: Tick, status: str) -> bytes:
    """The LiveTick JSON of a tick: Tick encodes with LiveTick's field names (``exchange_ts``
    in epoch ns), and the status is spliced in; far cheaper than building a LiveTick."""
    return _encode_json(t)[:-1] + _STATUS_TAIL[status]


class RingWriter:
    """Appends ticks to their instrument rings and the live stream in one Lua call per batch."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        maxlen: int,
        live_maxlen: int = 20_000,
        ttl_s: int,
    ) -> None:
        self._client = client
        self.keys = keys
        self._script = client.register_script(_APPEND)
        self._check = client.register_script(_CHECK)
        self._tail = [maxlen, live_maxlen, ttl_s]
        self._ttl = ttl_s

    async def append(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        modes: Sequence[int] | None = None,
    ) -> list[str | None]:
        """Returns the ring offset of each tick, or None where it was already in the ring (or
        is a stored tick below the floor). ``modes`` (IN_ORDER, NEW_LATE, STORED_LATE) default
        from the statuses: OK and STALE are in order, anything else is new to the database."""
        offsets, _ = await self.append_expecting(ticks, days, statuses, modes)
        return offsets

    async def append_expecting(
        self,
        ticks: Sequence[Tick],
        days: Sequence[int],
        statuses: Sequence[str],
        modes: Sequence[int] | None = None,
        expect: Sequence[int] | None = None,
    ) -> tuple[list[str | None], list[RingCheck]]:
        """As :meth:`append`; ``expect`` (aligned with ``ticks``, -1 for none) is the
        sequence each tick's ring must have reached already: a ring behind it is restarted
        after it first (BEHIND, or LOST when it had no state at all); those are returned."""
        if not ticks:
            return [], []
        if modes is None:
            modes = [IN_ORDER if s in IN_ORDER_STATUSES else NEW_LATE for s in statuses]
        if expect is None:
            expect = [-1] * len(ticks)
        payloads = [live_payload(t, s) for t, s in zip(ticks, statuses, strict=True)]
        joined = b"[" + b",".join(payloads) + b"]"
        items = []
        at = 2  # Lua's 1-based position of the first payload, after "["
        for t, d, m, e, p in zip(ticks, days, modes, expect, payloads, strict=True):
            items.append((d, t.instrument_token, t.sequence_id, m, at, len(p), e))
            at += len(p) + 1
        blob = _pack(items)
        result = await self._script(
            keys=[self.keys.live],
            args=[blob, *self._tail, joined, *self.keys.script_prefixes(), BITMAP_MAX_SEQ],
        )
        offsets, flat = result
        restarted = [
            RingCheck(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        return [o or None for o in offsets.decode().split(",")], restarted

    async def check(self, last: Mapping[tuple[int, int], int | None]) -> list[RingCheck]:
        """Compare each (token, day)'s ring with the database's last sequence (None: no tick
        stored); restart the rings that are behind. Returns the mismatches."""
        if not last:
            return []
        items = [(day, token, -1 if q is None else q) for (token, day), q in last.items()]
        flat = await self._check(
            keys=[self.keys.live], args=[_pack(items), *self.keys.script_prefixes(), self._ttl]
        )
        return [
            RingCheck(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
