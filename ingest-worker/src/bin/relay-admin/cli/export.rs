//! `export`: stored events matching a filter, as JSON lines.
//!
//! The rows come from a server-side cursor (a portal of the filter's query from
//! [`shared::sql::events_query`], fetched [`PAGE`] rows at a time) inside one read-only
//! transaction, so the export is one consistent snapshot and memory holds one page.
//! `desc` follows the `events_created` index (ties sorted in memory); `asc` makes Postgres
//! sort (on disk when large).

use std::path::PathBuf;

use anyhow::Context as _;
use deadpool_postgres::Pool;
use shared::bus::Viewer;
use shared::event::EventId;
use shared::filter::Filter;
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufWriter};
use tokio::sync::mpsc;

/// Rows fetched from the cursor at a time.
pub const PAGE: i32 = 1000;

/// `relay-admin export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A NIP-01 filter as JSON (default: every event). Its `limit` caps the count.
    #[arg(long, default_value = "{}")]
    pub filter: String,
    /// Where to write; standard output when absent or `-`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Oldest first (`asc`, re-imports in publication order) or newest first (`desc`).
    #[arg(long, value_enum, default_value_t = Order::Asc)]
    pub order: Order,
}

/// The order of an export.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Oldest first (ties: lowest id first).
    Asc,
    /// Newest first (ties: lowest id first).
    Desc,
}

/// One stored event.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its id.
    pub id: EventId,
    /// The JSON it is served as.
    pub json: String,
}

/// Streams the stored events matching `filter` (expired ones hidden, every kind visible)
/// in pages over a bounded channel; a failure is the last item.
pub fn stream(
    pool: Pool,
    filter: Filter,
    order: Order,
) -> mpsc::Receiver<anyhow::Result<Vec<Stored>>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        if let Err(e) = read_pages(&pool, &filter, order, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

async fn read_pages(
    pool: &Pool,
    filter: &Filter,
    order: Order,
    out: &mpsc::Sender<anyhow::Result<Vec<Stored>>>,
) -> anyhow::Result<()> {
    let query = shared::sql::events_query(
        filter,
        &Viewer::default(),
        shared::unix_now(),
        super::row_limit(filter),
    );
    let sql = match order {
        Order::Desc => query.sql.clone(),
        Order::Asc => format!(
            "SELECT id, created_at, json FROM ({}) AS matching ORDER BY created_at, id",
            query.sql
        ),
    };
    let mut client = pool.get().await.context("cannot reach the database")?;
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let statement = tx.prepare(&sql).await?;
    let portal = tx.bind(&statement, &query.param_refs()).await?;
    loop {
        let rows = tx.query_portal(&portal, PAGE).await?;
        if rows.is_empty() {
            break;
        }
        let mut page = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Vec<u8> = row.try_get(0)?;
            let id = EventId::from_slice(&id)
                .ok_or_else(|| anyhow::anyhow!("stored id is not 32 bytes"))?;
            page.push(Stored {
                id,
                json: row.try_get(2)?,
            });
        }
        if out.send(Ok(page)).await.is_err() {
            break;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// `relay-admin export`.
pub async fn run(pool: &Pool, args: ExportArgs) -> anyhow::Result<()> {
    let filter = super::parse_filter(&args.filter)?;
    let out: Box<dyn AsyncWrite + Unpin + Send> = match &args.out {
        Some(path) if path.as_os_str() != "-" => Box::new(
            tokio::fs::File::create(path)
                .await
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        _ => Box::new(tokio::io::stdout()),
    };
    let mut out = BufWriter::new(out);
    let mut pages = stream(pool.clone(), filter, args.order);
    let mut count = 0u64;
    while let Some(page) = pages.recv().await {
        for event in page? {
            out.write_all(event.json.as_bytes()).await?;
            out.write_all(b"\n").await?;
            count += 1;
        }
    }
    out.flush().await.context("writing the export failed")?;
    eprintln!("exported {count} events");
    Ok(())
}
