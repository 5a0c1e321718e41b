-- The reconciliation covers both UDiFF bhavcopy files (issue 13): which file and row a verdict
-- comes from (segment CM or FO, NSE's FinInstrmId), the exchange's trade count, and for F&O the
-- settlement price and open interest on both sides. Volumes are in shares on both sides (an FO
-- file counts contracts: exch_volume is TtlTradgVol times NewBrdLotQty).
ALTER TABLE eod_reconciliation
    ADD COLUMN IF NOT EXISTS segment       text CHECK (segment IN ('CM', 'FO')),
    ADD COLUMN IF NOT EXISTS fin_instrm_id bigint,
    ADD COLUMN IF NOT EXISTS exch_trades   bigint,
    ADD COLUMN IF NOT EXISTS exch_settle   double precision,
    ADD COLUMN IF NOT EXISTS exch_oi       bigint,
    ADD COLUMN IF NOT EXISTS nadi_settle   double precision,
    ADD COLUMN IF NOT EXISTS nadi_oi       bigint;
