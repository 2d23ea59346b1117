-- What walcast needs on the source: replica identities and the publication.
-- `walcast setup` (and `walcast run` on start) does the same idempotently, using the
-- configured WALCAST_PUBLICATION name; this file is for DBAs who prefer to apply it by hand.
--
-- REPLICA IDENTITY DEFAULT (the primary key) is enough: walcast needs the key of a deleted
-- content row, and treats unchanged TOASTed columns of an updated row as "keep the value".

ALTER TABLE content REPLICA IDENTITY DEFAULT;
ALTER TABLE engagement_events REPLICA IDENTITY DEFAULT;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'walcast_pub') THEN
        -- Via the partition root: when engagement_events is partitioned, its changes
        -- arrive under its own name rather than its partitions'.
        CREATE PUBLICATION walcast_pub FOR TABLE content, engagement_events
            WITH (publish_via_partition_root = true);
    END IF;
END
$$;
