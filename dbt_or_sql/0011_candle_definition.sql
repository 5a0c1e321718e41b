-- The one definition of a candle, for both editions. Everything that computes candles from
-- ticks uses it: the Apache rollup refresh (nadi_refresh_candles), the continuous aggregate
-- candles_1m (generated from the same text by 0012), the API's raw tail of dirty or
-- unrefreshed windows and the matches_raw_ticks check (both through nadi_candles()).
--
-- A candle of the ticks of one instrument in one bucket:
--   open  = price of the first tick by (exchange_ts, sequence_id): two ticks in the same
--           microsecond are ordered by sequence, on every path;
--   close = price of the last tick by the same order; high/low = max/min price;
--   volume = sum(last_qty) (0 when no tick has one); tick_count = count of ticks.
-- Longer candles roll up shorter ones: open of the first, close of the last, max, min, sums.
CREATE OR REPLACE FUNCTION nadi_candle_aggregates() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $def$
SELECT '(array_agg(last_price ORDER BY exchange_ts, sequence_id))[1] AS open, '
    || 'max(last_price) AS high, '
    || 'min(last_price) AS low, '
    || '(array_agg(last_price ORDER BY exchange_ts DESC, sequence_id DESC))[1] AS close, '
    || 'coalesce(sum(last_qty), 0)::bigint AS volume, '
    || 'count(*)::bigint AS tick_count'
$def$;

CREATE OR REPLACE FUNCTION nadi_candle_rollup_aggregates() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $def$
SELECT '(array_agg(open ORDER BY bucket))[1] AS open, '
    || 'max(high) AS high, '
    || 'min(low) AS low, '
    || '(array_agg(close ORDER BY bucket DESC))[1] AS close, '
    || 'sum(volume)::bigint AS volume, '
    || 'sum(tick_count)::bigint AS tick_count'
$def$;

-- Candles of width p_width from the ticks of (p_tokens[i], [p_from[i], p_to[i])) for every i.
-- [p_lo, p_hi) must hold every range: passed as constants it lets TimescaleDB exclude all
-- other chunks when the statement is planned. A single-SELECT SQL function, so PostgreSQL
-- inlines it into the caller's query (keep it so: no SET, no SECURITY DEFINER, not STRICT).
DO $gen$
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION nadi_candles(
    p_width interval, p_tokens bigint[], p_from timestamptz[], p_to timestamptz[],
    p_lo timestamptz, p_hi timestamptz
) RETURNS TABLE (bucket timestamptz, instrument_token bigint, open double precision,
                 high double precision, low double precision, close double precision,
                 volume bigint, tick_count bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $body$
SELECT time_bucket(p_width, t.exchange_ts), t.instrument_token, %s
FROM unnest(p_tokens, p_from, p_to) AS r(tok, a, b)
JOIN ticks t ON t.instrument_token = r.tok AND t.exchange_ts >= r.a AND t.exchange_ts < r.b
WHERE t.exchange_ts >= p_lo AND t.exchange_ts < p_hi
GROUP BY 1, 2
$body$ $f$, nadi_candle_aggregates());
END
$gen$;

-- Which transaction last marked a window: a refresh that cannot run in one transaction with
-- its claim of the marks (continuous aggregates) takes a snapshot first and afterwards forgets
-- only the marks that snapshot saw committed (nadi_forget_refreshed_marks), so a tick written
-- during the refresh keeps its window marked and served from raw ticks.
ALTER TABLE candle_dirty ADD COLUMN IF NOT EXISTS marked_xid xid8;

CREATE OR REPLACE FUNCTION nadi_candle_dirty_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.marked_xid := pg_current_xact_id();
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS candle_dirty_stamp ON candle_dirty;
CREATE TRIGGER candle_dirty_stamp BEFORE INSERT OR UPDATE ON candle_dirty
    FOR EACH ROW EXECUTE FUNCTION nadi_candle_dirty_stamp();

-- Maintenance (SECURITY DEFINER-ready: fixed search_path, a maintenance role may be granted
-- EXECUTE). Forget the marks of windows in [p_start, p_end) whose marking transaction had
-- committed when p_snapshot was taken; returns how many.
CREATE OR REPLACE FUNCTION nadi_forget_refreshed_marks(
    p_snapshot pg_snapshot, p_start timestamptz, p_end timestamptz
) RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = public, pg_temp AS $$
    WITH d AS (
        DELETE FROM public.candle_dirty
        WHERE bucket >= p_start AND bucket < p_end
          AND (marked_xid IS NULL OR pg_visible_in_snapshot(marked_xid, p_snapshot))
        RETURNING 1)
    SELECT count(*) FROM d;
$$;
