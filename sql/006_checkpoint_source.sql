-- walcast: every checkpoint knows the WAL history its position belongs to.
-- Applied by walcast itself after 005, once (analytics.walcast_migrations).
--
-- `source` is `<system identifier>/<timeline>` of the source cluster (IDENTIFY_SYSTEM). A
-- position of one history is never compared with one of another: walcast refuses to
-- start when the source's differs. A sink records it before its first write, so its row
-- may exist without a position yet.
ALTER TABLE analytics.walcast_checkpoint
    ALTER COLUMN commit_lsn DROP NOT NULL,
    ALTER COLUMN seq DROP NOT NULL,
    ADD COLUMN source TEXT;
