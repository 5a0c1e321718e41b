"""Redundant feeds A/B, gaps, reorders and bad packets: the truth the processor tests rely on."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date

import pytest

from nadi.codec import Rejected, TickCodec, encode
from nadi.instruments import bundled_instruments
from nadi.tick import Tick
from streaming.simulator.feed import EXPECTED_REASON, BadKind, FeedMessage, FeedSimulator, make_bad
from streaming.simulator.generator import DayGenerator

DAY = date(2026, 11, 20)
INSTS = bundled_instruments(DAY)[:6] + [
    i for i in bundled_instruments(DAY) if i.instrument_type == "FUT"
]
codec = TickCodec()


def _run(
    n: int = 20_000, seed: int = 5, **rates: float
) -> tuple[list[Tick], list[FeedMessage], FeedSimulator]:
    gen = DayGenerator(INSTS, seed, DAY, density=5.0)
    ticks = list(gen.stream(max_ticks=n))
    feed = FeedSimulator(seed, DAY, **rates)
    return ticks, list(feed.messages(ticks)), feed


def test_every_tick_on_both_feeds_b_slightly_later() -> None:
    ticks, msgs, feed = _run()
    a = [m for m in msgs if m.feed == "A"]
    b = [m for m in msgs if m.feed == "B"]
    assert [m.tick for m in a] == ticks and len(b) == len(ticks)
    assert Counter(m.tick for m in b) == Counter(ticks)
    pos = {(m.feed, m.tick): i for i, m in enumerate(msgs)}
    lags = [pos[("B", t)] - pos[("A", t)] for t in ticks]
    assert min(lags) >= 1 and max(lags) <= 10 and len(set(lags)) > 2  # jitter, not a fixed lag
    for m in msgs[:500]:
        assert m.tick is not None
        assert m.key == str(m.tick.instrument_token).encode()
        assert m.value == encode(m.tick, m.feed)
        assert codec.decode(m.value, m.key, now_ns=m.tick.exchange_ts) == Tick(
            **{**{f: getattr(m.tick, f) for f in Tick.__struct_fields__}, "feed": m.feed}
        )
    assert feed.stats.sent == {"A": len(ticks), "B": len(ticks)}


def test_partial_duplication() -> None:
    ticks, msgs, feed = _run(dup_rate=0.3)
    nb = sum(1 for m in msgs if m.feed == "B")
    assert 0.25 * len(ticks) < nb < 0.35 * len(ticks) and feed.stats.sent["B"] == nb
    _, msgs0, _ = _run(dup_rate=0.0)
    assert all(m.feed == "A" for m in msgs0)


def test_gaps_drop_the_sequence_on_both_feeds() -> None:
    ticks, msgs, feed = _run(gap_rate=0.02)
    dropped = {(tok, s) for tok, seqs in feed.stats.dropped.items() for s in seqs}
    assert 0.01 * len(ticks) < len(dropped) < 0.03 * len(ticks) == 0.03 * feed.stats.ticks_in
    sent = {(m.tick.instrument_token, m.tick.sequence_id) for m in msgs if m.tick is not None}
    assert not sent & dropped
    assert sent | dropped == {(t.instrument_token, t.sequence_id) for t in ticks}
    assert feed.stats.unique_sent == len(sent) == len(ticks) - len(dropped)


def test_reorders_swap_neighbours_of_one_instrument() -> None:
    ticks, msgs, feed = _run(reorder_rate=0.05)
    per: dict[int, list[int]] = defaultdict(list)
    for m in msgs:
        if m.feed == "A" and m.tick is not None:
            per[m.tick.instrument_token].append(m.tick.sequence_id)
    swaps = 0
    for seqs in per.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))  # nothing lost or duplicated
        i = 0
        while i < len(seqs) - 1:
            if seqs[i] > seqs[i + 1]:
                assert seqs[i] == seqs[i + 1] + 1  # an adjacent swap, nothing wilder
                swaps += 1
                i += 2
            else:
                i += 1
    assert swaps == feed.stats.reordered and 0.03 * len(ticks) < swaps < 0.07 * len(ticks)


def test_feed_is_deterministic_for_a_seed() -> None:
    rates: dict[str, float] = {
        "gap_rate": 0.01,
        "reorder_rate": 0.01,
        "bad_rate": 0.01,
        "dup_rate": 0.5,
    }
    _, a, _ = _run(5_000, 5, **rates)
    _, b, _ = _run(5_000, 5, **rates)
    assert a == b
    _, c, _ = _run(5_000, 6, **rates)
    assert [m.value for m in a] != [m.value for m in c]


def test_every_bad_kind_is_produced_and_rejected_for_its_reason() -> None:
    ticks, msgs, feed = _run(bad_rate=0.05, gap_rate=0.01, reorder_rate=0.01)
    bad = [m for m in msgs if m.bad_kind is not None]
    assert {m.bad_kind for m in bad} == set(BadKind)
    assert sum(feed.stats.bad.values()) == len(bad) and feed.stats.bad[BadKind.OVERSIZED.value] > 0
    now = ticks[-1].exchange_ts + 1_000_000_000  # a consumer reading just after the feed
    for m in bad:
        assert m.tick is None and m.feed == "A" and m.bad_kind is not None
        with pytest.raises(Rejected) as e:
            codec.decode(m.value, m.key, now_ns=now)
        assert e.value.reason == EXPECTED_REASON[m.bad_kind], (m.bad_kind, m.value[:120])
    good = [m for m in msgs if m.tick is not None]
    for m in good:
        assert m.tick is not None
        assert (
            codec.decode(m.value, m.key, now_ns=now).payload_fingerprint()
            == m.tick.payload_fingerprint()
        )
    # bad packets take no sequence numbers: every generated tick is still sent or dropped
    dropped = sum(len(v) for v in feed.stats.dropped.values())
    assert len(
        {(m.tick.instrument_token, m.tick.sequence_id) for m in good if m.tick}
    ) + dropped == len(ticks)


@pytest.mark.parametrize("kind", list(BadKind))
def test_each_bad_kind_alone(kind: BadKind) -> None:
    t = Tick(408065, 9, 1_795_146_303_242_043_198, 1550.1, "NSE", 3, 30, None, 1550.0, 1550.2, 5, 6)
    key, value = make_bad(kind, t)
    with pytest.raises(Rejected) as e:
        codec.decode(value, key, now_ns=t.exchange_ts)
    assert e.value.reason == EXPECTED_REASON[kind]
    assert (key == b"408065") == (kind is not BadKind.KEY_MISMATCH)


def test_rates_are_validated() -> None:
    with pytest.raises(ValueError):
        FeedSimulator(1, DAY, gap_rate=1.5)
