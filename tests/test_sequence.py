"""Pure logic: the SequenceTracker's classification."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nadi.sequence import LATE, OK, RECOVERED, STALE, classify
from nadi.tick import Tick
from nadi.times import NS

BASE = 1_795_500_000 * NS


def _t(seq: int, token: int = 1, day_shift: int = 0) -> Tick:
    return Tick(token, seq, BASE + day_shift * 86400 * NS + seq * 1000, 10.0)


def test_in_order_then_gap_then_late_fill() -> None:
    c = classify([_t(s) for s in (1, 2, 5, 3, 6)], {})
    assert c.statuses == [OK, OK, STALE, RECOVERED, OK]
    assert [(g.from_seq, g.to_seq) for g in c.gaps] == [(3, 4)]
    assert c.last[(1, _t(1).trading_day_ordinal)] == 6


def test_state_from_previous_batch_detects_gap_at_batch_start() -> None:
    key = (1, _t(1).trading_day_ordinal)
    c = classify([_t(9), _t(10)], {key: 7})
    assert c.statuses == [STALE, OK] and [(g.from_seq, g.to_seq) for g in c.gaps] == [(8, 8)]


def test_older_than_state_outside_batch_gaps_is_late() -> None:
    key = (1, _t(1).trading_day_ordinal)
    assert classify([_t(3)], {key: 7}).statuses == [LATE]


def test_first_tick_of_a_day_starts_a_new_count() -> None:
    key = (1, _t(1).trading_day_ordinal)
    c = classify([_t(1, day_shift=1), _t(2, day_shift=1)], {key: 500})
    assert c.statuses == [OK, OK] and not c.gaps


def test_instruments_are_independent() -> None:
    c = classify([_t(1, token=1), _t(1, token=2), _t(3, token=1), _t(2, token=2)], {})
    assert c.statuses == [OK, OK, STALE, OK]


@given(st.lists(st.integers(1, 200), min_size=1, max_size=200, unique=True))
def test_gaps_cover_exactly_the_holes_below_the_max(seqs: list[int]) -> None:
    c = classify([_t(s) for s in seqs], {})
    holes = {q for g in c.gaps for q in range(g.from_seq, g.to_seq + 1)}
    first, top = seqs[0], max(seqs)
    # Everything between the first tick and the max that was not seen before the max arrived
    # lies in a recorded gap; nothing seen before its gap was opened is in a gap.
    assert holes <= set(range(first + 1, top))
    assert set(range(first + 1, top)) - set(seqs) <= holes
    assert c.statuses.count(STALE) == len(c.gaps)
