-- Apache edition: no continuous aggregates, so candles are rollup hypertables of the same
-- shape, refreshed incrementally from candle_dirty by nadi_refresh_candles().
CREATE TABLE IF NOT EXISTS candles_1m (
    bucket            timestamptz NOT NULL,
    instrument_token  bigint NOT NULL,
    open              double precision NOT NULL,
    high              double precision NOT NULL,
    low               double precision NOT NULL,
    close             double precision NOT NULL,
    volume            bigint NOT NULL,
    tick_count        bigint NOT NULL,
    PRIMARY KEY (instrument_token, bucket)
);
SELECT create_hypertable('candles_1m', by_range('bucket', INTERVAL '7 days'),
                         create_default_indexes => FALSE, if_not_exists => TRUE);

CREATE TABLE IF NOT EXISTS candles_5m (LIKE candles_1m INCLUDING ALL);
SELECT create_hypertable('candles_5m', by_range('bucket', INTERVAL '28 days'),
                         create_default_indexes => FALSE, if_not_exists => TRUE);

-- Which flavour this database runs; the code reads it instead of guessing.
CREATE TABLE IF NOT EXISTS candle_mode (
    singleton  boolean PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    mode       text NOT NULL CHECK (mode IN ('rollup', 'continuous_aggregate'))
);
INSERT INTO candle_mode (mode) VALUES ('rollup') ON CONFLICT (singleton) DO NOTHING;

-- Recompute the candles of every dirty window in [p_start, p_end) and forget those windows.
-- Returns the number of (instrument, 5-minute window) pairs refreshed. Concurrent callers are
-- safe: each claims its windows with DELETE ... RETURNING under row locks.
CREATE OR REPLACE FUNCTION nadi_refresh_candles(
    p_start timestamptz DEFAULT '-infinity', p_end timestamptz DEFAULT 'infinity'
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS _nadi_dirty (
        instrument_token bigint, bucket timestamptz
    ) ON COMMIT DROP;
    TRUNCATE _nadi_dirty;
    WITH claimed AS (
        DELETE FROM candle_dirty
        WHERE bucket >= p_start AND bucket < p_end
        RETURNING instrument_token, bucket
    )
    INSERT INTO _nadi_dirty SELECT instrument_token, bucket FROM claimed;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RETURN 0;
    END IF;

    DELETE FROM candles_1m c USING _nadi_dirty d
    WHERE c.instrument_token = d.instrument_token
      AND c.bucket >= d.bucket AND c.bucket < d.bucket + INTERVAL '5 minutes';

    INSERT INTO candles_1m (bucket, instrument_token, open, high, low, close, volume, tick_count)
    SELECT time_bucket(INTERVAL '1 minute', t.exchange_ts) AS b,
           t.instrument_token,
           (array_agg(t.last_price ORDER BY t.exchange_ts, t.sequence_id))[1],
           max(t.last_price),
           min(t.last_price),
           (array_agg(t.last_price ORDER BY t.exchange_ts DESC, t.sequence_id DESC))[1],
           coalesce(sum(t.last_qty), 0),
           count(*)
    FROM _nadi_dirty d
    JOIN ticks t ON t.instrument_token = d.instrument_token
                AND t.exchange_ts >= d.bucket
                AND t.exchange_ts < d.bucket + INTERVAL '5 minutes'
    GROUP BY 1, 2;

    DELETE FROM candles_5m c USING _nadi_dirty d
    WHERE c.instrument_token = d.instrument_token AND c.bucket = d.bucket;

    INSERT INTO candles_5m (bucket, instrument_token, open, high, low, close, volume, tick_count)
    SELECT d.bucket,
           d.instrument_token,
           (array_agg(c.open ORDER BY c.bucket))[1],
           max(c.high),
           min(c.low),
           (array_agg(c.close ORDER BY c.bucket DESC))[1],
           sum(c.volume),
           sum(c.tick_count)
    FROM _nadi_dirty d
    JOIN candles_1m c ON c.instrument_token = d.instrument_token
                     AND c.bucket >= d.bucket AND c.bucket < d.bucket + INTERVAL '5 minutes'
    GROUP BY 1, 2;

    RETURN n;
END;
$$;
