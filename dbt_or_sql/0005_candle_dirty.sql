-- 5-minute windows per instrument that received ticks since their candles were last computed.
-- The writer adds them in the same transaction as the ticks; the Apache-edition rollup refresh
-- consumes them, and the API computes candles for still-dirty windows from raw ticks. With
-- continuous aggregates TimescaleDB tracks invalidations itself and this stays empty-ish.
CREATE TABLE IF NOT EXISTS candle_dirty (
    instrument_token  bigint NOT NULL,
    bucket            timestamptz NOT NULL,
    marked_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, instrument_token)
);
