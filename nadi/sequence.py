"""SequenceTracker: per instrument and trading day, decide each new tick's status.

Pure logic over a snapshot of the last sequence id per (token, day); the caller loads that
snapshot from Redis (falling back to the database) and stores the new state only after the
batch is durable, so a redelivered batch is classified exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nadi.tick import Tick

Key = tuple[int, int]  # (instrument_token, trading day ordinal)

OK, STALE, RECOVERED, LATE = "OK", "STALE", "RECOVERED", "LATE"


@dataclass
class Gap:
    token: int
    day: int
    from_seq: int
    to_seq: int

    def __contains__(self, seq: int) -> bool:
        return self.from_seq <= seq <= self.to_seq


@dataclass
class Classified:
    """Result of one batch. ``statuses[i]`` belongs to the i-th input tick.

    ``LATE`` means older than the last sequence but not inside a gap seen in this batch: the
    database decides (inside an open gap there: ``RECOVERED``; its sequence already stored:
    dropped; else ``OK``).
    """

    statuses: list[str] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    last: dict[Key, int] = field(default_factory=dict)


def classify(
    ticks: Sequence[Tick], last_known: Mapping[Key, int | None], keys: Sequence[Key] | None = None
) -> Classified:
    """Assign OK/STALE/RECOVERED/LATE in arrival order; ticks must be unique per (key, seq).
    ``keys`` are the ticks' (token, day) if the caller has them already."""
    out = Classified()
    state: dict[Key, int | None] = dict(last_known)
    batch_gaps: dict[Key, list[Gap]] = {}
    if keys is None:
        keys = [(t.instrument_token, t.trading_day_ordinal) for t in ticks]
    for t, key in zip(ticks, keys, strict=True):
        seq = t.sequence_id
        last = state.get(key)
        if last is None or seq == last + 1:
            status = OK  # the first tick of a day starts a new count
            state[key] = seq
        elif seq > last + 1:
            gap = Gap(key[0], key[1], last + 1, seq - 1)
            out.gaps.append(gap)
            batch_gaps.setdefault(key, []).append(gap)
            status = STALE
            state[key] = seq
        else:
            in_batch_gap = any(seq in g for g in batch_gaps.get(key, ()))
            status = RECOVERED if in_batch_gap else LATE
        out.statuses.append(status)
    out.last = {k: v for k, v in state.items() if v is not None and v != last_known.get(k)}
    return out
