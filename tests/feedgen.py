"""A small, explicit tick feed for processor tests: the truth is easy to state.

(The product's simulator lives in streaming/simulator; processor tests use this instead so a
failure points at the processor, not at the simulator.)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from nadi.codec import encode
from nadi.tick import Tick
from nadi.times import NS


def tick(
    token: int, seq: int, ts_ns: int, price: float = 100.0, qty: int = 1, feed: str = "A"
) -> Tick:
    return Tick(
        instrument_token=token, sequence_id=seq, exchange_ts=ts_ns, last_price=price,
        exchange="NSE", last_qty=qty, volume=seq * qty, bid=price - 0.05, ask=price + 0.05,
        bid_qty=10, ask_qty=12, feed=feed,
    )  # fmt: skip


def msg(t: Tick, feed: str | None = None) -> tuple[bytes, bytes]:
    return str(t.instrument_token).encode(), encode(t, feed)


@dataclass
class Feed:
    """``n`` ticks over ``tokens``; each valid tick is sent on feed A and, with ``dup_rate``,
    again on feed B a few messages later; ``gap_rate`` drops a sequence on both feeds;
    ``reorder_rate`` holds a tick back until a few later messages went (it fills the gap it
    opened: stored RECOVERED)."""

    tokens: list[int]
    n: int
    dup_rate: float = 0.3
    gap_rate: float = 0.0
    reorder_rate: float = 0.0
    bad_every: int = 0
    seed: int = 7
    start_ns: int = field(default_factory=lambda: time.time_ns() - 3600 * NS)
    unique: set[tuple[int, int, int]] = field(default_factory=set)  # (token, seq, ts_us)
    dropped: dict[int, list[int]] = field(default_factory=dict)
    reordered: set[tuple[int, int]] = field(default_factory=set)  # (token, seq)

    def messages(self) -> list[tuple[bytes | None, bytes]]:
        rng = random.Random(self.seed)
        seqs = dict.fromkeys(self.tokens, 0)
        out: list[tuple[bytes | None, bytes]] = []
        pending_b: list[tuple[int, tuple[bytes, bytes]]] = []
        for i in range(self.n):
            token = rng.choice(self.tokens)
            seqs[token] += 1
            seq = seqs[token]
            ts = self.start_ns + i * 1000 * 1000  # 1 ms apart
            if rng.random() < self.gap_rate:
                self.dropped.setdefault(token, []).append(seq)
                continue
            t = tick(token, seq, ts, price=round(100 + rng.random() * 5, 2), qty=rng.randint(1, 50))
            self.unique.add((token, seq, ts // 1000))
            if self.reorder_rate and rng.random() < self.reorder_rate:
                self.reordered.add((token, seq))
                pending_b.append((i + rng.randint(2, 6), msg(t, "A")))
                pending_b.sort(key=lambda p: p[0])
                continue
            out.append(msg(t, "A"))
            if rng.random() < self.dup_rate:
                pending_b.append((i + rng.randint(1, 5), msg(t, "B")))
                pending_b.sort(key=lambda p: p[0])
            while pending_b and pending_b[0][0] <= i:
                out.append(pending_b.pop(0)[1])
            if self.bad_every and i % self.bad_every == 0:
                out.append((str(token).encode(), b'{"instrument_token": "x"}'))
        out.extend(m for _, m in pending_b)
        return out
