-- The database is the record of the processor's state too (DESIGN.md section 9, issue 8).
--
-- nadi_instance: this database's identity. Every Redis key the processor writes carries it
--   (nadi.redis_keys), so a recreated database, or a second deployment sharing one Redis,
--   never reads another database's rings. A restore from a dump keeps the identity: that case
--   is caught by comparing the ring's markers with ingest_state (the processor does that).
-- ingest_state: per instrument and trading day, the highest sequence_id stored. Maintained by
--   nadi_ingest_staged in the ingest transaction itself, so it is always consistent with the
--   rows, also after a restore or a failover. The SequenceTracker starts from it.
CREATE TABLE IF NOT EXISTS nadi_instance (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    singleton   boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);
INSERT INTO nadi_instance DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS ingest_state (
    instrument_token  bigint NOT NULL,
    trading_day       date NOT NULL,
    last_seq          bigint NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instrument_token, trading_day)
);
INSERT INTO ingest_state (instrument_token, trading_day, last_seq)
SELECT instrument_token, (exchange_ts AT TIME ZONE 'Asia/Kolkata')::date, max(sequence_id)
FROM ticks
GROUP BY 1, 2
ON CONFLICT DO NOTHING;

-- The batch write (as 0009: gaps first, then LATE ticks settled, then the insert), plus:
-- 1. A guard: the caller passes the last sequence it classified each (instrument, day)
--    against (p_tokens/p_days/p_expected; NULL = none stored). If the database holds another
--    (a zombie worker, another writer), the classification is stale: SQLSTATE NS001 and
--    nothing is written; the processor reloads the state and reads the records again.
-- 2. ingest_state advanced in the same transaction.
-- 3. LATE ticks that are exact copies of stored rows (redelivery, a redundant feed) found by
--    the unique key first; only the rest need the by-day look-up.
DROP FUNCTION IF EXISTS nadi_ingest_staged(boolean);
CREATE OR REPLACE FUNCTION nadi_ingest_staged(
    p_mark_dirty boolean,
    p_tokens bigint[] DEFAULT '{}',
    p_days date[] DEFAULT '{}',
    p_expected bigint[] DEFAULT '{}'
)
RETURNS TABLE (inserted bigint, stale bigint, recovered bigint, late_dropped bigint,
               gaps_new bigint, gaps_closed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_late_dropped bigint := 0;
    v_more bigint := 0;
    v_gaps_new bigint := 0;
    v_bad record;
BEGIN
    IF cardinality(p_tokens) > 0 THEN
        SELECT e.token, e.day, e.expected, a.actual INTO v_bad
        FROM unnest(p_tokens, p_days, p_expected) AS e(token, day, expected)
        LEFT JOIN ingest_state s ON s.instrument_token = e.token AND s.trading_day = e.day
        CROSS JOIN LATERAL (
            SELECT coalesce(s.last_seq,
                   (SELECT max(t.sequence_id) FROM ticks t
                     WHERE t.instrument_token = e.token
                       AND t.exchange_ts >= (e.day::timestamp AT TIME ZONE 'Asia/Kolkata')
                       AND t.exchange_ts < ((e.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')))
                   AS actual) a
        WHERE a.actual IS DISTINCT FROM e.expected
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'ingest state moved: instrument % day % classified after %, stored %',
                v_bad.token, v_bad.day, v_bad.expected, v_bad.actual
                USING ERRCODE = 'NS001';
        END IF;
    END IF;

    WITH g AS (
        INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq)
        SELECT instrument_token, trading_day, from_seq, to_seq FROM gap_stage
        ORDER BY instrument_token, trading_day, from_seq
        ON CONFLICT (instrument_token, trading_day, from_seq) DO NOTHING
        RETURNING 1)
    SELECT count(*) INTO v_gaps_new FROM g;

    IF EXISTS (SELECT 1 FROM tick_stage WHERE status = 'LATE') THEN
        WITH d AS (
            DELETE FROM tick_stage s
            WHERE s.status = 'LATE'
              AND EXISTS (
                  SELECT 1 FROM ticks t
                  WHERE t.instrument_token = s.instrument_token
                    AND t.exchange_ts = 'epoch'::timestamptz + s.ts_us * INTERVAL '1 microsecond'
                    AND t.sequence_id = s.sequence_id)
            RETURNING 1)
        SELECT count(*) INTO v_late_dropped FROM d;
        UPDATE tick_stage s SET status = 'RECOVERED'
        FROM sequence_gaps g
        WHERE s.status = 'LATE'
          AND g.instrument_token = s.instrument_token
          AND g.trading_day = s.trading_day
          AND s.sequence_id BETWEEN g.from_seq AND g.to_seq
          AND g.status <> 'repaired';
        -- A sequence already stored that day (with another exchange_ts) keeps its first payload.
        WITH d AS (
            DELETE FROM tick_stage s
            WHERE s.status IN ('LATE', 'RECOVERED')
              AND EXISTS (
                  SELECT 1 FROM ticks t
                  WHERE t.instrument_token = s.instrument_token
                    AND t.exchange_ts >= (s.trading_day::timestamp AT TIME ZONE 'Asia/Kolkata')
                    AND t.exchange_ts < ((s.trading_day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
                    AND t.sequence_id = s.sequence_id)
            RETURNING 1)
        SELECT count(*) INTO v_more FROM d;
        v_late_dropped := v_late_dropped + v_more;
        UPDATE tick_stage SET status = 'OK' WHERE status = 'LATE';
    END IF;

    -- New (instrument, day) rows start from what ticks already hold (rows written by other
    -- paths than this function), existing ones only move up.
    INSERT INTO ingest_state AS st (instrument_token, trading_day, last_seq)
    SELECT k.instrument_token, k.trading_day,
           greatest(k.m, (SELECT max(t.sequence_id) FROM ticks t
                           WHERE NOT EXISTS (SELECT 1 FROM ingest_state x
                                              WHERE x.instrument_token = k.instrument_token
                                                AND x.trading_day = k.trading_day)
                             AND t.instrument_token = k.instrument_token
                             AND t.exchange_ts >= (k.trading_day::timestamp AT TIME ZONE 'Asia/Kolkata')
                             AND t.exchange_ts < ((k.trading_day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')))
    FROM (SELECT instrument_token, trading_day, max(sequence_id) AS m
          FROM tick_stage GROUP BY 1, 2) k
    ORDER BY 1, 2
    ON CONFLICT (instrument_token, trading_day)
    DO UPDATE SET last_seq = excluded.last_seq, updated_at = now()
    WHERE excluded.last_seq > st.last_seq;

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
END;
$$;
