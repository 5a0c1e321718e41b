-- History import (issue 14, `nadi import`, nadi/importer): an instrument-day that already holds
-- ticks from another source is refused, unless the operator asks to replace it. Replacing is
-- this function, called inside the import's transaction before the day's new rows are
-- written, so the old and the new rows are never both visible and a failed import leaves the
-- old ones. nadi_maint (Dagster, `nadi import`) may INSERT ticks but not DELETE them: the
-- deletion is SECURITY DEFINER, limited to whole instrument-days, and also forgets what
-- described the old rows (their sequence state and gaps) and marks their candle windows, so
-- the refresh that follows empties windows the new rows no longer fill.
-- Returns the number of tick rows deleted.
CREATE OR REPLACE FUNCTION nadi_maint_replace_days(p_tokens bigint[], p_days date[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF cardinality(p_tokens) IS DISTINCT FROM cardinality(p_days) THEN
        RAISE EXCEPTION 'nadi_maint_replace_days: % tokens but % days',
            cardinality(p_tokens), cardinality(p_days);
    END IF;
    WITH k AS (
        SELECT DISTINCT token, day FROM unnest(p_tokens, p_days) AS u(token, day)
    ), d AS (
        DELETE FROM public.ticks t
        USING k
        WHERE t.instrument_token = k.token
          AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
          AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
        RETURNING t.instrument_token, t.exchange_ts
    ), m AS (
        INSERT INTO public.candle_dirty (instrument_token, bucket)
        SELECT DISTINCT instrument_token, public.time_bucket(INTERVAL '5 minutes', exchange_ts)
        FROM d
        ORDER BY 1, 2
        ON CONFLICT (bucket, instrument_token) DO UPDATE SET marked_at = excluded.marked_at
    )
    SELECT count(*) INTO n FROM d;
    DELETE FROM public.ingest_state s
    USING unnest(p_tokens, p_days) AS k(token, day)
    WHERE s.instrument_token = k.token AND s.trading_day = k.day;
    DELETE FROM public.sequence_gaps g
    USING unnest(p_tokens, p_days) AS k(token, day)
    WHERE g.instrument_token = k.token AND g.trading_day = k.day;
    RETURN n;
END;
$$;

REVOKE ALL ON FUNCTION nadi_maint_replace_days(bigint[], date[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nadi_maint_replace_days(bigint[], date[]) TO nadi_maint;
