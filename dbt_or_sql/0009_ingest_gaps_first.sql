-- nadi_ingest_staged records the batch's new gaps *before* it settles LATE ticks: the
-- processor may write several batches in one transaction (group commit), and a LATE tick of
-- a later batch can fall inside a gap that an earlier batch of the same write opened.
-- Otherwise as 0008.
CREATE OR REPLACE FUNCTION nadi_ingest_staged(p_mark_dirty boolean)
RETURNS TABLE (inserted bigint, stale bigint, recovered bigint, late_dropped bigint,
               gaps_new bigint, gaps_closed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_late_dropped bigint := 0;
    v_gaps_new bigint := 0;
BEGIN
    WITH g AS (
        INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq)
        SELECT instrument_token, trading_day, from_seq, to_seq FROM gap_stage
        ORDER BY instrument_token, trading_day, from_seq
        ON CONFLICT (instrument_token, trading_day, from_seq) DO NOTHING
        RETURNING 1)
    SELECT count(*) INTO v_gaps_new FROM g;

    IF EXISTS (SELECT 1 FROM tick_stage WHERE status = 'LATE') THEN
        UPDATE tick_stage s SET status = 'RECOVERED'
        FROM sequence_gaps g
        WHERE s.status = 'LATE'
          AND g.instrument_token = s.instrument_token
          AND g.trading_day = s.trading_day
          AND s.sequence_id BETWEEN g.from_seq AND g.to_seq
          AND g.status <> 'repaired';
        -- A sequence already stored that day keeps its first payload.
        WITH d AS (
            DELETE FROM tick_stage s
            WHERE s.status = 'LATE'
              AND EXISTS (
                  SELECT 1 FROM ticks t
                  WHERE t.instrument_token = s.instrument_token
                    AND t.exchange_ts >= (s.trading_day::timestamp AT TIME ZONE 'Asia/Kolkata')
                    AND t.exchange_ts < ((s.trading_day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
                    AND t.sequence_id = s.sequence_id)
            RETURNING 1)
        SELECT count(*) INTO v_late_dropped FROM d;
        UPDATE tick_stage SET status = 'OK' WHERE status = 'LATE';
    END IF;

    RETURN QUERY
    WITH ins AS (
        INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, last_qty,
                           volume, oi, bid, ask, bid_qty, ask_qty, status, feed)
        SELECT instrument_token, 'epoch'::timestamptz + ts_us * INTERVAL '1 microsecond',
               sequence_id, last_price, last_qty, volume, oi, bid, ask, bid_qty, ask_qty,
               status, feed
        FROM tick_stage
        ON CONFLICT DO NOTHING
        RETURNING instrument_token, exchange_ts, sequence_id, status
    ), filled AS (
        SELECT g.id, count(*) AS n
        FROM ins
        JOIN sequence_gaps g
          ON g.instrument_token = ins.instrument_token
         AND g.trading_day = (ins.exchange_ts AT TIME ZONE 'Asia/Kolkata')::date
         AND ins.sequence_id BETWEEN g.from_seq AND g.to_seq
        WHERE ins.status = 'RECOVERED'
        GROUP BY g.id
    ), upd AS (
        UPDATE sequence_gaps g
        SET repaired_count = g.repaired_count + f.n,
            status = CASE WHEN g.repaired_count + f.n >= g.to_seq - g.from_seq + 1
                          THEN 'repaired' ELSE g.status END,
            repaired_at = CASE WHEN g.repaired_count + f.n >= g.to_seq - g.from_seq + 1
                               THEN now() ELSE g.repaired_at END
        FROM filled f
        WHERE g.id = f.id
        RETURNING g.status
    ), dirty AS (
        INSERT INTO candle_dirty (instrument_token, bucket)
        SELECT DISTINCT instrument_token, time_bucket(INTERVAL '5 minutes', exchange_ts)
        FROM ins
        WHERE p_mark_dirty
        ORDER BY 1, 2
        ON CONFLICT (bucket, instrument_token) DO UPDATE SET marked_at = excluded.marked_at
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins),
           (SELECT count(*) FROM ins WHERE ins.status = 'STALE'),
           (SELECT count(*) FROM ins WHERE ins.status = 'RECOVERED'),
           v_late_dropped,
           v_gaps_new,
           (SELECT count(*) FROM upd WHERE upd.status = 'repaired');
    -- (dirty runs regardless: data-modifying CTEs always execute to completion.)
END;
$$;
