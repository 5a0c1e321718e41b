-- The instrument master, in the shape of Kite's instruments CSV.
CREATE TABLE IF NOT EXISTS instruments (
    instrument_token  bigint PRIMARY KEY CHECK (instrument_token > 0),
    exchange_token    bigint,
    tradingsymbol     text NOT NULL,
    name              text,
    last_price        double precision,
    expiry            date,
    strike            double precision,
    tick_size         double precision NOT NULL DEFAULT 0.05 CHECK (tick_size > 0),
    lot_size          integer NOT NULL DEFAULT 1 CHECK (lot_size > 0),
    instrument_type   text NOT NULL DEFAULT 'EQ',
    segment           text NOT NULL DEFAULT 'NSE',
    exchange          text NOT NULL DEFAULT 'NSE'
                      CHECK (exchange IN ('NSE', 'BSE', 'NFO', 'BFO', 'MCX', 'CDS', 'BCD', 'NCO')),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS instruments_symbol_idx ON instruments (exchange, tradingsymbol);
