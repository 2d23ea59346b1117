-- walcast backfill: resume cursors, and dead letters of rows read from the table.
-- Applied by walcast itself after 003, once (analytics.walcast_migrations).

-- An unfinished backfill's progress: the highest engagement_events.id it applied, written
-- in the same transaction as the rows. Removed when the backfill finishes.
CREATE TABLE analytics.walcast_backfill (
    job        TEXT PRIMARY KEY,
    last_id    BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A backfilled row has no WAL position of its own; its dead letter is unique by row id.
ALTER TABLE analytics.dead_letters ADD COLUMN row_id BIGINT;
CREATE UNIQUE INDEX dead_letters_backfill_row
    ON analytics.dead_letters (row_id) WHERE origin = 'backfill';
