"""Redundant exchange feeds A and B over one tick stream, with gaps, reorders and bad packets.

Every tick goes out on feed A; with probability ``dup_rate`` a copy goes out on feed B a few
messages later (jitter). A gap drops a sequence on *both* feeds (a real gap, only the recovery
server has it). A reorder swaps a tick with the next sent tick of the same instrument. Bad
messages (DESIGN.md section 4 rejections) are inserted between ticks and consume no sequence
numbers. All choices come from a ``random.Random`` seeded by ``(seed, trading_day)``: the same
inputs give the same messages, so tests know the truth.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import NamedTuple

import msgspec

from nadi.codec import Reason, encode
from nadi.tick import Tick
from nadi.times import NS


class BadKind(StrEnum):
    """Malformed message kinds the feed injects, one per rejection of DESIGN.md section 4."""

    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    STRING_NUMBER = "string_number"
    BOOL_NUMBER = "bool_number"
    NAN = "nan"
    INFINITY = "infinity"
    NON_POSITIVE_PRICE = "non_positive_price"
    NEGATIVE_SEQUENCE = "negative_sequence"
    ISO_NO_OFFSET = "iso_no_offset"
    UNPARSEABLE_TS = "unparseable_ts"
    FUTURE_TS = "future_ts"
    EXPIRED_TS = "expired_ts"
    OVERSIZED = "oversized"
    BAD_UTF8 = "bad_utf8"
    KEY_MISMATCH = "key_mismatch"


# The codec's verdict each kind must get (with ``now`` near the tick's exchange_ts).
EXPECTED_REASON: dict[BadKind, Reason] = {
    BadKind.BAD_JSON: Reason.BAD_JSON,
    BadKind.NOT_OBJECT: Reason.NOT_OBJECT,
    BadKind.MISSING_FIELD: Reason.MISSING_FIELD,
    BadKind.STRING_NUMBER: Reason.WRONG_TYPE,
    BadKind.BOOL_NUMBER: Reason.WRONG_TYPE,
    BadKind.NAN: Reason.NON_FINITE,
    BadKind.INFINITY: Reason.NON_FINITE,
    BadKind.NON_POSITIVE_PRICE: Reason.OUT_OF_RANGE,
    BadKind.NEGATIVE_SEQUENCE: Reason.OUT_OF_RANGE,
    BadKind.ISO_NO_OFFSET: Reason.BAD_TIMESTAMP,
    BadKind.UNPARSEABLE_TS: Reason.BAD_TIMESTAMP,
    BadKind.FUTURE_TS: Reason.FUTURE_TIMESTAMP,
    BadKind.EXPIRED_TS: Reason.EXPIRED_TIMESTAMP,
    BadKind.OVERSIZED: Reason.TOO_LARGE,
    BadKind.BAD_UTF8: Reason.BAD_ENCODING,
    BadKind.KEY_MISMATCH: Reason.KEY_MISMATCH,
}
_KINDS = tuple(BadKind)
_DAY_NS = 86_400 * NS
B_JITTER_MAX = 4  # feed B lags feed A by 0..4 messages


class FeedMessage(NamedTuple):
    """One Kafka record: ``tick`` is set for a valid tick, ``bad_kind`` for an injected fault.

    A NamedTuple, not a dataclass: hundreds of thousands are built per second.
    """

    key: bytes
    value: bytes
    feed: str  # "A" or "B"
    tick: Tick | None
    bad_kind: BadKind | None = None


@dataclass(slots=True)
class FeedStats:
    """What the feed did. ``sent``: messages per feed (bad ones included, all on A);
    ``unique_sent``: distinct valid ticks sent; ``dropped``: token -> sequences dropped on both
    feeds; ``bad``: injected messages per :class:`BadKind` value."""

    ticks_in: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    unique_sent: int = 0
    dropped: defaultdict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    reordered: int = 0
    bad: Counter[str] = field(default_factory=Counter)

    @property
    def gaps(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def summary(self) -> dict[str, object]:
        return {
            "ticks_generated": self.ticks_in,
            "ticks_sent_unique": self.unique_sent,
            "messages_sent": dict(self.sent),
            "gaps": self.gaps,
            "reordered": self.reordered,
            "bad": dict(self.bad),
        }


def _wire_dict(tick: Tick) -> dict[str, object]:
    d: dict[str, object] = msgspec.to_builtins(msgspec.structs.replace(tick, feed="A"))
    return d


def _dumps(d: object) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def make_bad(kind: BadKind, tick: Tick) -> tuple[bytes, bytes]:
    """A malformed (key, value) modelled on a real tick, of the given kind."""
    key = str(tick.instrument_token).encode()
    d = _wire_dict(tick)
    if kind is BadKind.BAD_JSON:
        return key, _dumps(d)[:-7]  # truncated packet
    if kind is BadKind.NOT_OBJECT:
        return key, _dumps([tick.instrument_token, tick.sequence_id, tick.last_price])
    if kind is BadKind.MISSING_FIELD:
        del d["last_price"]
    elif kind is BadKind.STRING_NUMBER:
        d["last_price"] = str(tick.last_price)
    elif kind is BadKind.BOOL_NUMBER:
        d["sequence_id"] = True
    elif kind is BadKind.NAN:
        d["last_price"] = float("nan")  # json.dumps writes the NaN literal
    elif kind is BadKind.INFINITY:
        return key, _dumps(d).replace(b'"last_price":', b'"last_price":1e999,"x":', 1)
    elif kind is BadKind.NON_POSITIVE_PRICE:
        d["last_price"] = 0.0
    elif kind is BadKind.NEGATIVE_SEQUENCE:
        d["sequence_id"] = -1
    elif kind is BadKind.ISO_NO_OFFSET:
        naive = datetime.fromtimestamp(tick.exchange_ts / NS, UTC).replace(tzinfo=None)
        d["exchange_ts"] = naive.isoformat()
    elif kind is BadKind.UNPARSEABLE_TS:
        d["exchange_ts"] = "yesterday 10:15"
    elif kind is BadKind.FUTURE_TS:
        d["exchange_ts"] = tick.exchange_ts + 3650 * _DAY_NS  # ten years ahead
    elif kind is BadKind.EXPIRED_TS:
        d["exchange_ts"] = tick.exchange_ts - 30 * _DAY_NS  # a month old
    elif kind is BadKind.OVERSIZED:
        d["padding"] = "x" * 5000
    elif kind is BadKind.BAD_UTF8:
        # The same tick encoded as UTF-16 with a BOM: a mis-configured upstream encoder.
        return key, json.dumps(d).encode("utf-16")
    elif kind is BadKind.KEY_MISMATCH:
        key = str(tick.instrument_token + 1).encode()
    return key, _dumps(d)


class FeedSimulator:
    """Turns a tick stream into :class:`FeedMessage` s; ``stats`` tracks the truth.

    Rates are probabilities per tick: ``dup_rate`` (copy on feed B), ``gap_rate`` (drop on both
    feeds), ``reorder_rate`` (swap with the instrument's next sent tick), ``bad_rate`` (insert
    one malformed message before the tick; kinds cycle through :class:`BadKind`).
    """

    def __init__(
        self,
        seed: int,
        trading_day: date,
        *,
        dup_rate: float = 1.0,
        gap_rate: float = 0.0,
        reorder_rate: float = 0.0,
        bad_rate: float = 0.0,
    ) -> None:
        for name, r in (("dup_rate", dup_rate), ("gap_rate", gap_rate),
                        ("reorder_rate", reorder_rate), ("bad_rate", bad_rate)):  # fmt: skip
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        self.dup_rate = dup_rate
        self.gap_rate = gap_rate
        self.reorder_rate = reorder_rate
        self.bad_rate = bad_rate
        self._rnd = random.Random(f"nadi-feed:{seed}:{trading_day.isoformat()}")
        self.stats = FeedStats()
        self._bad_i = 0

    def messages(self, ticks: Iterable[Tick]) -> Iterator[FeedMessage]:
        """The feed's messages in send order (B copies interleaved with their jitter)."""
        # Hot path (>100k ticks/s): one encode per tick, the B copy derived from the A bytes.
        rnd = self._rnd.random
        st = self.stats
        sent = st.sent
        dup, gap, reorder, bad = self.dup_rate, self.gap_rate, self.reorder_rate, self.bad_rate
        held: dict[int, Tick] = {}  # token -> tick waiting to be swapped behind its successor
        pending_b: list[tuple[int, int, FeedMessage]] = []  # (due index, tie, message)
        push, pop = heapq.heappush, heapq.heappop
        idx = 0
        for t in ticks:
            st.ticks_in += 1
            if bad and rnd() < bad:
                kind = _KINDS[self._bad_i % len(_KINDS)]
                self._bad_i += 1
                k, v = make_bad(kind, t)
                st.bad[kind.value] += 1
                sent["A"] += 1
                yield FeedMessage(k, v, "A", None, kind)
            if gap and rnd() < gap:
                st.dropped[t.instrument_token].append(t.sequence_id)
                continue
            prev = held.pop(t.instrument_token, None)
            if prev is None:
                if reorder and rnd() < reorder:
                    held[t.instrument_token] = t
                    st.reordered += 1
                    continue
                out: tuple[Tick, ...] = (t,)
            else:
                out = (t, prev)
            for x in out:
                key = str(x.instrument_token).encode()
                va = encode(x, "A")
                yield FeedMessage(key, va, "A", x, None)
                st.unique_sent += 1
                sent["A"] += 1
                if dup >= 1.0 or (dup and rnd() < dup):
                    # encode() writes ``feed`` last: ...,"feed":"A"}  ->  ...,"feed":"B"}
                    vb = va[:-3] + b'B"}'
                    push(pending_b, (idx + int(rnd() * (B_JITTER_MAX + 1)), idx,
                                     FeedMessage(key, vb, "B", x, None)))  # fmt: skip
                idx += 1
                while pending_b and pending_b[0][0] <= idx:
                    sent["B"] += 1
                    yield pop(pending_b)[2]
        for t in held.values():  # nothing followed them: send in place, unswapped
            st.reordered -= 1
            key = str(t.instrument_token).encode()
            va = encode(t, "A")
            sent["A"] += 1
            st.unique_sent += 1
            yield FeedMessage(key, va, "A", t, None)
            if dup >= 1.0 or (dup and rnd() < dup):
                push(pending_b, (idx, idx, FeedMessage(key, va[:-3] + b'B"}', "B", t, None)))
            idx += 1
        while pending_b:
            sent["B"] += 1
            yield pop(pending_b)[2]
