-- Timescale license: candles_1m / candles_5m become continuous aggregates of the one
-- definition of 0011 (0006's used first/last(last_price, exchange_ts), which breaks ties of
-- one microsecond differently from every other path). They are recreated, materialized only
-- (the API merges the raw ticks of marked and unrefreshed windows itself, on both editions,
-- the same way), and without TimescaleDB refresh policies: Dagster refreshes them (policies
-- come back with NADI_TIMESCALE_POLICIES=true). Every window holding ticks is marked dirty,
-- so the API serves it from raw ticks until Dagster has refreshed it.
DROP MATERIALIZED VIEW IF EXISTS candles_5m;
DROP MATERIALIZED VIEW IF EXISTS candles_1m;

DO $gen$
BEGIN
    EXECUTE format($f$
CREATE MATERIALIZED VIEW candles_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT time_bucket(INTERVAL '1 minute', exchange_ts) AS bucket, instrument_token, %s
FROM ticks
GROUP BY 1, 2
WITH NO DATA $f$, nadi_candle_aggregates());
    EXECUTE format($f$
CREATE MATERIALIZED VIEW candles_5m
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT time_bucket(INTERVAL '5 minutes', bucket) AS bucket, instrument_token, %s
FROM candles_1m
GROUP BY 1, 2
WITH NO DATA $f$, nadi_candle_rollup_aggregates());
END
$gen$;

-- (TimescaleDB indexes each materialization on (instrument_token, bucket) by itself.)

INSERT INTO candle_dirty (instrument_token, bucket)
SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', exchange_ts) FROM ticks
ON CONFLICT DO NOTHING;

-- 0006's version forgot marks without refreshing; a continuous aggregate cannot be refreshed
-- inside a function, so this entry point now refuses instead of leaving candles stale.
CREATE OR REPLACE FUNCTION nadi_refresh_candles(
    p_start timestamptz DEFAULT '-infinity', p_end timestamptz DEFAULT 'infinity'
) RETURNS bigint LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'candles are continuous aggregates here: refresh them with CALL '
        'refresh_continuous_aggregate() outside a transaction, then '
        'nadi_forget_refreshed_marks() (pipelines.assets.candles does both)';
END;
$$;
