//! `delete`: removes stored events matching a filter (their tags go with them).

use anyhow::Context as _;
use deadpool_postgres::Pool;
use shared::bus::Viewer;

use super::Usage;

/// `relay-admin delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// A NIP-01 filter as JSON; its `limit` caps how many go (newest first).
    #[arg(long)]
    pub filter: String,
    /// Only print how many events would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow the empty filter `{}`, which deletes every event.
    #[arg(long)]
    pub all: bool,
}

/// `relay-admin delete`. Prints `would delete: N` or `deleted: N`.
pub async fn run(pool: &Pool, args: DeleteArgs) -> anyhow::Result<()> {
    let filter = super::parse_filter(&args.filter)?;
    if filter == shared::filter::Filter::default() && !args.all {
        return Err(Usage(
            "refusing to delete with the empty filter {}: it matches every event; add --all"
                .to_owned(),
        )
        .into());
    }
    // Expired events are included: they are never served, but they are stored.
    let viewer = Viewer::default();
    let query = shared::sql::events_query(&filter, &viewer, i64::MIN, super::row_limit(&filter));
    let mut client = pool.get().await.context("cannot reach the database")?;
    if args.dry_run {
        let sql = format!("SELECT count(*) FROM ({}) AS matching", query.sql);
        let n: i64 = client
            .query_one(&sql, &query.param_refs())
            .await?
            .try_get(0)?;
        println!("would delete: {n}");
        return Ok(());
    }
    let sql = format!(
        "DELETE FROM events WHERE id IN (SELECT id FROM ({}) AS matching)",
        query.sql
    );
    let tx = client.transaction().await?;
    let n = tx.execute(&sql, &query.param_refs()).await?;
    tx.commit().await?;
    println!("deleted: {n}");
    Ok(())
}
