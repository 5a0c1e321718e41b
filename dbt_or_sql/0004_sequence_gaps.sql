-- Holes in an instrument's sequence_id, per trading day (Asia/Kolkata date of exchange_ts).
-- from_seq..to_seq is the range as detected; repaired_count counts ticks that filled it since.
CREATE TABLE IF NOT EXISTS sequence_gaps (
    id                bigserial PRIMARY KEY,
    instrument_token  bigint NOT NULL,
    trading_day       date NOT NULL,
    from_seq          bigint NOT NULL,
    to_seq            bigint NOT NULL,
    detected_at       timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'open'
                      CHECK (status IN ('open', 'repaired', 'unrecoverable')),
    repaired_at       timestamptz,
    repaired_count    integer NOT NULL DEFAULT 0,
    repair_attempts   integer NOT NULL DEFAULT 0,
    reason            text,
    CHECK (to_seq >= from_seq),
    -- A redelivered batch re-detects the same gap: this key makes the record idempotent.
    UNIQUE (instrument_token, trading_day, from_seq)
);
CREATE INDEX IF NOT EXISTS sequence_gaps_open_idx
    ON sequence_gaps (instrument_token, trading_day) WHERE status = 'open';
