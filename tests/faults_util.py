"""The fault matrix in `make test`: one private fault stack for the session, rows at the
reduced size. (The engine and the rows live in bench/faults; `nadi bench faults` runs them at
full size.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bench.faults.engine import run_row
from bench.faults.rows import ROWS
from bench.faults.stack import FaultStack
from nadi.settings import Settings

CI_TICKS = 20_000  # sequence numbers per row's stream (the floor for `make test`)

_lock = threading.Lock()
_stack: FaultStack | None = None
_users = 0


@pytest.fixture(scope="session")
def fault_stack(settings: Settings) -> Iterator[FaultStack]:
    """The private stack (own PostgreSQL, Redis, Kafka, Toxiproxy), started once however many
    modules use it, stopped after the last. A missing tool fails here, loudly."""
    global _stack, _users
    with _lock:
        if _stack is None:
            stack = FaultStack(settings)
            stack.start()
            _stack = stack
        _users += 1
        stack = _stack
    try:
        yield stack
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                stack.stop()
                _stack = None


async def run_and_check(stack: FaultStack, name: str) -> dict[str, Any]:
    """Run row ``name`` from a clean state; fail with its figures unless it had no problem."""
    figures = await run_row(stack, ROWS[name], CI_TICKS)
    line = json.dumps(figures)
    print(line)
    out = stack.home / "rows" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    assert figures["problems"] == [], line
    return figures
