-- Gap repair in batches (issue 13). A sensor tick claims the open gaps it puts in one run
-- (claimed_by: the run's batch key, claimed_at: when), in the same statement that counts the
-- attempt; FOR UPDATE SKIP LOCKED and the claim make two ticks, or a tick and a manual run,
-- take disjoint gaps. The run clears claimed_by when it ends (claimed_at stays: the last
-- attempt's start, which the retry backoff counts from); the sensor clears the claim of a run
-- that died. unrecoverable_at dates the give-up, for "unrecoverable today" alerts.
ALTER TABLE sequence_gaps
    ADD COLUMN IF NOT EXISTS claimed_by text,
    ADD COLUMN IF NOT EXISTS claimed_at timestamptz,
    ADD COLUMN IF NOT EXISTS unrecoverable_at timestamptz;

-- What the sensor and the metrics read: open gaps in detection order, per day.
CREATE INDEX IF NOT EXISTS sequence_gaps_open_detected_idx
    ON sequence_gaps (detected_at, id) WHERE status = 'open';
-- "repaired today" / "unrecoverable today" without a scan of every gap ever recorded.
CREATE INDEX IF NOT EXISTS sequence_gaps_repaired_at_idx
    ON sequence_gaps (repaired_at) WHERE repaired_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS sequence_gaps_unrecoverable_at_idx
    ON sequence_gaps (unrecoverable_at) WHERE unrecoverable_at IS NOT NULL;
