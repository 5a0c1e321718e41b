"""The whole matrix: every row, in one order, on one private stack."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from bench.faults.engine import Row, run_row
from bench.faults.rows import ROWS
from bench.faults.stack import FaultStack
from nadi.settings import Settings

ALL_ROWS: dict[str, Row] = dict(ROWS)


async def run_rows(
    base: Settings, names: list[str], n: int, *, stop: bool = True
) -> dict[str, Any]:
    stack = FaultStack(base)
    t0 = time.monotonic()
    await asyncio.to_thread(stack.start)
    startup_s = round(time.monotonic() - t0, 1)
    out: dict[str, Any] = {}
    try:
        for name in names:
            figures = await run_row(stack, ALL_ROWS[name], n)
            print(json.dumps(figures), file=sys.stderr, flush=True)  # progress
            out[name] = figures
    finally:
        if stop:
            await asyncio.to_thread(stack.stop)
    return {
        "n": n,
        "startup_s": startup_s,
        "total_s": round(time.monotonic() - t0, 1),
        "failed": [k for k, v in out.items() if v["problems"]],
        "rows": out,
    }
