"""The fault rows' input: a tick stream with feed duplicates, gaps, reorders and bad messages,
and the truth it implies.

Per instrument the feed numbers ticks 1, 2, 3, ... and then:
- drops a sequence for good (a *hole*: the processor must record it as an open gap and flag
  the next tick ``STALE``);
- swaps a tick with the next one of its instrument (a *reorder*: q+1 arrives before q, so
  q+1 is ``STALE`` and q fills the gap it opened as ``RECOVERED``; the gap closes);
- sends a valid tick again on feed ``B`` a few messages later (a *duplicate*: never a second
  row);
- every ``bad_every`` messages, a unique undecodable message (it must reach the DLQ).
Events keep a distance of a few sequences per instrument so their expected outcomes do not
overlap, sequence 1 is always sent (the first tick of a day starts the count), and a drop at
the end of an instrument's sequence is not a hole (nothing after it can reveal it).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from dataclasses import dataclass, field

from nadi.codec import encode
from nadi.tick import Tick
from nadi.times import IST, NS

TOKENS = (738561, 408065, 2953217, 341249, 1270529, 779521, 424961, 2714625, 60417, 225537)
OK, STALE, RECOVERED = "OK", "STALE", "RECOVERED"
Key = tuple[int, int]  # (instrument_token, sequence_id)


def start_ns(n: int, spacing_ns: int) -> int:
    """An hour ago, unless the stream would then cross an IST midnight (sequences restart per
    trading day): then just after that midnight."""
    start = time.time_ns() - 3600 * NS
    end = start + n * spacing_ns
    d0 = dt.datetime.fromtimestamp(start / NS, IST).date()
    d1 = dt.datetime.fromtimestamp(end / NS, IST).date()
    if d0 != d1:
        midnight = dt.datetime.combine(d1, dt.time(), IST)
        start = int(midnight.timestamp()) * NS + NS
    return start


@dataclass
class Stream:
    """Messages in send order and what the platform must make of them."""

    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    expected: dict[Key, tuple[int, str]] = field(default_factory=dict)  # -> (ts_us, status)
    holes: set[Key] = field(default_factory=set)
    reorders: int = 0
    duplicates: int = 0
    bad: set[bytes] = field(default_factory=set)  # values of the bad messages

    @property
    def sent(self) -> int:
        return len(self.messages)

    def per_token(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for token, seq in self.expected:
            out.setdefault(token, []).append(seq)
        for seqs in out.values():
            seqs.sort()
        return out


def _tick(token: int, seq: int, ts_ns: int, rng: random.Random) -> Tick:
    price = round(100 + rng.random() * 5, 2)
    qty = rng.randint(1, 50)
    return Tick(
        instrument_token=token, sequence_id=seq, exchange_ts=ts_ns, last_price=price,
        exchange="NSE", last_qty=qty, volume=seq * qty, bid=round(price - 0.05, 2),
        ask=round(price + 0.05, 2), bid_qty=10, ask_qty=12, feed="A",
    )  # fmt: skip


def generate(
    n: int,
    *,
    tokens: tuple[int, ...] = TOKENS,
    dup_rate: float = 0.2,
    gap_rate: float = 0.002,
    reorder_rate: float = 0.003,
    bad_every: int = 1000,
    seed: int = 1,
    spacing_ns: int = 1_000_000,
) -> Stream:
    """``n`` sequence numbers over ``tokens`` (holes included), ~1 ms apart in exchange time."""
    rng = random.Random(seed)
    out = Stream()
    t0 = start_ns(n, spacing_ns)
    seqs = dict.fromkeys(tokens, 0)
    last_event = dict.fromkeys(tokens, -10)  # sequence of each instrument's last hole/reorder
    pending_hole: dict[int, int] = {}  # token -> dropped seq, a hole once a later tick is sent
    held: dict[int, tuple[Tick, int]] = {}  # token -> tick waiting to go after its successor
    pending_b: list[tuple[int, tuple[bytes | None, bytes]]] = []
    bad_n = 0

    def send(t: Tick, i: int, status: str) -> None:
        key = (t.instrument_token, t.sequence_id)
        out.expected[key] = (t.exchange_ts // 1000, status)
        k = str(t.instrument_token).encode()
        out.messages.append((k, encode(t, "A")))
        if rng.random() < dup_rate:
            out.duplicates += 1
            pending_b.append((i + rng.randint(1, 5), (k, encode(t, "B"))))
            pending_b.sort(key=lambda p: p[0])

    for i in range(n):
        token = rng.choice(tokens)
        seqs[token] += 1
        seq = seqs[token]
        t = _tick(token, seq, t0 + i * spacing_ns, rng)
        quiet = seq - last_event[token] >= 4 and token not in held and token not in pending_hole
        if seq > 1 and quiet and rng.random() < gap_rate:
            pending_hole[token] = seq
            last_event[token] = seq
            continue
        if seq > 1 and quiet and rng.random() < reorder_rate:
            held[token] = (t, i)
            last_event[token] = seq
            continue
        hole = pending_hole.pop(token, None)
        if hole is not None:
            out.holes.add((token, hole))
            send(t, i, STALE)
        elif token in held:
            late, _ = held.pop(token)
            send(t, i, STALE)  # q+1 before q: a gap of one, for now
            send(late, i, RECOVERED)
            out.reorders += 1
        else:
            send(t, i, OK)
        while pending_b and pending_b[0][0] <= i:
            out.messages.append(pending_b.pop(0)[1])
        if bad_every and i % bad_every == bad_every // 2:
            bad_n += 1
            value = json.dumps({"instrument_token": "x", "bad": bad_n}).encode()
            out.bad.add(value)
            out.messages.append((str(token).encode(), value))
    for t, _ in held.values():  # nothing came after it: just in order
        out.expected[(t.instrument_token, t.sequence_id)] = (t.exchange_ts // 1000, OK)
        out.messages.append((str(t.instrument_token).encode(), encode(t, "A")))
    out.messages.extend(m for _, m in pending_b)
    return out
