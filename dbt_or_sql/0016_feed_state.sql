-- Live feed adapters without exchange sequence numbers (issue 14: `nadi feed kite`).
--
-- feed_sequences: per feed, instrument and trading day, the highest sequence_id the adapter
--   has handed out. Written ahead of the produce (the adapter upserts a frame's numbers, then
--   produces the frame), so a restarted or crashed adapter continues above every number that
--   can have reached ticks.raw and never reuses one; a crash between the two loses only that
--   frame's ticks, which then show as a real gap (they were received and not delivered).
-- feed_outages: windows in which a feed connection was down (reconnect, silent connection
--   closed by the watchdog, adapter restart), with the instruments it carried. Ticks the
--   venue sent meanwhile were never received: no sequence numbers were spent on them, so the
--   window is recorded here, not as a sequence gap. ended_at is NULL while it lasts.
CREATE TABLE IF NOT EXISTS feed_sequences (
    feed              text NOT NULL,
    instrument_token  bigint NOT NULL,
    trading_day       date NOT NULL,
    last_seq          bigint NOT NULL CHECK (last_seq >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (feed, instrument_token, trading_day)
);

CREATE TABLE IF NOT EXISTS feed_outages (
    id           bigserial PRIMARY KEY,
    feed         text NOT NULL,
    connection   int NOT NULL,           -- the adapter's connection index (0, 1, 2)
    instruments  bigint[] NOT NULL,      -- the tokens that connection carried
    started_at   timestamptz NOT NULL,   -- the last frame received before the drop
    ended_at     timestamptz,            -- resubscribed (NULL: still down)
    reason       text NOT NULL,          -- closed | error | watchdog | adapter_restart
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE INDEX IF NOT EXISTS feed_outages_feed_started ON feed_outages (feed, started_at);

-- Grants (0013's matrix, tests/test_roles.py): the adapter runs as nadi_ingest; Dagster's
-- repairs (nadi_maint) and the API read outages.
GRANT SELECT, INSERT, UPDATE ON feed_sequences TO nadi_ingest;
GRANT SELECT ON feed_sequences TO nadi_maint;
GRANT SELECT, INSERT, UPDATE ON feed_outages TO nadi_ingest, nadi_maint;
GRANT SELECT ON feed_outages TO nadi_api;
GRANT USAGE ON SEQUENCE feed_outages_id_seq TO nadi_ingest, nadi_maint;
