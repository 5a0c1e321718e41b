"""`nadi up`: run the platform's processes together, prefix their logs, stop all on Ctrl-C.

Processes are children of this one and are owned explicitly: a child that exits unexpectedly
is restarted with backoff; SIGINT/SIGTERM/SIGHUP stops every child (SIGTERM, then SIGKILL after
a grace period) before returning.

Every line a child prints goes to its log file (``<log dir>/<name>.log``); the terminal gets
the lines its :class:`LineRouter` lets through (all of them with ``verbose``), plus the status
line of :mod:`command.status`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


@dataclass(frozen=True)
class Component:
    """One process of the platform: a name for its log prefix and file, its command line, and
    ``quiet``: patterns of lines that go to its log file only (see :class:`LineRouter`)."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    quiet: tuple[str, ...] = ()
    # Stopped, and waited for, before the others: what depends on them (Dagster's runs call
    # the simulator's recovery service and the database) ends while they still serve.
    stop_first: bool = False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ANSI_B = re.compile(rb"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """Without terminal colour codes (Dagster colours its level names)."""
    return _ANSI.sub("", text)


class LineRouter:
    """Whether a line of one component is shown on the terminal. A line matching a ``quiet``
    pattern is not, nor are the indented or blank lines that follow it (a Python warning prints
    the source line and a blank line under its message). Patterns see the line without colour
    codes."""

    def __init__(self, quiet: Sequence[str], verbose: bool = False) -> None:
        self._quiet = re.compile("|".join(f"(?:{p})" for p in quiet)) if quiet else None
        self._verbose = verbose
        self._hiding = False

    def show(self, line: str) -> bool:
        if self._quiet is None:
            return True
        if self._hiding and (line[:1] in (" ", "\t") or not line.strip()):
            return self._verbose
        self._hiding = self._quiet.search(strip_ansi(line)) is not None
        return self._verbose or not self._hiding


class Console:
    """The terminal and the log files, written line by line from one event loop."""

    def __init__(self, log_dir: Path | None, out: BinaryIO | None = None) -> None:
        self._out = out or sys.stdout.buffer
        self._dir = log_dir
        self._files: dict[str, BinaryIO] = {}
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

    def _file(self, name: str) -> BinaryIO | None:
        if self._dir is None:
            return None
        if name not in self._files:
            self._files[name] = (self._dir / f"{name}.log").open("ab")
        return self._files[name]

    def line(self, name: str, line: bytes, show: bool) -> None:
        f = self._file(name)
        if f is not None:
            f.write(_ANSI_B.sub(b"", line))
            f.flush()  # `tail -f` follows it live
        if show:
            self._out.write(f"{name:>14} | ".encode() + line)
            self._out.flush()

    def say(self, name: str, text: str) -> None:
        self.line(name, (text + "\n").encode(), True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


LEFTOVER_GRACE_S = 3.0


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal every process left in the group ``pgid``; False when none is."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def _pump(
    c: Component, stream: asyncio.StreamReader, console: Console, verbose: bool
) -> None:
    router = LineRouter(c.quiet, verbose)
    while line := await stream.readline():
        console.line(c.name, line, router.show(line.decode(errors="replace")))


async def _run_one(
    c: Component, stop: asyncio.Event, grace_s: float, console: Console, verbose: bool
) -> None:
    backoff = 1.0
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(
            *c.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **c.env},
            # Its own process group: the terminal's Ctrl-C reaches this process only, which
            # then stops each child with SIGTERM; a child with children of its own (Dagster's
            # code servers and runs) stops them in its order instead of all dying at once.
            process_group=0,
        )
        assert proc.stdout is not None
        pump = asyncio.create_task(_pump(c, proc.stdout, console, verbose))
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                console.say(c.name, f"no exit within {grace_s:.0f}s of SIGTERM; SIGKILL")
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        stopper.cancel()
        # What the child left behind in its group (a Dagster run worker, a code server) would
        # outlive it and hold its output pipe open: it gets SIGTERM, then SIGKILL.
        if _signal_group(proc.pid, signal.SIGTERM):
            try:
                await asyncio.wait_for(asyncio.shield(pump), LEFTOVER_GRACE_S)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
        await pump
        if stop.is_set():
            console.say(c.name, f"stopped ({proc.returncode})")
            return
        console.say(c.name, f"exited with {proc.returncode}; restarting in {backoff:.0f}s")
        try:
            await asyncio.wait_for(stop.wait(), backoff)
        except TimeoutError:
            pass
        backoff = min(backoff * 2, 30.0)


async def supervise(
    components: list[Component],
    grace_s: float = 20.0,
    *,
    log_dir: Path | None = None,
    verbose: bool = False,
    status: Callable[[Callable[[str], None], asyncio.Event], Coroutine[Any, Any, None]]
    | None = None,
) -> None:
    """Run every component until SIGINT/SIGTERM/SIGHUP, then stop the ``stop_first`` ones,
    then the rest. ``status(emit, stop)``, when given, runs beside them and prints its lines
    through ``emit`` until ``stop`` is set."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: the children are in their own process groups, so a closed terminal reaches
    # only this process, which must then stop them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, signalled.set)
    console = Console(log_dir)
    if log_dir is not None:
        console.say("nadi up", f"logs of every process in {log_dir}/<name>.log")
    waves = [[c for c in components if c.stop_first], [c for c in components if not c.stop_first]]
    stops = [asyncio.Event() for _ in waves]
    running = [
        [asyncio.create_task(_run_one(c, stop, grace_s, console, verbose)) for c in wave]
        for wave, stop in zip(waves, stops, strict=True)
    ]
    side = []
    if status is not None:
        side.append(asyncio.create_task(status(lambda t: console.say("status", t), signalled)))
    try:
        await signalled.wait()
        for stop, tasks in zip(stops, running, strict=True):
            stop.set()
            await asyncio.gather(*tasks)
        await asyncio.gather(*side)
    finally:
        console.close()
