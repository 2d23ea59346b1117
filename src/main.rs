//! The `walcast` command line: parse, set up logging, call into the library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use walcast::config::{
    AnalyticsArgs, BackfillConfig, LogArgs, LogFormat, RedisArgs, RunConfig, SinkArgs, SinkKind,
    SourceArgs, SourceUrl, WebhookEndpoint,
};
use walcast::shutdown::{self, CancellationToken};
use walcast::{source, verify};

/// PostgreSQL change-data-capture for engagement analytics.
#[derive(Debug, Parser)]
#[command(name = "walcast", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream: ensure publication and slot, load the content cache, replicate, fan out, ack.
    Run(Box<RunConfig>),
    /// Copy existing engagement_events through the same enrichment and sinks: the initial
    /// snapshot (no slot yet: creates it with its snapshot), the whole table again, or a
    /// range. Safe to run twice and while `walcast run` streams; an interrupted run resumes.
    Backfill(Box<BackfillConfig>),
    /// Throwaway PostgreSQL and Redis, the generator and the pipeline together, with a
    /// live view. Ctrl-C stops and removes everything.
    Demo(walcast::demo::DemoArgs),
    /// Insert realistic engagement events at a steady rate (and a content catalogue).
    Generate(Box<walcast::generate::GenerateArgs>),
    /// Check the source database and create the publication and slot (idempotent).
    Setup(SetupArgs),
    /// Drop the slot and the publication.
    Teardown(SourceArgs),
    /// The slot's position, lag, retained WAL and wal_status, and each sink's checkpoint.
    /// Exits 1 when the slot is missing or invalidated or a checkpoint cannot be read.
    Status(StatusArgs),
    /// Top content by engagement seconds over the last N minutes, from Redis.
    Top(TopArgs),
    /// Dead letters: send again what the webhook could not deliver.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Reconcile: every source event in every sink once, aggregates equal to the facts.
    /// Exits 1 when something differs.
    Verify(VerifyArgs),
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// Send every dead-lettered batch of a sink that was not replayed yet again, oldest
    /// first, under its original idempotency key; mark each one accepted. Exits 1 when
    /// some are still not accepted.
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReplaySink {
    Webhook,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The sink whose dead letters to send again.
    #[arg(long, env = "WALCAST_REPLAY_SINK", value_enum)]
    sink: ReplaySink,
    #[command(flatten)]
    source: SourceUrl,
    #[command(flatten)]
    analytics: AnalyticsArgs,
    #[command(flatten)]
    webhook: WebhookEndpoint,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    source: SourceUrl,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    analytics: AnalyticsArgs,
    /// Which sinks to check (the webhook cannot be checked from here).
    #[command(flatten)]
    sinks: SinkArgs,
    /// With a source partitioned over several walcast instances: how many, so that the
    /// report also counts per partition (`id % WALCAST_PARTITIONS`).
    #[arg(long, env = "WALCAST_PARTITIONS", default_value_t = 1)]
    partitions: u32,
}

#[derive(Debug, Args)]
struct SetupArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Also create the source tables (sql/001_source_schema.sql) where they are missing.
    #[arg(long, env = "WALCAST_SETUP_CREATE_SCHEMA")]
    create_schema: bool,
    /// Print the statements a DBA runs to give walcast's role (the user of
    /// WALCAST_SOURCE_URL) exactly what it needs, and change nothing.
    #[arg(long)]
    print_sql: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Which sinks' checkpoints to read.
    #[command(flatten)]
    sinks: SinkArgs,
    /// Print JSON instead of a table.
    #[arg(long, env = "WALCAST_STATUS_JSON")]
    json: bool,
}

/// The servers walcast reads from and writes to.
#[derive(Debug, Args)]
struct Endpoints {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    analytics: AnalyticsArgs,
}

#[derive(Debug, Args)]
struct TopArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// How many minute buckets, ending with the current minute.
    #[arg(long, env = "WALCAST_TOP_MINUTES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=120))]
    minutes: u32,
    /// How many entries to print.
    #[arg(long, env = "WALCAST_TOP_LIMIT", default_value_t = 10)]
    limit: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    // The demo's live view owns the terminal: only errors go to the log unless asked.
    if matches!(cli.command, Command::Demo(_)) && std::env::var_os("WALCAST_LOG").is_none() {
        cli.log.log = "error".to_owned();
    }
    init_tracing(&cli.log);
    match dispatch(cli.command).await {
        Ok(Outcome::Done) => std::process::ExitCode::SUCCESS,
        // The command printed what it found; the exit status says it is not all well.
        Ok(Outcome::Findings) => std::process::ExitCode::from(1),
        Err(err) => {
            let message = walcast::error::Chain(err.as_ref()).to_string();
            tracing::error!("{message}");
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a command that did not fail ended.
enum Outcome {
    Done,
    /// It ran to its end and found something wrong, which it printed (`verify` found a
    /// difference, `status` a missing slot, a replay dead letters still not accepted).
    Findings,
}

async fn dispatch(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Run(config) => {
            let token = CancellationToken::new();
            shutdown::on_signals(token.clone());
            walcast::pipeline::run(*config, token.cancelled_owned()).await?;
        }
        Command::Backfill(config) => {
            let token = CancellationToken::new();
            shutdown::on_signals(token.clone());
            let summary = walcast::backfill::run(*config, token.cancelled_owned()).await?;
            let seconds = summary.elapsed.as_secs_f64();
            let resumed = summary
                .resumed_after
                .map_or(String::new(), |id| format!(", resumed after id {id}"));
            println!(
                "backfill {}: {} rows ({} dead letters) in {:.1} s, {:.0} rows/s{resumed}",
                summary.job,
                summary.rows,
                summary.dead_letters,
                seconds,
                summary.rows as f64 / seconds.max(1e-3),
            );
            if summary.interrupted {
                anyhow::bail!(
                    "interrupted: what was read is applied; run the same command again to resume"
                );
            }
        }
        Command::Demo(args) => {
            let token = CancellationToken::new();
            let cleanup = walcast::demo::Cleanup::default();
            shutdown::on_signals_then(token.clone(), {
                let cleanup = cleanup.clone();
                move || cleanup.now()
            });
            let last = walcast::demo::run(args, token.cancelled_owned(), &cleanup).await?;
            println!("{}", walcast::demo::summary(&last));
        }
        Command::Generate(args) => {
            args.source.validate()?;
            let token = CancellationToken::new();
            shutdown::on_signals(token.clone());
            let generated = walcast::generate::run(&args, token.cancelled_owned()).await?;
            println!(
                "generated {} events in {:.1} s ({:.0}/s; {} content missing, {} NULL event_ts)",
                generated.events,
                generated.elapsed.as_secs_f64(),
                generated.rate(),
                generated.content_missing,
                generated.null_event_ts
            );
        }
        Command::Setup(args) => {
            args.source.validate()?;
            if args.print_sql {
                let target = args.source.pg_config()?;
                let role = target.get_user().unwrap_or("walcast");
                let database = target.get_dbname().unwrap_or(role);
                print!(
                    "{}",
                    source::privileges::grants_sql(
                        role,
                        database,
                        &args.source.publication(),
                        &source::published_tables(args.source.partition()),
                    )
                );
                return Ok(Outcome::Done);
            }
            let client = connect(&args.source.url).await?;
            if args.create_schema {
                source::create_schema(&client).await?;
                println!("source schema present");
            }
            let done = source::ensure(&client, &args.source).await?;
            for line in &done {
                println!("{line}");
            }
            if done.is_empty() {
                println!(
                    "nothing to do: publication {} and slot {} are in place",
                    args.source.publication(),
                    args.source.slot()
                );
            }
        }
        Command::Teardown(source_args) => {
            source_args.validate()?;
            let client = connect(&source_args.url).await?;
            let done = source::teardown(&client, &source_args).await?;
            for line in &done {
                println!("{line}");
            }
            if done.is_empty() {
                println!(
                    "nothing to do: no slot {} and no publication {}",
                    source_args.slot(),
                    source_args.publication()
                );
            }
        }
        Command::DeadLetters(DeadLettersCommand::Replay(args)) => {
            let ReplaySink::Webhook = args.sink;
            args.source.validate()?;
            args.webhook.validate()?;
            let deliverer = walcast::sink::webhook::Deliverer::new(&args.webhook)?;
            let client = analytics_client(&args.analytics, &args.source).await?;
            let mut state = walcast::state::PgState::new(&client);
            let (replayed, failed) = walcast::sink::webhook::replay(&deliverer, &mut state).await?;
            println!("replayed {replayed} webhook dead letters; {failed} still not accepted");
            if failed > 0 {
                return Ok(Outcome::Findings);
            }
        }
        Command::Status(args) => {
            if !status(args).await? {
                return Ok(Outcome::Findings);
            }
        }
        Command::Verify(args) => {
            if !verify(args).await? {
                return Ok(Outcome::Findings);
            }
        }
        Command::Top(args) => {
            args.redis.validate()?;
            let mut conn = walcast::query::Connection::open(args.redis.target()?).await?;
            let entries =
                walcast::query::top(&mut conn, args.minutes, args.limit, chrono::Utc::now())
                    .await?;
            if entries.is_empty() {
                eprintln!("no engagement in the last {} minutes", args.minutes);
            }
            for entry in entries {
                println!("{} {:.2}", entry.content_id, entry.engagement_seconds);
            }
        }
    }
    Ok(Outcome::Done)
}

async fn connect(source_args: &SourceUrl) -> anyhow::Result<tokio_postgres::Client> {
    Ok(walcast::pg::connect("WALCAST_SOURCE_URL", &source_args.pg_config()?).await?)
}

async fn status(args: StatusArgs) -> anyhow::Result<bool> {
    let Endpoints {
        source: source_args,
        redis,
        analytics,
    } = &args.endpoints;
    source_args.validate_any_partition()?;
    // One report per partition: every one when the source is partitioned and
    // WALCAST_PARTITION names none.
    let mut reports = Vec::new();
    for partition in source_args.each_partition() {
        reports.push(walcast::status::collect(&partition, redis, analytics, &args.sinks).await?);
    }
    let healthy = reports.iter().all(walcast::status::Report::is_healthy);
    match (args.json, &reports[..]) {
        (true, [report]) => println!("{}", serde_json::to_string_pretty(report)?),
        (true, _) => println!(
            "{}",
            serde_json::to_string_pretty(&walcast::status::Partitioned::of(reports))?
        ),
        (false, [report]) => print!("{report}"),
        (false, _) => print!("{}", walcast::status::Partitioned::of(reports)),
    }
    Ok(healthy)
}

async fn analytics_client(
    analytics: &AnalyticsArgs,
    source_args: &SourceUrl,
) -> anyhow::Result<tokio_postgres::Client> {
    Ok(walcast::pg::connect("WALCAST_ANALYTICS_URL", &analytics.pg_config(source_args)?).await?)
}

/// Prints the reconciliation report; `false` when something differs.
async fn verify(args: VerifyArgs) -> anyhow::Result<bool> {
    let VerifyArgs {
        source: source_args,
        redis: redis_args,
        analytics: analytics_args,
        sinks,
        partitions,
    } = &args;
    source_args.validate()?;
    if !(1..=walcast::config::MAX_PARTITIONS).contains(partitions) {
        anyhow::bail!(
            "WALCAST_PARTITIONS: must be 1 to {}",
            walcast::config::MAX_PARTITIONS
        );
    }
    if sinks.contains(SinkKind::Redis) {
        redis_args.validate()?;
    }
    analytics_args.pg_config(source_args)?;
    let source_client = connect(source_args).await?;
    let analytics = if sinks.contains(SinkKind::Postgres) {
        Some(analytics_client(analytics_args, source_args).await?)
    } else {
        None
    };
    let mut report = verify::source(&source_client, analytics.as_ref())
        .await
        .context("counting source events")?;
    if let Some(client) = &analytics {
        report.analytics = Some(
            verify::analytics(&source_client, client, *partitions)
                .await
                .context("reconciling the analytics schema")?,
        );
    }
    if sinks.contains(SinkKind::Redis) {
        let mut conn = walcast::query::Connection::open(redis_args.target()?).await?;
        report.redis_total = Some(
            walcast::query::total(&mut conn)
                .await
                .context("reading stats:events")?,
        );
    }
    println!("{report}");
    Ok(report.is_consistent())
}

fn init_tracing(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
