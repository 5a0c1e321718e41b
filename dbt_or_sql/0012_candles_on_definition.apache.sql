-- Apache edition: the rollup refresh computes candles with the one definition of 0011
-- (nadi_candles for 1m from ticks, nadi_candle_rollup_aggregates for 5m from 1m).
-- Otherwise as 0006: recompute the candles of every dirty window in [p_start, p_end) and
-- forget those windows, claimed with DELETE ... RETURNING before the ticks are read (a tick
-- committed later marks its window again). Returns the number of (instrument, 5-minute
-- window) pairs refreshed. Maintenance: SECURITY DEFINER-ready (fixed search_path).
DO $gen$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION nadi_refresh_candles(
    p_start timestamptz DEFAULT '-infinity', p_end timestamptz DEFAULT 'infinity'
) RETURNS bigint LANGUAGE plpgsql SET search_path = public, pg_temp AS $body$
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
    SELECT c.*
    FROM (SELECT array_agg(instrument_token) AS tokens, array_agg(bucket) AS a,
                 array_agg(bucket + INTERVAL '5 minutes') AS b,
                 min(bucket) AS lo, max(bucket) + INTERVAL '5 minutes' AS hi
          FROM _nadi_dirty) d,
         LATERAL nadi_candles(INTERVAL '1 minute', d.tokens, d.a, d.b, d.lo, d.hi) c;

    DELETE FROM candles_5m c USING _nadi_dirty d
    WHERE c.instrument_token = d.instrument_token AND c.bucket = d.bucket;

    INSERT INTO candles_5m (bucket, instrument_token, open, high, low, close, volume, tick_count)
    SELECT d.bucket, d.instrument_token, %s
    FROM _nadi_dirty d
    JOIN candles_1m c ON c.instrument_token = d.instrument_token
                     AND c.bucket >= d.bucket AND c.bucket < d.bucket + INTERVAL '5 minutes'
    GROUP BY d.bucket, d.instrument_token;

    RETURN n;
END;
$body$ $f$, replace(nadi_candle_rollup_aggregates(), 'ORDER BY bucket', 'ORDER BY c.bucket'));
END
$gen$;
