"""The console of `nadi up` (issue 13): the status line (a pure function of two snapshots),
which lines reach the terminal, the log files, the collectors' deadlines, and Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

from command.status import Collector, Snapshot, parse_samples, status_line, stored_rate
from command.supervisor import Console, LineRouter
from command.up import API_QUIET
from nadi.settings import Settings
from pipelines.launch import DAGSTER_QUIET
from tests.rest_util import free_port

WALL = datetime(2026, 12, 2, 4, 0, 5, tzinfo=UTC)  # 09:30:05 IST


def _snap(at: float, **kw: object) -> Snapshot:
    base: dict[str, object] = {
        "at": at,
        "wall": WALL,
        "ticks_in": 0,
        "stored": {"process-1": 0.0, "process-2": 0.0},
        "workers": 2,
        "lag": 0,
        "dlq": 0,
        "gaps_open": 0,
        "gaps_oldest_s": 0.0,
        "gaps_repaired_today": 0,
        "gaps_unrecoverable_today": 0,
        "ws_clients": 3,
        "api_up": True,
        "runs_queued": 0,
        "runs_running": 0,
        "runs_failed_today": 0,
        "sensor_age_s": 12.0,
        "market_open": True,
    }
    return Snapshot(**(base | kw))  # type: ignore[arg-type]


def test_status_line_gives_rates_and_what_matters() -> None:
    prev = _snap(100.0, ticks_in=10_000, dlq=4, stored={"process-1": 2000.0, "process-2": 3000.0})
    cur = _snap(
        105.0,
        ticks_in=20_000,
        dlq=6,
        stored={"process-1": 4500.0, "process-2": 5500.0},
        lag=1234,
        gaps_open=3,
        gaps_oldest_s=75.0,
        gaps_repaired_today=41,
        runs_queued=1,
        runs_running=2,
        runs_failed_today=1,
    )
    assert status_line(prev, cur) == (
        "09:30:05 IST | ticks/s kafka 2,000 stored 1,000 | lag 1,234"
        " | gaps open 3 (oldest 75s) repaired today 41 | ws 3 | dlq 6 (+2)"
        " | runs queued 1 running 2 failed today 1 | market open"
    )


def test_status_line_first_line_and_unknown_figures() -> None:
    cur = _snap(
        5.0,
        ticks_in=None,
        lag=None,
        dlq=None,
        gaps_open=None,
        gaps_repaired_today=None,
        ws_clients=None,
        runs_queued=None,
        runs_running=None,
        runs_failed_today=None,
        market_open=None,
        sensor_age_s=None,
    )
    assert status_line(None, cur) == (
        "09:30:05 IST | ticks/s kafka ? stored ? | lag ? | gaps open ? repaired today ?"
        " | ws ? | dlq ? | runs queued ? running ? failed today ?"
    )


def test_status_line_flags_what_is_down() -> None:
    cur = _snap(
        5.0,
        stored={"process-1": 0.0},
        api_up=False,
        ws_clients=None,
        sensor_age_s=400.0,
        gaps_unrecoverable_today=2,
        gaps_open=1,
        gaps_oldest_s=3 * 3600.0,
        market_open=False,
    )
    line = status_line(_snap(0.0), cur)
    assert "gaps open 1 (oldest 3h) repaired today 0 unrecoverable 2" in line
    assert line.endswith("| !! workers 1/2, api not answering, sensor idle 7m | market closed")


def test_stored_rate_survives_a_worker_restart() -> None:
    prev = _snap(0.0, stored={"process-1": 9000.0, "process-2": 100.0})
    # process-1 restarted (its counter began again), process-2 stored 400
    cur = _snap(2.0, stored={"process-1": 600.0, "process-2": 500.0})
    assert stored_rate(prev, cur) == (600 + 400) / 2
    assert stored_rate(prev, _snap(2.0, stored={})) is None


# Lines as Dagster prints them (colours included) and as uvicorn logs a scrape.
DEBUG_EVENT = (
    "\x1b[32m2026-12-02 16:21:17 +0000\x1b[0m - dagster - \x1b[34mDEBUG\x1b[0m - gap_repair_job"
    ' - c86081db - 7781 - gap_repair - STEP_START - Started execution of step "gap_repair".\n'
)
INFO_EVENT = (
    "\x1b[32m2026-12-02 16:21:17 +0000\x1b[0m - dagster - \x1b[34mINFO\x1b[0m - gap_repair_job"
    " - c86081db - gap_repair - gap 1: repaired (3 inserted)\n"
)
BETA = (
    "\x1b[32m2026-12-02 16:21:00 +0000\x1b[0m - dagster - \x1b[34mWARNING\x1b[0m - /venv/dagster/"
    "_core/decorator_utils.py:232: BetaWarning: Parameter `backfill_policy` of function `asset`"
    " is currently in beta\n"
)
SENSOR_TICK = (
    "\x1b[32m2026-12-02 16:21:02 +0000\x1b[0m - dagster.daemon.SensorDaemon - \x1b[34mINFO\x1b[0m"
    " - Checking for new runs for sensor: gap_repair_sensor\n"
)
LAUNCHED = (
    "2026-12-02 16:21:05 +0000 - dagster.daemon.SensorDaemon - INFO - Completed launch of run"
    " c86081db for gap_repair_sensor\n"
)


def test_dagster_debug_events_and_beta_warnings_stay_off_the_terminal() -> None:
    r = LineRouter(DAGSTER_QUIET)
    shown = [
        line
        for line in [
            DEBUG_EVENT,
            BETA,
            "  return fn(*args, **kwargs)\n",
            "\n",
            SENSOR_TICK,
            INFO_EVENT,
            LAUNCHED,
            "Traceback (most recent call last):\n",
            '  File "x.py", line 1, in <module>\n',
        ]
        if r.show(line)
    ]
    assert shown == [
        INFO_EVENT,
        LAUNCHED,
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1, in <module>\n',
    ]
    verbose = LineRouter(DAGSTER_QUIET, verbose=True)
    assert all(verbose.show(x) for x in (DEBUG_EVENT, BETA, "  return fn()\n", SENSOR_TICK))


def test_api_probe_and_scrape_requests_stay_off_the_terminal() -> None:
    r = LineRouter(API_QUIET)
    assert not r.show('INFO:     127.0.0.1:51234 - "GET /metrics HTTP/1.1" 200 OK\n')
    assert not r.show('INFO:     127.0.0.1:51234 - "GET /readyz HTTP/1.1" 200 OK\n')
    assert r.show('INFO:     127.0.0.1:51234 - "GET /readyz HTTP/1.1" 503 Service Unavailable\n')
    assert r.show('INFO:     127.0.0.1:51234 - "GET /v1/gaps HTTP/1.1" 200 OK\n')


def test_console_writes_every_line_to_the_file_and_shown_ones_to_the_terminal(
    tmp_path: Path,
) -> None:
    out = io.BytesIO()
    c = Console(tmp_path / "logs", out)
    c.line("dagster-daemon", DEBUG_EVENT.encode(), False)
    c.line("dagster-daemon", INFO_EVENT.encode(), True)
    c.say("status", "09:30:05 IST | ticks/s kafka 1")
    c.close()
    daemon = (tmp_path / "logs" / "dagster-daemon.log").read_text()
    assert "\x1b" not in daemon and "STEP_START" in daemon and "gap 1: repaired" in daemon
    assert (tmp_path / "logs" / "status.log").read_text() == "09:30:05 IST | ticks/s kafka 1\n"
    terminal = out.getvalue().decode()
    assert "STEP_START" not in terminal
    assert "dagster-daemon | " in terminal and "        status | 09:30:05 IST" in terminal


def test_parse_samples_reads_labels() -> None:
    m = parse_samples('# TYPE g gauge\ng{status="open"} 3\ng{status="repaired"} 4\n')
    assert m["g"] == [({"status": "open"}, 3.0), ({"status": "repaired"}, 4.0)]


async def test_collect_meets_its_deadline_with_sources_down(settings: Settings) -> None:
    # Nothing listens on these ports; Kafka is the shared broker.
    s = settings.model_copy(
        update={
            "metrics_port": free_port(),
            "demo_workers": 1,
            "api_port": free_port(),
            "exporter_port": free_port(),
        }
    )
    c = Collector(s)
    try:
        t0 = time.monotonic()
        snap = await c.collect(time.monotonic)
        took = time.monotonic() - t0
    finally:
        await c.close()
    assert took < 3.0 + 1.0, took
    assert snap.stored == {} and not snap.api_up and snap.gaps_open is None
    assert snap.workers == 1
    line = status_line(None, snap)
    assert "!! workers 0/1, api not answering" in line


SUPERVISED = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from command.supervisor import Component, supervise

    child = (
        "import signal, sys, time\\n"
        "def bye(*a):\\n"
        "    print('bye', flush=True)\\n"
        "    time.sleep(0.5)\\n"
        "    sys.exit(0)\\n"
        "signal.signal(signal.SIGTERM, bye)\\n"
        "print('x - dagster - DEBUG - noise', flush=True)\\n"
        "print('hello', flush=True)\\n"
        "time.sleep(600)\\n"
    )
    comps = [Component(f"c{i}", (sys.executable, "-c", child), quiet=(" - DEBUG - ",),
                       stop_first=i == 0)
             for i in range(2)]

    async def status(emit, stop):
        emit("ready")
        await stop.wait()

    asyncio.run(supervise(comps, grace_s=5, log_dir=Path(sys.argv[1]), status=status))
    """
)


def test_ctrl_c_stops_every_child_and_the_logs_hold_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a process group of its own, as a terminal job would be
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum("| hello" in x for x in seen) < 2:
        seen.append(proc.stdout.readline())
    assert sum("| hello" in x for x in seen) == 2, seen
    # Ctrl-C: the terminal sends SIGINT to the foreground process group.
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = seen + out.splitlines(keepends=True)
    assert not any("DEBUG" in x for x in lines)
    for name in ("c0", "c1"):
        assert f"{name:>14} | bye\n" in lines  # each child got SIGTERM from the supervisor
        assert f"{name:>14} | stopped (0)\n" in lines
        log = (tmp_path / f"{name}.log").read_text()
        assert "x - dagster - DEBUG - noise" in log and "hello" in log
    # c0 (stop_first) is stopped and gone before c1 is asked to stop
    assert lines.index(f"{'c0':>14} | stopped (0)\n") < lines.index(f"{'c1':>14} | bye\n")


LEFTOVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from command.supervisor import Component, supervise

    # A parent that ignores SIGTERM's default (exits at once) but leaves a child behind that
    # holds the output pipe, as a Dagster daemon leaves a run worker.
    parent = (
        "import subprocess, sys, time\\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\\n"
        "print('grandchild', p.pid, flush=True)\\n"
        "time.sleep(600)\\n"
    )

    async def status(emit, stop):
        emit("ready")
        await stop.wait()

    asyncio.run(supervise([Component("p", (sys.executable, "-c", parent))], grace_s=5,
                          log_dir=Path(sys.argv[1]), status=status))
    """
)


def test_stop_leaves_no_grandchild_behind(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", LEFTOVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    grandchild = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not grandchild:
        line = proc.stdout.readline()
        if "| grandchild" in line:
            grandchild = int(line.split()[-1])
    assert grandchild
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - t0 < 10
    assert not _alive(grandchild), f"grandchild {grandchild} outlived the supervisor"


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: whoever inherited it may be slow to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
