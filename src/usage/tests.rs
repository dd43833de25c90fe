//! The ledger's database suite: every test function runs twice, on a SQLite file in a
//! temp dir and on the PostgreSQL server at `LIFEBOAT_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each PostgreSQL test gets its own schema,
//! dropped at the end, so tests run in parallel. An unreachable server fails the tests
//! with a message naming the variable: they never skip.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use sqlx::Connection;

use super::{AttemptRecord, BackendTotals, Ledger, LedgerConfig, Outcome, Store, TokenCounts};
use crate::backend::{BackendKind, ClientId, ErrorKind, TimeoutPhase};

const POSTGRES_URL_VAR: &str = "LIFEBOAT_TEST_POSTGRES_URL";
const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

fn postgres_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| POSTGRES_URL_DEFAULT.to_owned())
}

/// One test's database: a SQLite file, or a PostgreSQL schema of its own.
enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, schema: String },
}

impl TestDb {
    fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().expect("a temp dir"))
    }

    async fn postgres(test: &str) -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let url = postgres_url();
        let schema = format!(
            "lb_test_{test}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = TestDb::admin(&url).await;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .expect("create the test schema");
        TestDb::Postgres { url, schema }
    }

    async fn admin(url: &str) -> sqlx::PgConnection {
        let connect = sqlx::PgConnection::connect(url);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => panic!(
                "PostgreSQL at {url} is unreachable ({error}); the ledger tests need a \
                 server: start one or set {POSTGRES_URL_VAR} to one (trust auth)"
            ),
            Err(_) => panic!(
                "PostgreSQL at {url} did not answer within 10 s; start one or set \
                 {POSTGRES_URL_VAR} to one (trust auth)"
            ),
        }
    }

    /// A new pool on this database (two calls: two independent writers).
    async fn open(&self) -> Store {
        let store = match self {
            TestDb::Sqlite(dir) => {
                let path = dir.path().join("ledger.db");
                Store::open(path.to_str().expect("a UTF-8 temp path")).await
            }
            TestDb::Postgres { url, schema } => Store::open_postgres_in_schema(url, schema).await,
        };
        store.expect("open the ledger")
    }

    async fn cleanup(self) {
        if let TestDb::Postgres { url, schema } = self {
            let mut admin = TestDb::admin(&url).await;
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut admin)
                .await
                .expect("drop the test schema");
        }
    }
}

/// Runs each listed `async fn name(&TestDb)` once on SQLite and once on PostgreSQL.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::sqlite();
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::postgres(stringify!($name)).await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

on_both_databases!(
    rows_round_trip_with_every_field,
    a_replayed_batch_is_stored_once,
    backend_sums_equal_the_rows,
    the_writer_flushes_everything_queued,
    the_writer_writes_a_partial_batch_after_its_interval,
    two_writers_on_one_database_lose_and_duplicate_nothing,
);

const T0: i64 = 1_796_000_000_000; // 2026-11-30, ms UTC

/// A deterministic row: request `n`, attempt `attempt`, fields varied by `n`.
fn row(n: u32, attempt: u32) -> AttemptRecord {
    let backends = [
        ("deepseek", BackendKind::Remote),
        ("backup", BackendKind::Remote),
        ("local", BackendKind::Local),
    ];
    let (backend_id, backend_kind) = backends[(n % 3) as usize];
    let outcomes = [
        Outcome::Served,
        Outcome::Failed(ErrorKind::Timeout(TimeoutPhase::FirstToken)),
        Outcome::Cancelled,
        Outcome::HedgeLoser,
        Outcome::Cut,
        Outcome::Failed(ErrorKind::RateLimited),
    ];
    let started_ms = T0 + i64::from(n) * 1_000 + i64::from(attempt);
    AttemptRecord {
        request_id: format!("req-{n:06}"),
        attempt,
        route: "deepseek-chat".into(),
        backend_id: backend_id.into(),
        backend_kind,
        backend_model: if backend_kind == BackendKind::Local {
            "qwen-0.5b".into()
        } else {
            "deepseek-chat".into()
        },
        client: ClientId::from_api_key(&format!("sk-client-{}", n % 4)),
        started_ms,
        first_token_ms: (n % 5 != 1).then_some(started_ms + 150),
        ended_ms: started_ms + 900,
        outcome: outcomes[(n % 6) as usize],
        fallback_reason: (attempt > 1).then(|| "server_error".to_owned()),
        tokens: TokenCounts {
            prompt: 1_000 + u64::from(n),
            completion: 50 + u64::from(n % 17),
            cached_prompt: u64::from(n % 7) * 100,
            reasoning: u64::from(n % 3) * 10,
        },
        usage_estimated: n.is_multiple_of(4),
        unpriced: n.is_multiple_of(11),
        cost_nanos: 1_008_000 + i64::from(n) * 7,
        avoided_nanos: if backend_kind == BackendKind::Local {
            2_240_000
        } else {
            0
        },
    }
}

fn rows(requests: std::ops::Range<u32>) -> Vec<AttemptRecord> {
    requests
        .flat_map(|n| (1..=(n % 3) + 1).map(move |attempt| row(n, attempt)))
        .collect()
}

async fn all_rows(store: &Store) -> Vec<AttemptRecord> {
    store
        .attempts_between(i64::MIN, i64::MAX)
        .await
        .expect("read the ledger")
}

async fn rows_round_trip_with_every_field(db: &TestDb) {
    let store = db.open().await;
    let mut written = rows(0..40);
    // Extremes: a huge cost, an odd request id, no first token, every option empty.
    let mut edge = row(1_000, 7);
    edge.request_id = "chatcmpl-ü/1 'quoted'".into();
    edge.cost_nanos = i64::MAX;
    edge.first_token_ms = None;
    edge.fallback_reason = None;
    written.push(edge);
    assert_eq!(
        store.insert_batch(&written).await.expect("insert"),
        written.len() as u64
    );
    written.sort_by(|a, b| {
        (a.started_ms, &a.request_id, a.attempt).cmp(&(b.started_ms, &b.request_id, b.attempt))
    });
    assert_eq!(all_rows(&store).await, written);
    store.close().await;
}

async fn a_replayed_batch_is_stored_once(db: &TestDb) {
    let store = db.open().await;
    let batch = rows(0..30);
    let n = batch.len() as u64;
    assert_eq!(store.insert_batch(&batch).await.expect("insert"), n);
    assert_eq!(store.insert_batch(&batch).await.expect("replay"), 0);
    // Half old, half new: only the new half is added.
    let mixed = rows(15..45);
    let new = rows(30..45).len() as u64;
    assert_eq!(store.insert_batch(&mixed).await.expect("mixed"), new);
    let stored = all_rows(&store).await;
    assert_eq!(stored.len() as u64, n + new);
    let keys: HashSet<_> = stored.iter().map(|r| (r.request_id.clone(), r.attempt)).collect();
    assert_eq!(keys.len(), stored.len());
    store.close().await;
}

async fn backend_sums_equal_the_rows(db: &TestDb) {
    let store = db.open().await;
    let batch = rows(0..300);
    store.insert_batch(&batch).await.expect("insert");
    // A range that leaves rows out on both sides.
    let (from, to) = (T0 + 50_000, T0 + 250_000);
    let mut expected: Vec<BackendTotals> = Vec::new();
    for r in batch.iter().filter(|r| r.started_ms >= from && r.started_ms < to) {
        let at = match expected.iter().position(|t| t.backend_id == r.backend_id) {
            Some(at) => at,
            None => {
                expected.push(BackendTotals {
                    backend_id: r.backend_id.clone(),
                    backend_kind: r.backend_kind,
                    attempts: 0,
                    tokens: TokenCounts::default(),
                    cost_nanos: 0,
                    avoided_nanos: 0,
                });
                expected.len() - 1
            }
        };
        let t = &mut expected[at];
        t.attempts += 1;
        t.tokens.prompt += r.tokens.prompt;
        t.tokens.completion += r.tokens.completion;
        t.tokens.cached_prompt += r.tokens.cached_prompt;
        t.tokens.reasoning += r.tokens.reasoning;
        t.cost_nanos += r.cost_nanos;
        t.avoided_nanos += r.avoided_nanos;
    }
    expected.sort_by(|a, b| a.backend_id.cmp(&b.backend_id));
    assert_eq!(expected.len(), 3, "the range holds all three backends");
    let totals = store.totals_by_backend(from, to).await.expect("totals");
    assert_eq!(totals, expected);
    assert!(
        store
            .totals_by_backend(T0 - 10, T0)
            .await
            .expect("totals")
            .is_empty()
    );
    store.close().await;
}

async fn the_writer_flushes_everything_queued(db: &TestDb) {
    let store = db.open().await;
    let config = LedgerConfig {
        queue_rows: 4_096,
        batch_rows: 64,
        batch_interval: Duration::from_secs(60),
        ..LedgerConfig::default()
    };
    let (ledger, task) = Ledger::start(store.clone(), config);
    let batch = rows(0..500);
    for r in &batch {
        assert!(ledger.record(r.clone()));
    }
    // The interval is a minute: only the flush can have written the last partial batch.
    ledger.flush().await.expect("flush");
    assert_eq!(ledger.written_rows(), batch.len() as u64);
    assert_eq!(ledger.dropped_rows(), 0);
    assert_eq!(all_rows(&store).await.len(), batch.len());
    drop(ledger);
    task.await.expect("the writer ends when its handles are gone");
    store.close().await;
}

async fn the_writer_writes_a_partial_batch_after_its_interval(db: &TestDb) {
    let store = db.open().await;
    let config = LedgerConfig {
        batch_interval: Duration::from_millis(20),
        ..LedgerConfig::default()
    };
    let (ledger, _task) = Ledger::start(store.clone(), config);
    for r in rows(0..3) {
        ledger.record(r);
    }
    let expected = rows(0..3).len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while all_rows(&store).await.len() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partial batch was never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ledger.written_rows(), expected as u64);
    store.close().await;
}

async fn two_writers_on_one_database_lose_and_duplicate_nothing(db: &TestDb) {
    // Two pools, as two lifeboat boxes would have, with overlapping rows (a replay from
    // one box of rows the other wrote): 0..600 and 300..900.
    let (store_a, store_b) = (db.open().await, db.open().await);
    let config = LedgerConfig {
        batch_rows: 50,
        batch_interval: Duration::from_millis(5),
        ..LedgerConfig::default()
    };
    let (ledger_a, _a) = Ledger::start(store_a.clone(), config);
    let (ledger_b, _b) = Ledger::start(store_b.clone(), config);
    let feed = |ledger: Ledger, requests: std::ops::Range<u32>| {
        tokio::spawn(async move {
            for (i, r) in rows(requests).into_iter().enumerate() {
                assert!(ledger.record(r), "the queue is large enough for every row");
                if i.is_multiple_of(40) {
                    tokio::task::yield_now().await;
                }
            }
            ledger.flush().await.expect("flush");
            ledger.dropped_rows()
        })
    };
    let (a, b) = tokio::join!(feed(ledger_a, 0..600), feed(ledger_b, 300..900));
    assert_eq!((a.expect("writer a"), b.expect("writer b")), (0, 0));
    let stored = all_rows(&store_a).await;
    let mut expected = rows(0..900);
    expected.sort_by(|x, y| {
        (x.started_ms, &x.request_id, x.attempt).cmp(&(y.started_ms, &y.request_id, y.attempt))
    });
    assert_eq!(stored.len(), expected.len(), "no row lost, none duplicated");
    assert_eq!(stored, expected);
    store_a.close().await;
    store_b.close().await;
}

/// A full queue drops (and counts) rows instead of waiting. On a current-thread runtime
/// the writer cannot drain the queue until the test yields, so the count is exact.
#[tokio::test]
async fn a_full_queue_drops_and_counts_rows() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let config = LedgerConfig {
        queue_rows: 4,
        ..LedgerConfig::default()
    };
    let (ledger, _task) = Ledger::start(store.clone(), config);
    let accepted = rows(0..10)
        .into_iter()
        .filter(|r| ledger.record(r.clone()))
        .count();
    assert_eq!(accepted, 4);
    assert_eq!(ledger.dropped_rows(), rows(0..10).len() as u64 - 4);
    ledger.flush().await.expect("flush");
    assert_eq!(ledger.written_rows(), 4);
    assert_eq!(all_rows(&store).await.len(), 4);
    store.close().await;
}

#[tokio::test]
async fn a_sqlite_ledger_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("sub-less.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("open");
    assert_eq!(store.driver(), "sqlite");
    assert!(path.exists(), "the file is created");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("a second connection");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
    store.close().await;
}
