-- walcast webhook sink: the request in flight, and what a replay of dead letters needs.
-- Applied by walcast itself after 004, once (analytics.walcast_migrations).

-- The one request the webhook sink has sent (or is about to send) and not yet seen
-- confirmed: exactly the bytes and the idempotency key. After a restart it is sent again
-- as it was, so a receiver that deduplicates by key sees it once.
CREATE TABLE analytics.walcast_webhook_outbox (
    sink            TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    first_lsn       PG_LSN NOT NULL,
    first_seq       INTEGER NOT NULL,
    last_lsn        PG_LSN NOT NULL,
    last_seq        INTEGER NOT NULL,
    body            TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A dead-lettered webhook batch keeps its key, so `walcast dead-letters replay` re-sends
-- it under the same one, and records when that succeeded.
ALTER TABLE analytics.dead_letters
    ADD COLUMN idempotency_key TEXT,
    ADD COLUMN replayed_at TIMESTAMPTZ;
