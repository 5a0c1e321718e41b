-- Every valid tick, exactly once. Prices are double precision: they are already rounded to the
-- instrument's tick size upstream, and float8 is far cheaper to COPY and aggregate than numeric.
CREATE TABLE IF NOT EXISTS ticks (
    instrument_token  bigint NOT NULL,
    exchange_ts       timestamptz NOT NULL,
    sequence_id       bigint NOT NULL CHECK (sequence_id >= 0),
    last_price        double precision NOT NULL CHECK (last_price > 0),
    last_qty          bigint,
    volume            bigint,
    oi                bigint,
    bid               double precision,
    ask               double precision,
    bid_qty           bigint,
    ask_qty           bigint,
    status            text NOT NULL DEFAULT 'OK' CHECK (status IN ('OK', 'STALE', 'RECOVERED')),
    feed              text,
    ingest_ts         timestamptz NOT NULL DEFAULT now()
);

-- Chunk interval 1 hour: the live feed writes into one chunk at a time, and that chunk plus its
-- unique index must stay in shared_buffers (2 GB) while COPY hammers it. At a few thousand
-- ticks/s (the simulated NSE session; a busy real open is ~10k/s) an hour is ~1-5 GB of heap
-- and index; a day-sized chunk would spill to disk on every insert. Hour chunks also give
-- retention and rollup refreshes a fine grain. The ticks_hypertable asset can change it.
-- No default time index: every read is by instrument, served by the unique index below.
SELECT create_hypertable(
    'ticks', by_range('exchange_ts', INTERVAL '1 hour'),
    create_default_indexes => FALSE, if_not_exists => TRUE
);

-- The exactly-once key; it also serves the (instrument_token, exchange_ts ASC) access path.
CREATE UNIQUE INDEX IF NOT EXISTS ticks_instrument_ts_seq_uq
    ON ticks (instrument_token, exchange_ts, sequence_id);
