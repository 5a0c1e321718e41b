-- nadi: no-transaction
-- Timescale license: candles are continuous aggregates with real-time aggregation, created
-- empty (WITH NO DATA) and kept fresh by refresh policies. 5m is hierarchical on 1m.
CREATE MATERIALIZED VIEW IF NOT EXISTS candles_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 minute', exchange_ts) AS bucket,
       instrument_token,
       first(last_price, exchange_ts) AS open,
       max(last_price) AS high,
       min(last_price) AS low,
       last(last_price, exchange_ts) AS close,
       coalesce(sum(last_qty), 0)::bigint AS volume,
       count(*) AS tick_count
FROM ticks
GROUP BY 1, 2
WITH NO DATA;

CREATE MATERIALIZED VIEW IF NOT EXISTS candles_5m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '5 minutes', bucket) AS bucket,
       instrument_token,
       first(open, bucket) AS open,
       max(high) AS high,
       min(low) AS low,
       last(close, bucket) AS close,
       sum(volume)::bigint AS volume,
       sum(tick_count)::bigint AS tick_count
FROM candles_1m
GROUP BY 1, 2
WITH NO DATA;

SELECT add_continuous_aggregate_policy('candles_1m',
    start_offset => INTERVAL '2 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute', if_not_exists => TRUE);
SELECT add_continuous_aggregate_policy('candles_5m',
    start_offset => INTERVAL '2 days', end_offset => INTERVAL '5 minutes',
    schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE);

CREATE TABLE IF NOT EXISTS candle_mode (
    singleton  boolean PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    mode       text NOT NULL CHECK (mode IN ('rollup', 'continuous_aggregate'))
);
INSERT INTO candle_mode (mode) VALUES ('continuous_aggregate') ON CONFLICT (singleton) DO NOTHING;

-- Same entry point as the Apache edition, so callers never branch on the license.
CREATE OR REPLACE FUNCTION nadi_refresh_candles(
    p_start timestamptz DEFAULT '-infinity', p_end timestamptz DEFAULT 'infinity'
) RETURNS bigint LANGUAGE sql AS $$
    -- refresh_continuous_aggregate cannot run inside a function's transaction; callers with
    -- the Timescale license use nadi.db.candles.refresh(), which issues CALL outside one.
    DELETE FROM candle_dirty WHERE bucket >= p_start AND bucket < p_end;
    SELECT 0::bigint;
$$;
