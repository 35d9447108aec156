//! `stats`: what is stored and how far behind the workers are.

use anyhow::Context as _;
use deadpool_postgres::Pool;
use serde_json::json;
use shared::bus::{Bus, Role, StreamFigures, stream_figures};
use shared::config::BusConfig;

/// `relay-admin stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// How many kinds to list, most frequent first.
    #[arg(long, default_value_t = 20)]
    pub top: i64,
    /// One JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `relay-admin stats`. Database figures always; when Redis cannot be reached the stream
/// section says so and the command fails after printing the rest.
pub async fn run(pool: &Pool, bus: &BusConfig, args: StatsArgs) -> anyhow::Result<()> {
    let client = pool.get().await.context("cannot reach the database")?;
    let total: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .try_get(0)?;
    let size: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .try_get(0)?;
    let mut kinds = Vec::new();
    for row in client
        .query(
            "SELECT kind, count(*) FROM events GROUP BY kind ORDER BY 2 DESC, 1 LIMIT $1",
            &[&args.top.max(0)],
        )
        .await?
    {
        kinds.push((row.try_get::<_, i32>(0)?, row.try_get::<_, i64>(1)?));
    }
    let streams = stream_stats(bus).await;

    if args.json {
        let streams_json = match &streams {
            Ok(list) => json!(
                list.iter()
                    .map(
                        |s| json!({"stream": s.stream, "group": s.group, "length": s.length,
                                "pending": s.pending, "lag": s.lag})
                    )
                    .collect::<Vec<_>>()
            ),
            Err(e) => json!({"error": e.to_string()}),
        };
        let doc = json!({
            "total_events": total,
            "database_bytes": size,
            "kinds": kinds.iter().map(|(k, n)| json!({"kind": k, "count": n})).collect::<Vec<_>>(),
            "streams": streams_json,
        });
        println!("{doc:#}");
    } else {
        println!("total events   {total}");
        println!("database size  {} ({size} bytes)", human_bytes(size));
        println!();
        println!("{:>8}  {:>12}", "kind", "events");
        for (kind, n) in &kinds {
            println!("{kind:>8}  {n:>12}");
        }
        println!();
        match &streams {
            Ok(list) => {
                println!(
                    "{:<32}  {:<7}  {:>10}  {:>8}  {:>8}",
                    "stream", "group", "length", "pending", "lag"
                );
                let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                for s in list {
                    println!(
                        "{:<32}  {:<7}  {:>10}  {:>8}  {:>8}",
                        s.stream,
                        s.group,
                        s.length,
                        opt(s.pending),
                        opt(s.lag)
                    );
                }
            }
            Err(e) => println!("streams unavailable: {e:#}"),
        }
    }
    streams.map(|_| ())
}

async fn stream_stats(config: &BusConfig) -> anyhow::Result<Vec<StreamFigures>> {
    let client = redis::Client::open(config.redis_url.as_str()).context("bad Redis URL")?;
    let mut conn = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("Redis did not answer within 5 s")?
    .context("cannot reach Redis")?;
    let bus = Bus::new(config);
    let mut out = Vec::new();
    for role in [Role::Ingest, Role::Query] {
        out.extend(stream_figures(&mut conn, &bus, role).await?);
    }
    Ok(out)
}

fn human_bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < units.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", units[unit])
}
