"""The ``nadi`` console script (DESIGN.md section 3): the root that mounts each app's verbs.

Verbs whose options live with their app (simulate, instruments, process, api, replay, the
benchmarks) are imported here so typer can read their signatures; the work of every verb (the
processor, Dagster, the services) is imported inside the command, so a start-up stays under a
second.
"""

from __future__ import annotations

import json
import sys

import typer

from api.cli import api
from command import bench
from command.import_ import import_history
from command.replay import replay
from command.services import services_app
from command.up import up
from streaming.feeds.kite.cli import feed_kite
from streaming.processor.cli import process
from streaming.simulator.cli import instruments_load, simulate

app = typer.Typer(
    help="Nadi: market data for Indian equities and derivatives.", no_args_is_help=True
)
# The order of `nadi --help`: the verbs, then the groups.
app.command("simulate")(simulate)
app.command("api")(api)
app.command("replay")(replay)
app.command("import")(import_history)


@app.command("migrate")
def migrate(
    with_topics: bool = typer.Option(False, help="also create the Kafka topics (for Docker)"),
) -> None:
    """Apply the dbt_or_sql/ migrations (idempotent, safe from several processes)."""
    import asyncio

    from nadi.db.migrate import run_migrations
    from nadi.settings import get_settings

    settings = get_settings()
    applied = asyncio.run(run_migrations(settings))
    print(json.dumps({"applied": applied}), file=sys.stderr)
    if with_topics:
        from nadi.kafka_admin import ensure_topics

        print(json.dumps({"topics": asyncio.run(ensure_topics(settings))}), file=sys.stderr)


app.command("process")(process)
app.command("up")(up)
app.add_typer(services_app, name="services")
bench.mount(app)
instruments_app = typer.Typer(help="The instrument master.", no_args_is_help=True)
app.add_typer(instruments_app, name="instruments")
instruments_app.command("load")(instruments_load)
feed_app = typer.Typer(help="Live feed adapters into ticks.raw.", no_args_is_help=True)
app.add_typer(feed_app, name="feed")
feed_app.command("kite")(feed_kite)


def main() -> None:
    app()
