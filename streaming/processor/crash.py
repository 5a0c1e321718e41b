"""Named crash points: the worker SIGKILLs itself at a chosen point, for tests only.

``NADI_FAULT=<point>:<n>`` (Settings.fault) kills the process the n-th time (n >= 1) it
reaches ``<point>``. Points, in a batch's life:

- ``after_decode``: a batch was decoded, nothing of it written.
- ``after_ring_write``: a ring append returned (in-order ticks go to the ring before the
  database; late ones after it), before the offset commit.
- ``after_db_commit``: the database transaction committed, before the rest of the batch's
  ring write (its late ticks) and before the offset commit.
- ``mid_group_commit``: in a database group commit that merged >= 2 batches, after the write
  and before its parts are resolved.
- ``in_rebalance``: inside ``on_partitions_revoked`` / ``on_partitions_assigned`` (the
  first join calls both, revoked with nothing: n=3 is the first real revocation).
- ``after_dlq_produce``: a batch's dead letters were produced and acknowledged, before the
  offset commit.

Disabled (the default), the worker holds ``None`` instead of a CrashPoints and each point is
one ``is not None`` test per batch.
"""

from __future__ import annotations

import os
import signal
from typing import Final, Literal, get_args

Point = Literal[
    "after_decode",
    "after_db_commit",
    "after_ring_write",
    "mid_group_commit",
    "in_rebalance",
    "after_dlq_produce",
]
POINTS: Final = frozenset(get_args(Point))


class CrashPoints:
    """Counts arrivals at the configured point and SIGKILLs the process at the n-th."""

    def __init__(self, point: str, n: int) -> None:
        if point not in POINTS:
            raise ValueError(f"NADI_FAULT: unknown crash point {point!r} (one of {sorted(POINTS)})")
        if n < 1:
            raise ValueError("NADI_FAULT: n must be >= 1")
        self.point = point
        self.n = n
        self.reached = 0

    @classmethod
    def parse(cls, spec: str | None) -> CrashPoints | None:
        """``"<point>:<n>"`` -> CrashPoints; None or empty -> None (disabled)."""
        if not spec:
            return None
        point, sep, n = spec.rpartition(":")
        if not sep or not n.isdigit():
            raise ValueError(f"NADI_FAULT must be <point>:<n>, got {spec!r}")
        return cls(point, int(n))

    def reach(self, point: Point) -> None:
        if point != self.point:
            return
        self.reached += 1
        if self.reached == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
