#!/bin/sh
# Least-privilege roles, the publication and the analytics schema; what
# `walcast setup --print-sql` prints. Run once by the postgres image, as the superuser,
# when the data volume is created (docker-entrypoint-initdb.d), after 001's tables.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v walcast_pw="$(cat /run/secrets/walcast_db_password)" \
    -v grafana_pw="$(cat /run/secrets/grafana_db_password)" <<'SQL'
CREATE ROLE walcast LOGIN REPLICATION PASSWORD :'walcast_pw';
GRANT CONNECT ON DATABASE app TO walcast;
GRANT USAGE ON SCHEMA public TO walcast;
GRANT SELECT ON public.content, public.engagement_events TO walcast;
ALTER TABLE public.content REPLICA IDENTITY DEFAULT;
ALTER TABLE public.engagement_events REPLICA IDENTITY DEFAULT;
CREATE PUBLICATION walcast_pub FOR TABLE public.content, public.engagement_events
    WITH (publish_via_partition_root = true);
-- For compose.partitions.yaml (WALCAST_PARTITIONS=2): each partition's share of the events,
-- and every content row. Unused publications cost nothing.
CREATE PUBLICATION walcast_pub_0 FOR TABLE public.content,
    public.engagement_events WHERE (id % 2 = 0) WITH (publish_via_partition_root = true);
CREATE PUBLICATION walcast_pub_1 FOR TABLE public.content,
    public.engagement_events WHERE (id % 2 = 1) WITH (publish_via_partition_root = true);
CREATE SCHEMA analytics AUTHORIZATION walcast;

CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_pw';
GRANT CONNECT ON DATABASE app TO grafana_reader;
GRANT USAGE ON SCHEMA analytics TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE walcast IN SCHEMA analytics GRANT SELECT ON TABLES TO grafana_reader;
SQL
