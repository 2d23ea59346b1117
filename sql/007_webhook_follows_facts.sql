-- The webhook follows the analytics facts: with the analytics sink enabled, `walcast run`
-- sends the webhook what enriched_events received from the stream, read in position order
-- after the webhook's own checkpoint, instead of holding the slot for it.
-- Applied by walcast itself after 006, once (analytics.walcast_migrations).

-- Rows a backfill (or a rebuild) wrote carry the snapshot's position, which is no place in
-- the stream's order; the backfill delivers them to the webhook itself, so the follower
-- leaves them out.
ALTER TABLE analytics.enriched_events
    ADD COLUMN backfilled BOOLEAN NOT NULL DEFAULT false;

-- The follower's read: streamed rows in position order. Nothing else reads facts by
-- position, so the index holds streamed rows only.
DROP INDEX analytics.enriched_events_position;
CREATE INDEX enriched_events_stream_position
    ON analytics.enriched_events (commit_lsn, commit_seq) WHERE NOT backfilled;
