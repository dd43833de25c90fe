//! The ledger's database: SQLite (a file, by default) or PostgreSQL (`postgres://…`, for
//! a fleet sharing one ledger), one schema for both from the migrations in `migrations/`,
//! idempotent batch inserts and per-backend sums over a time range.
//!
//! Queries are built at run time (no compile-time checking), so building lifeboat never
//! needs a database. Both drivers take `$1`-style placeholders, and every statement here
//! is plain SQL both understand, so each query is written once and run on either pool.

use std::{borrow::Cow, str::FromStr, time::Duration};

use futures_util::future::BoxFuture;
use sqlx::{
    ColumnIndex, Decode, Row, Type,
    error::BoxDynError,
    migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

use super::record::{AttemptRecord, Outcome, TokenCounts};
use crate::backend::{BackendKind, ClientId};

/// Rows per `INSERT` statement: 21 binds each stays far below SQLite's 32 766 and
/// PostgreSQL's 65 535 bind limits.
const ROWS_PER_STATEMENT: usize = 500;

/// Connections per pool: the writer needs one, readers (the usage API) a few.
const MAX_CONNECTIONS: u32 = 4;

/// How long to wait for a connection before a write or read fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns in the order every insert binds them.
const COLUMNS: &str = "request_id, attempt, route, backend_id, backend_kind, backend_model, \
    client_id, started_ms, first_token_ms, ended_ms, outcome, error_kind, fallback_reason, \
    prompt_tokens, completion_tokens, cached_prompt_tokens, reasoning_tokens, \
    usage_estimated, unpriced, cost_nanos, avoided_nanos";

/// What can go wrong with the ledger's database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("ledger database: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("ledger migrations: {0}")]
    Migrate(#[from] MigrateError),
    /// A schema name with characters other than `[a-z0-9_]`.
    #[error("ledger schema name {0:?} must be lowercase letters, digits and underscores")]
    SchemaName(String),
    /// A stored value this version cannot read (written by a newer one, or edited by hand).
    #[error("ledger row {request_id}/{attempt}: unreadable {field} {value:?}")]
    Unreadable {
        request_id: String,
        attempt: i64,
        field: &'static str,
        value: String,
    },
}

/// Token and cost sums of one backend over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTotals {
    /// The backend's configured id.
    pub backend_id: String,
    /// Remote or local.
    pub backend_kind: BackendKind,
    /// Attempts counted.
    pub attempts: u64,
    /// Their tokens, summed per kind.
    pub tokens: TokenCounts,
    /// Their cost, nano-dollars.
    pub cost_nanos: i64,
    /// What the remote would have charged for the local attempts among them.
    pub avoided_nanos: i64,
}

/// A connection pool to the ledger's database, SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds and `$db` naming its
/// database type: one query text, written once, for both drivers.
macro_rules! on_pool {
    ($store:expr, $pool:ident, $db:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                $body
            }
            Pool::Postgres($pool) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                $body
            }
        }
    };
}

/// The migrations, compiled into the binary so a deployed lifeboat needs no files.
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            Ok(vec![Migration::new(
                1,
                Cow::Borrowed("ledger attempts"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../../migrations/0001_ledger_attempts.sql")),
                false,
            )])
        })
    }
}

impl Store {
    /// Opens the ledger at `url` and brings its schema up to date. A URL starting with
    /// `postgres://` or `postgresql://` is a PostgreSQL server; anything else is a SQLite
    /// file (`sqlite://path`, `sqlite:path` or a bare path), created if missing and put in
    /// WAL mode. Pools hold up to 4 connections and wait 5 s for one.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        if is_postgres(url) {
            Store::open_postgres(PgConnectOptions::from_str(url)?).await
        } else {
            Store::open_sqlite(url).await
        }
    }

    /// [`Store::open`] on PostgreSQL with the ledger's tables in `schema` (which must
    /// exist), so several ledgers, or tests, can share one database.
    pub async fn open_postgres_in_schema(url: &str, schema: &str) -> Result<Store, StoreError> {
        let plain = schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if schema.is_empty() || !plain {
            return Err(StoreError::SchemaName(schema.to_owned()));
        }
        let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
        Store::open_postgres(options).await
    }

    async fn open_postgres(options: PgConnectOptions) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        // PostgreSQL's migrator takes an advisory lock, so boxes starting together apply
        // the schema once.
        Migrator::new(Embedded).await?.run(&pool).await?;
        Ok(Store {
            pool: Pool::Postgres(pool),
        })
    }

    async fn open_sqlite(url: &str) -> Result<Store, StoreError> {
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url)?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = options
            .create_if_missing(true)
            // WAL: readers (the usage API) never block the writer. NORMAL sync in WAL mode
            // loses nothing on a process crash, only on power loss, and saves an fsync per
            // commit.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(ACQUIRE_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Migrator::new(Embedded).await?.run(&pool).await?;
        Ok(Store {
            pool: Pool::Sqlite(pool),
        })
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn driver(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Inserts `rows` in one transaction; a row whose (request id, attempt) is already
    /// stored is skipped, so replaying a batch never duplicates. Returns the rows added.
    pub async fn insert_batch(&self, rows: &[AttemptRecord]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        on_pool!(self, pool, Db => {
            let mut tx = pool.begin().await?;
            let mut inserted = 0;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut query =
                    sqlx::QueryBuilder::<Db>::new(format!("INSERT INTO ledger_attempts ({COLUMNS}) "));
                query.push_values(chunk, |mut values, row| {
                    values
                        .push_bind(row.request_id.as_str())
                        .push_bind(i64::from(row.attempt))
                        .push_bind(row.route.as_str())
                        .push_bind(row.backend_id.as_str())
                        .push_bind(row.backend_kind.as_str())
                        .push_bind(row.backend_model.as_str())
                        .push_bind(row.client.as_str())
                        .push_bind(row.started_ms)
                        .push_bind(row.first_token_ms)
                        .push_bind(row.ended_ms)
                        .push_bind(row.outcome.as_str())
                        .push_bind(row.outcome.error_kind().map(|kind| kind.as_str()))
                        .push_bind(row.fallback_reason.as_deref())
                        .push_bind(to_i64(row.tokens.prompt))
                        .push_bind(to_i64(row.tokens.completion))
                        .push_bind(to_i64(row.tokens.cached_prompt))
                        .push_bind(to_i64(row.tokens.reasoning))
                        .push_bind(row.usage_estimated)
                        .push_bind(row.unpriced)
                        .push_bind(row.cost_nanos)
                        .push_bind(row.avoided_nanos);
                });
                // Valid on both: SQLite ≥ 3.24's upsert clause and PostgreSQL's.
                query.push(" ON CONFLICT (request_id, attempt) DO NOTHING");
                inserted += query.build().execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// The attempts that started in `[from_ms, to_ms)`, oldest first (then by request id
    /// and attempt). Unbounded: callers page by time range.
    pub async fn attempts_between(&self, from_ms: i64, to_ms: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ledger_attempts WHERE started_ms >= $1 AND started_ms < $2 \
             ORDER BY started_ms, request_id, attempt"
        );
        on_pool!(self, pool, Db => {
            let rows = sqlx::query::<Db>(&sql).bind(from_ms).bind(to_ms).fetch_all(pool).await?;
            rows.iter().map(decode_attempt).collect()
        })
    }

    /// Tokens and cost per backend over the attempts that started in `[from_ms, to_ms)`,
    /// ordered by backend id.
    pub async fn totals_by_backend(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<BackendTotals>, StoreError> {
        // PostgreSQL sums BIGINT into NUMERIC; the casts bring both drivers back to BIGINT.
        let sql = "SELECT backend_id, backend_kind, COUNT(*) AS attempts, \
            CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
            CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
            CAST(SUM(cached_prompt_tokens) AS BIGINT) AS cached_prompt_tokens, \
            CAST(SUM(reasoning_tokens) AS BIGINT) AS reasoning_tokens, \
            CAST(SUM(cost_nanos) AS BIGINT) AS cost_nanos, \
            CAST(SUM(avoided_nanos) AS BIGINT) AS avoided_nanos \
            FROM ledger_attempts WHERE started_ms >= $1 AND started_ms < $2 \
            GROUP BY backend_id, backend_kind ORDER BY backend_id, backend_kind";
        on_pool!(self, pool, Db => {
            let rows = sqlx::query::<Db>(sql).bind(from_ms).bind(to_ms).fetch_all(pool).await?;
            rows.iter().map(decode_totals).collect()
        })
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(&self) {
        on_pool!(self, pool, Db => pool.close().await)
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Token counts above `i64::MAX` cannot happen; saturate rather than wrap if one did.
fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A stored count, which the ledger only ever writes non-negative.
fn to_u64(count: i64) -> u64 {
    u64::try_from(count).unwrap_or(0)
}

fn decode_attempt<R>(row: &R) -> Result<AttemptRecord, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let request_id: String = row.try_get("request_id")?;
    let attempt: i64 = row.try_get("attempt")?;
    let unreadable = |field: &'static str, value: &str| StoreError::Unreadable {
        request_id: request_id.clone(),
        attempt,
        field,
        value: value.to_owned(),
    };
    let kind: String = row.try_get("backend_kind")?;
    let backend_kind = parse_kind(&kind).ok_or_else(|| unreadable("backend_kind", &kind))?;
    let outcome: String = row.try_get("outcome")?;
    let error_kind: Option<String> = row.try_get("error_kind")?;
    let outcome = Outcome::from_parts(&outcome, error_kind.as_deref())
        .ok_or_else(|| unreadable("outcome", &format!("{outcome}/{error_kind:?}")))?;
    let attempt_number = u32::try_from(attempt).map_err(|_| unreadable("attempt", &attempt.to_string()))?;
    Ok(AttemptRecord {
        attempt: attempt_number,
        route: row.try_get("route")?,
        backend_id: row.try_get("backend_id")?,
        backend_kind,
        backend_model: row.try_get("backend_model")?,
        client: ClientId::named(row.try_get::<String, _>("client_id")?),
        started_ms: row.try_get("started_ms")?,
        first_token_ms: row.try_get("first_token_ms")?,
        ended_ms: row.try_get("ended_ms")?,
        outcome,
        fallback_reason: row.try_get("fallback_reason")?,
        tokens: decode_tokens(row)?,
        usage_estimated: row.try_get("usage_estimated")?,
        unpriced: row.try_get("unpriced")?,
        cost_nanos: row.try_get("cost_nanos")?,
        avoided_nanos: row.try_get("avoided_nanos")?,
        request_id,
    })
}

fn decode_tokens<R>(row: &R) -> Result<TokenCounts, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let count = |name: &str| row.try_get::<i64, _>(name).map(to_u64);
    Ok(TokenCounts {
        prompt: count("prompt_tokens")?,
        completion: count("completion_tokens")?,
        cached_prompt: count("cached_prompt_tokens")?,
        reasoning: count("reasoning_tokens")?,
    })
}

fn decode_totals<R>(row: &R) -> Result<BackendTotals, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let backend_id: String = row.try_get("backend_id")?;
    let kind: String = row.try_get("backend_kind")?;
    let backend_kind = parse_kind(&kind).ok_or_else(|| StoreError::Unreadable {
        request_id: format!("(totals of {backend_id})"),
        attempt: 0,
        field: "backend_kind",
        value: kind.clone(),
    })?;
    Ok(BackendTotals {
        backend_id,
        backend_kind,
        attempts: to_u64(row.try_get("attempts")?),
        tokens: decode_tokens(row)?,
        cost_nanos: row.try_get("cost_nanos")?,
        avoided_nanos: row.try_get("avoided_nanos")?,
    })
}

fn parse_kind(label: &str) -> Option<BackendKind> {
    [BackendKind::Remote, BackendKind::Local]
        .into_iter()
        .find(|kind| kind.as_str() == label)
}
