"""`nadi up`: run the platform's processes together, prefix their logs, stop all on Ctrl-C.

Processes are children of this one and are owned explicitly: a child that exits unexpectedly
is restarted with backoff; SIGINT/SIGTERM stops every child (SIGTERM, then SIGKILL after a
grace period) before returning.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Component:
    """One process of the platform: a name for its log prefix and its command line."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    prefix = f"{name:>10} | ".encode()
    while line := await stream.readline():
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


async def _run_one(c: Component, stop: asyncio.Event, grace_s: float) -> None:
    import os

    backoff = 1.0
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            *c.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **c.env},
        )
        assert proc.stdout is not None
        pump = asyncio.create_task(_pump(c.name, proc.stdout))
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        stopper.cancel()
        await pump
        if stop.is_set():
            return
        print(
            f"{c.name:>10} | exited with {proc.returncode}; restarting in {backoff:.0f}s",
            flush=True,
        )
        try:
            await asyncio.wait_for(stop.wait(), backoff)
        except TimeoutError:
            pass
        backoff = min(backoff * 2, 30.0)


async def supervise(components: list[Component], grace_s: float = 20.0) -> None:
    """Run every component until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.gather(*(_run_one(c, stop, grace_s) for c in components))
