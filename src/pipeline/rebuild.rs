//! Healing at start: a sink whose state went back in time is rebuilt from the source table.
//!
//! walcast tells PostgreSQL a position only after every sink applied everything up to it.
//! So a row whose commit the slot has passed is in every sink, and every sink's
//! checkpoint is at least that row's position. A sink is behind — it lost writes it had
//! confirmed, or never had them — when
//!
//! - it holds no checkpoint while another sink does (a Redis that restarted empty, a sink
//!   added to `WALCAST_SINKS` later), or
//! - its checkpoint is below a row another sink applied and the slot passed (a Redis
//!   restarted from an older snapshot or failed over to a replica that was behind, an
//!   analytics database restored from an older backup, a sink left out for a run).
//!
//! Streaming cannot give those rows back (the slot is past them); the table can. One case
//! the checkpoints cannot show: a sink that went back to an older position when the only
//! other sink's checkpoint is past the slot, so that no checkpoint proves a row between
//! them. While walcast runs, the Redis sink notices a checkpoint that went back on its
//! next write (see `sink::redis`), and walcast stops so the next start rebuilds it.
//!
//! The rebuild is the backfill path: the whole table, read under a snapshot taken now,
//! written into the sinks that are behind only, idempotently by event id (Redis's id
//! bitmap, `ON CONFLICT (id)` in the analytics tables, which also keeps every aggregate
//! exact). Everything committed before the snapshot is then in them; what commits after
//! it is streamed from the slot as usual. Each rebuilt sink's checkpoint is then raised
//! to the position the others hold, so the next start does not rebuild it again.
//!
//! The webhook is left out: walcast cannot know what the receiver kept, and re-sending
//! the table would flood it.

use std::future::Future;

use crate::config::{BackfillConfig, Destinations, RedisTarget, RunConfig, SinkKind};
use crate::lsn::{Lsn, Position, SourceId};
use crate::sink::{self, SinkError};
use crate::state::{PgState, StateStore};
use crate::{Error, backfill};

/// The sinks that are behind, and the highest checkpoint any sink holds (what a rebuild
/// brings them to: every row up to it committed before the rebuild's snapshot). Only
/// Redis and the analytics sink are judged (see the module doc).
/// A sink that found itself partly behind (`lost`: a Redis Cluster slot) is rebuilt too.
pub(crate) fn behind(
    checkpoints: &[(&'static str, Option<Position>)],
    slot_confirmed: Lsn,
    lost: &[(&'static str, Position)],
) -> Option<(Vec<&'static str>, Position)> {
    let by_checkpoints = behind_by_checkpoints(checkpoints, slot_confirmed);
    if lost.is_empty() {
        return by_checkpoints;
    }
    let (mut behind, mut ahead) = by_checkpoints.unwrap_or((Vec::new(), lost[0].1));
    for (name, position) in lost {
        if !behind.contains(name) {
            behind.push(name);
        }
        ahead = ahead.max(*position);
    }
    Some((behind, ahead))
}

fn behind_by_checkpoints(
    checkpoints: &[(&'static str, Option<Position>)],
    slot_confirmed: Lsn,
) -> Option<(Vec<&'static str>, Position)> {
    let judged = |name: &str| name == sink::redis::NAME || name == sink::postgres::NAME;
    let held = || {
        checkpoints
            .iter()
            .filter(|(name, _)| judged(name))
            .filter_map(|(_, checkpoint)| *checkpoint)
    };
    let highest = held().max()?;
    let passed = held()
        .filter(|position| position.commit_lsn < slot_confirmed)
        .max();
    let behind: Vec<&'static str> = checkpoints
        .iter()
        .filter(|(name, checkpoint)| {
            judged(name)
                && match checkpoint {
                    None => true,
                    Some(p) => passed.is_some_and(|passed| *p < passed),
                }
        })
        .map(|(name, _)| *name)
        .collect();
    (!behind.is_empty()).then_some((behind, highest))
}

/// Rebuilds `sinks` from the table and raises their checkpoints to `ahead`, the highest
/// checkpoint of any sink. `Ok(false)`
/// when `shutdown` came first (the rebuild resumes at the next start).
pub(crate) async fn rebuild(
    config: &RunConfig,
    sinks: &[&'static str],
    ahead: Position,
    source_id: SourceId,
    shutdown: impl Future<Output = ()>,
) -> Result<bool, Error> {
    let kinds: Vec<SinkKind> = config
        .destinations
        .sinks
        .kinds
        .iter()
        .copied()
        .filter(|kind| sinks.contains(&kind.name()))
        .collect();
    let backfill = BackfillConfig {
        source: config.source.clone(),
        destinations: Destinations {
            sinks: crate::config::SinkArgs { kinds },
            ..config.destinations.clone()
        },
        since: None,
        until: None,
        from_id: None,
        to_id: None,
        batch_max_events: config.batch_max_events,
    };
    let summary = backfill::run(backfill, shutdown).await?;
    if summary.interrupted {
        return Ok(false);
    }
    tracing::info!(sinks = ?sinks, rows = summary.rows, elapsed_s = summary.elapsed.as_secs_f64(), "sinks rebuilt from the table");
    let start = |sink: &'static str| move |source: SinkError| Error::SinkStart { sink, source };
    for name in sinks {
        match *name {
            sink::redis::NAME => {
                let key = sink::redis::checkpoint_key(config.source.partition());
                match config.destinations.redis.target()? {
                    RedisTarget::Single(client) => {
                        sink::redis::raise_checkpoint(client, &key, ahead, source_id).await
                    }
                    RedisTarget::Cluster(client) => {
                        sink::redis_cluster::raise_checkpoint(client, &key, ahead, source_id).await
                    }
                }
                .map_err(start(name))?;
            }
            sink::postgres::NAME => {
                let analytics = config
                    .destinations
                    .analytics
                    .pg_config(&config.source.url)?;
                let client = crate::pg::connect("WALCAST_ANALYTICS_URL", &analytics).await?;
                PgState::new(&client)
                    .raise_checkpoint(
                        &config.source.partition().state_name(sink::postgres::NAME),
                        ahead,
                    )
                    .await
                    .map_err(|e| start(name)(e.into()))?;
            }
            _ => {}
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, seq: u32) -> Option<Position> {
        Some(Position::new(Lsn(lsn), seq))
    }

    #[test]
    fn a_sink_below_what_another_holds_and_the_slot_passed_is_behind() {
        // In step, or ahead of the slot (applied, not yet acknowledged): nothing behind.
        assert_eq!(
            behind(
                &[("redis", at(100, 3)), ("postgres", at(100, 3))],
                Lsn(200),
                &[]
            ),
            None
        );
        assert_eq!(
            behind(
                &[("redis", at(100, 3)), ("postgres", at(300, 0))],
                Lsn(200),
                &[]
            ),
            None
        );
        // Redis emptied, or restored from an older snapshot.
        assert_eq!(
            behind(&[("redis", None), ("postgres", at(100, 3))], Lsn(200), &[]),
            Some((vec!["redis"], Position::new(Lsn(100), 3)))
        );
        assert_eq!(
            behind(
                &[("redis", at(50, 9)), ("postgres", at(100, 3))],
                Lsn(200),
                &[]
            ),
            Some((vec!["redis"], Position::new(Lsn(100), 3)))
        );
        // Emptied while the other sink is already past the slot: still behind, brought to
        // what the other holds.
        assert_eq!(
            behind(&[("redis", None), ("postgres", at(300, 0))], Lsn(200), &[]),
            Some((vec!["redis"], Position::new(Lsn(300), 0)))
        );
        // A first start: nobody holds anything.
        assert_eq!(
            behind(&[("redis", None), ("postgres", None)], Lsn(200), &[]),
            None
        );
        // The webhook is not judged.
        assert_eq!(
            behind(
                &[("webhook", None), ("postgres", at(100, 3))],
                Lsn(200),
                &[]
            ),
            None
        );
        // A sink that lost part of its writes is rebuilt to what it held, alone or with
        // one the checkpoints show behind.
        let held = at(100, 3).unwrap();
        assert_eq!(
            behind(&[("redis", Some(held))], Lsn(200), &[("redis", held)]),
            Some((vec!["redis"], held))
        );
        assert_eq!(
            behind(
                &[("redis", Some(held)), ("postgres", None)],
                Lsn(200),
                &[("redis", held)]
            ),
            Some((vec!["postgres", "redis"], held))
        );
    }
}
