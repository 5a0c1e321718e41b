"""The Dagster code location of Nadi (``workspace.yaml`` loads ``defs`` from here)."""

from __future__ import annotations

from dagster import Definitions

from nadi.settings import Settings, get_settings
from pipelines.assets.candles import candle_refresh_policy, candles
from pipelines.assets.eod import eod_reconciliation
from pipelines.assets.imports import history_import, history_import_job, history_import_sensor
from pipelines.assets.repair import gap_repair
from pipelines.assets.replay import ticks_replay
from pipelines.assets.storage import ticks, ticks_compression, ticks_hypertable, ticks_retention
from pipelines.jobs import all_jobs
from pipelines.resources import resources_from_settings
from pipelines.schedules import all_schedules
from pipelines.sensors import build_gap_repair_sensor


def build_definitions(settings: Settings) -> Definitions:
    """Everything, with resources fed from ``settings`` (tests pass their own)."""
    return Definitions(
        assets=[
            ticks_hypertable,
            ticks,
            ticks_retention,
            ticks_compression,
            gap_repair,
            candles,
            candle_refresh_policy,
            eod_reconciliation,
            ticks_replay,
            history_import,
        ],
        jobs=[*all_jobs, history_import_job],
        schedules=all_schedules,
        sensors=[build_gap_repair_sensor(settings), history_import_sensor],
        resources=resources_from_settings(settings),
    )


defs = build_definitions(get_settings())
