"""The fault matrix (issue 8): each row drives a stream with feed duplicates, holes, reorders
and bad messages through real `nadi process` workers on a private stack, applies its fault,
waits until the group has caught up and compares rows, gaps, STALE flags, rings and the DLQ
with what was sent. Crash-point rows are in test_processor_crash.py."""

from __future__ import annotations

import pytest

from bench.faults.rows import ROWS
from bench.faults.stack import FaultStack
from tests.faults_util import fault_stack, run_and_check

pytestmark = pytest.mark.slow
__all__ = ["fault_stack"]

ROW_NAMES = [name for name in ROWS if not name.startswith("sigkill_")]


@pytest.mark.parametrize("row", ROW_NAMES)
async def test_fault_row(fault_stack: FaultStack, row: str) -> None:
    await run_and_check(fault_stack, row)
