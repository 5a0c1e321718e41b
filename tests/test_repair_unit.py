"""The pure parts of gap repair (nadi/repair.py) and the sensor's run config: no services."""

from __future__ import annotations

from datetime import date

import pytest
from dagster import validate_run_config

from nadi.repair import Batch, GapOutcome, GapRow, batch_key, give_up_reason, plan_batches, ranges
from nadi.settings import Settings
from pipelines.definitions import build_definitions
from pipelines.sensors import BATCH_TAG, GapSensorPolicy, batch_run_request

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

D1, D2 = date(2025, 3, 12), date(2025, 3, 13)


def _g(i: int, day: date = D1, attempts: int = 0) -> GapRow:
    return GapRow(i, 1000 + i % 3, day, 10 * i, 10 * i + 1, attempts)


def test_ranges() -> None:
    assert ranges([]) == []
    assert ranges([5]) == [(5, 5)]
    assert ranges([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 8), (10, 10)]
    assert ranges([1, 1, 2]) == [(1, 2)]  # a repeated number does not start a new range


def test_plan_batches_per_day_oldest_first_capped() -> None:
    gaps = [_g(1, D2), _g(2, D1), _g(3, D2), _g(4, D1), _g(5, D1)]
    plan = plan_batches(gaps, batch_size=2, max_batches=10)
    assert [(d, [g.id for g in b]) for d, b in plan] == [
        (D1, [2, 4]), (D1, [5]), (D2, [1, 3]),
    ]  # fmt: skip
    assert len(plan_batches(gaps, batch_size=2, max_batches=2)) == 2
    assert plan_batches(gaps, batch_size=2, max_batches=0) == []
    assert [len(b) for _, b in plan_batches(gaps, batch_size=500, max_batches=1)] == [3]


def test_batch_key_is_stable_and_changes_with_the_attempt() -> None:
    a = [_g(3, attempts=1), _g(1, attempts=1)]
    assert batch_key(D1, a) == batch_key(D1, list(reversed(a)))
    assert batch_key(D1, a).startswith("gaps-2025-03-12-1-n2-")
    assert batch_key(D1, a) != batch_key(D1, [_g(3, attempts=1), _g(1, attempts=2)])
    assert batch_key(D1, a) != batch_key(D1, a[:1])


def test_outcome_json_and_give_up_reason() -> None:
    o = GapOutcome.of(_g(2, attempts=3), "unrecoverable", give_up_reason(3, None))
    j = o.as_json()
    assert j["gap"] == 2 and j["trading_day"] == "2025-03-12" and j["attempts"] == 3
    assert j["reason"] == "after 3 attempts: the last repair run did not finish"
    assert len(give_up_reason(3, "x" * 1000)) == 500


def test_policy_from_settings() -> None:
    s = Settings().model_copy(
        update={"gap_repair_batch_size": 7, "gap_repair_max_runs": 3, "gap_repair_grace_s": 0.5,
                "gap_repair_sensor_interval_s": 2, "gap_repair_max_attempts": 4}
    )  # fmt: skip
    p = GapSensorPolicy.from_settings(s)
    assert (p.batch_size, p.max_runs, p.grace_s, p.interval_s, p.max_attempts) == (7, 3, 0.5, 2, 4)
    sensor = build_definitions(s).get_sensor_def("gap_repair_sensor")
    assert sensor.minimum_interval_seconds == 2


def test_run_config_of_a_batch_is_valid_for_its_job() -> None:
    defs = build_definitions(Settings())
    b = Batch("gaps-k", D1, (_g(1, attempts=1), _g(2, attempts=1)))
    rr = batch_run_request(b, GapSensorPolicy(concurrency=3), today=D2)
    assert rr.job_name == "gap_repair_job" and rr.partition_key == "2025-03-12"
    assert rr.run_key == rr.tags[BATCH_TAG] == "gaps-k"
    cfg = rr.run_config["ops"]
    assert cfg["gap_repair"]["config"] == {"gap_ids": [1, 2], "claim": "gaps-k", "concurrency": 3}
    assert cfg["candles"]["config"]["full"] is False
    validate_run_config(defs.get_job_def("gap_repair_job"), rr.run_config)
    # A day that is no partition (a Saturday) goes to the off-calendar job.
    sat = date(2025, 3, 15)
    rr = batch_run_request(Batch("gaps-s", sat, (_g(1, sat),)), GapSensorPolicy(), today=D2)
    assert rr.job_name == "gap_repair_off_calendar_job" and rr.partition_key is None
    validate_run_config(defs.get_job_def("gap_repair_off_calendar_job"), rr.run_config)
    # A typo in the config is refused before any run starts.
    bad = {"ops": {"gap_repair": {"config": {"gap_ids": [1], "batch": 3}}}}
    with pytest.raises(Exception, match="batch"):
        validate_run_config(defs.get_job_def("gap_repair_job"), bad)
