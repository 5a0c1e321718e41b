"""A worker SIGKILLed at each named crash point (NADI_FAULT=<point>:<n>) while a stream with
feed duplicates, holes, reorders and bad messages flows through two workers: afterwards
every valid tick is stored once with its true status, the gaps are exactly the feed's holes,
each ring is a gap-free tail of its stored ticks without duplicates, and every bad message
is on the DLQ (at least once). The rows are the fault matrix's (bench/faults/rows.py)."""

from __future__ import annotations

import pytest

from bench.faults.rows import CRASH_POINTS
from bench.faults.stack import FaultStack
from tests.faults_util import fault_stack, run_and_check

pytestmark = pytest.mark.slow
__all__ = ["fault_stack"]


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
async def test_sigkill_at_crash_point(fault_stack: FaultStack, point: str) -> None:
    figures = await run_and_check(fault_stack, f"sigkill_{point}")
    assert figures["killed_at"] < 1.0  # the kill came while the stream still flowed
