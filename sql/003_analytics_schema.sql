-- The analytics schema the postgres sink writes (on WALCAST_ANALYTICS_URL).
-- walcast applies this migration itself at start, once, recorded in
-- analytics.walcast_migrations. Needs PostgreSQL 15 or later (UNIQUE NULLS NOT DISTINCT).

-- (The schema exists by now: walcast creates it first when it is missing, or a DBA gave it
-- to walcast's role with CREATE SCHEMA analytics AUTHORIZATION <role>.)

-- One row per engagement event: every source column, the content it was enriched with,
-- the derived numbers, and where in the WAL it came from.
CREATE TABLE analytics.enriched_events (
    id                  BIGINT PRIMARY KEY,
    content_id          UUID,
    user_id             UUID,
    event_type          TEXT,
    event_ts            TIMESTAMPTZ NOT NULL,
    duration_ms         INTEGER,
    device              TEXT,
    raw_payload         JSONB,
    -- Columns the source table has beyond the contract's, by name, as text.
    extra               JSONB,
    content_type        TEXT,
    length_seconds      INTEGER,
    title               TEXT,
    slug                TEXT,
    engagement_seconds  NUMERIC(14, 2),
    engagement_pct      NUMERIC(14, 2),
    content_missing     BOOLEAN NOT NULL,
    commit_lsn          PG_LSN NOT NULL,
    commit_seq          INTEGER NOT NULL,
    commit_ts           TIMESTAMPTZ NOT NULL,
    ingested_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX enriched_events_event_ts ON analytics.enriched_events (event_ts);
CREATE INDEX enriched_events_position ON analytics.enriched_events (commit_lsn, commit_seq);

-- Incremental aggregates. Every table has the same measures; the engagement_pct average is
-- kept as a sum and a count so it can be incremented, and derived from them. Day is the
-- UTC date of event_ts. A NULL key (content_type, device) is a group of its own.

CREATE TABLE analytics.content_engagement_metrics (
    content_id               UUID PRIMARY KEY,
    events                   BIGINT NOT NULL,
    plays                    BIGINT NOT NULL,
    pauses                   BIGINT NOT NULL,
    finishes                 BIGINT NOT NULL,
    clicks                   BIGINT NOT NULL,
    distinct_users           BIGINT NOT NULL,
    engagement_seconds_total NUMERIC NOT NULL,
    engagement_pct_sum       NUMERIC NOT NULL,
    engagement_pct_events    BIGINT NOT NULL,
    engagement_pct_avg       NUMERIC GENERATED ALWAYS AS
        (engagement_pct_sum / NULLIF(engagement_pct_events, 0)) STORED,
    last_event_ts            TIMESTAMPTZ NOT NULL
);

CREATE TABLE analytics.content_engagement_daily (
    content_id               UUID NOT NULL,
    day                      DATE NOT NULL,
    events                   BIGINT NOT NULL,
    plays                    BIGINT NOT NULL,
    pauses                   BIGINT NOT NULL,
    finishes                 BIGINT NOT NULL,
    clicks                   BIGINT NOT NULL,
    distinct_users           BIGINT NOT NULL,
    engagement_seconds_total NUMERIC NOT NULL,
    engagement_pct_sum       NUMERIC NOT NULL,
    engagement_pct_events    BIGINT NOT NULL,
    engagement_pct_avg       NUMERIC GENERATED ALWAYS AS
        (engagement_pct_sum / NULLIF(engagement_pct_events, 0)) STORED,
    last_event_ts            TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (content_id, day)
);

CREATE TABLE analytics.content_type_analysis (
    content_type             TEXT,
    day                      DATE NOT NULL,
    events                   BIGINT NOT NULL,
    plays                    BIGINT NOT NULL,
    pauses                   BIGINT NOT NULL,
    finishes                 BIGINT NOT NULL,
    clicks                   BIGINT NOT NULL,
    distinct_users           BIGINT NOT NULL,
    engagement_seconds_total NUMERIC NOT NULL,
    engagement_pct_sum       NUMERIC NOT NULL,
    engagement_pct_events    BIGINT NOT NULL,
    engagement_pct_avg       NUMERIC GENERATED ALWAYS AS
        (engagement_pct_sum / NULLIF(engagement_pct_events, 0)) STORED,
    last_event_ts            TIMESTAMPTZ NOT NULL,
    UNIQUE NULLS NOT DISTINCT (content_type, day)
);

CREATE TABLE analytics.device_analysis (
    device                   TEXT,
    day                      DATE NOT NULL,
    events                   BIGINT NOT NULL,
    plays                    BIGINT NOT NULL,
    pauses                   BIGINT NOT NULL,
    finishes                 BIGINT NOT NULL,
    clicks                   BIGINT NOT NULL,
    distinct_users           BIGINT NOT NULL,
    engagement_seconds_total NUMERIC NOT NULL,
    engagement_pct_sum       NUMERIC NOT NULL,
    engagement_pct_events    BIGINT NOT NULL,
    engagement_pct_avg       NUMERIC GENERATED ALWAYS AS
        (engagement_pct_sum / NULLIF(engagement_pct_events, 0)) STORED,
    last_event_ts            TIMESTAMPTZ NOT NULL,
    UNIQUE NULLS NOT DISTINCT (device, day)
);

-- The users already counted in each aggregate row, so distinct_users stays exact when it
-- is incremented: a user adds 1 only when inserting it here finds no row.
CREATE TABLE analytics.content_engagement_metrics_users (
    content_id UUID NOT NULL,
    user_id    UUID NOT NULL,
    PRIMARY KEY (content_id, user_id)
);
CREATE TABLE analytics.content_engagement_daily_users (
    content_id UUID NOT NULL,
    day        DATE NOT NULL,
    user_id    UUID NOT NULL,
    PRIMARY KEY (content_id, day, user_id)
);
CREATE TABLE analytics.content_type_analysis_users (
    content_type TEXT,
    day          DATE NOT NULL,
    user_id      UUID NOT NULL,
    UNIQUE NULLS NOT DISTINCT (content_type, day, user_id)
);
CREATE TABLE analytics.device_analysis_users (
    device  TEXT,
    day     DATE NOT NULL,
    user_id UUID NOT NULL,
    UNIQUE NULLS NOT DISTINCT (device, day, user_id)
);

-- The last position each sink applied, written in the same transaction as its data.
CREATE TABLE analytics.walcast_checkpoint (
    sink        TEXT PRIMARY KEY,
    commit_lsn  PG_LSN NOT NULL,
    seq         INTEGER NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Rows that could not become events (origin 'source'), and later batches a sink gave up
-- on (origin = the sink's name). A position is recorded once per origin, so a replay
-- after a crash does not record it twice.
CREATE TABLE analytics.dead_letters (
    id           BIGSERIAL PRIMARY KEY,
    origin       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    detail       TEXT,
    source_table TEXT,
    commit_lsn   PG_LSN NOT NULL,
    seq          INTEGER NOT NULL,
    raw          JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (origin, commit_lsn, seq)
);
CREATE INDEX dead_letters_reason ON analytics.dead_letters (reason, created_at);
