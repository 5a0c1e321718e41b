"""The verbs of the ``nadi`` command (DESIGN.md section 3), as the root mounts them."""

from __future__ import annotations

import typer.main

from command.main import app


def _names(group: typer.Typer) -> set[str]:
    return set(typer.main.get_group(group).commands)


def test_top_level_verbs() -> None:
    assert _names(app) == {
        "up", "services", "migrate", "simulate", "process", "api", "replay", "bench", "instruments",
        "feed", "import",
    }  # fmt: skip


def test_sub_verbs() -> None:
    group = typer.main.get_group(app)
    subs = {name: set(getattr(cmd, "commands", {})) for name, cmd in group.commands.items()}
    assert subs["services"] == {"up", "down", "status"}
    assert subs["instruments"] == {"load"}
    assert subs["feed"] == {"kite"}
    # From a checkout, the benchmarks are mounted (an installed wheel gets a one-line refusal:
    # tests/test_wheel.py).
    assert subs["bench"] == {
        "ingest", "replay", "candles", "latency", "ws", "pipelines", "faults", "import",
    }  # fmt: skip
