"""GroupCommit: order, merging, size cap and failure propagation (pure asyncio logic)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from streaming.processor.group_commit import GroupCommit


@dataclass(frozen=True)
class _Part:
    name: str
    generation: int = 0
    size: int = 1


class _Sink:
    """Records each write's parts; the first write waits for ``gate`` so others queue up."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail_on: str | None = None

    async def write_many(self, parts: Sequence[_Part]) -> list[str]:
        self.writes.append([p.name for p in parts])
        if len(self.writes) == 1:
            await self.gate.wait()
        if self.fail_on in {p.name for p in parts}:
            raise RuntimeError(f"gave up on {self.fail_on}")
        return [p.name.upper() for p in parts]


async def test_parts_queued_behind_a_write_go_together_in_order() -> None:
    sink = _Sink()
    gc: GroupCommit[_Part, str] = GroupCommit(sink.write_many, max_size=100)
    first = gc.submit(_Part("a"))
    await asyncio.sleep(0)  # "a" is being written
    rest = [gc.submit(_Part(n)) for n in "bcd"]
    sink.gate.set()
    assert await asyncio.gather(first, *rest) == ["A", "B", "C", "D"]
    assert sink.writes == [["a"], ["b", "c", "d"]]
    assert gc.transactions == 2


async def test_a_group_never_exceeds_the_size_cap_but_a_big_part_still_goes() -> None:
    sink = _Sink()
    gc: GroupCommit[_Part, str] = GroupCommit(sink.write_many, max_size=5)
    futs = [gc.submit(_Part("a"))]
    await asyncio.sleep(0)
    futs += [gc.submit(_Part(n, size=s)) for n, s in (("b", 2), ("c", 3), ("d", 1), ("e", 9))]
    sink.gate.set()
    await asyncio.gather(*futs)
    assert sink.writes == [["a"], ["b", "c"], ["d"], ["e"]]


async def test_a_failed_write_fails_its_generation_and_spares_the_next() -> None:
    sink = _Sink()
    sink.fail_on = "a"
    gc: GroupCommit[_Part, str] = GroupCommit(sink.write_many, max_size=1)
    a = gc.submit(_Part("a", generation=1))
    await asyncio.sleep(0)
    b = gc.submit(_Part("b", generation=1))  # queued behind "a", prepared assuming it lands
    c = gc.submit(_Part("c", generation=2))  # prepared after the reset
    sink.gate.set()
    results = await asyncio.gather(a, b, c, return_exceptions=True)
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert results[2] == "C"
    assert sink.writes == [["a"], ["c"]]  # "b" was never written
    late = gc.submit(_Part("late", generation=1))  # an old generation, submitted afterwards
    with pytest.raises(RuntimeError):
        await late
    assert await gc.submit(_Part("d", generation=2)) == "D"


async def test_aclose_cancels_a_write_in_progress_and_what_waits() -> None:
    sink = _Sink()
    gc: GroupCommit[_Part, str] = GroupCommit(sink.write_many, max_size=100)
    a = gc.submit(_Part("a"))
    await asyncio.sleep(0)
    b = gc.submit(_Part("b"))
    await gc.aclose()
    assert a.cancelled() and b.cancelled()
