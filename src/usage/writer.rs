//! The ledger's write path, off the request path: [`Ledger::record`] never waits (a
//! bounded queue), a background task batches rows into one transaction each, and
//! [`Ledger::flush`] waits until everything queued so far is written (SIGTERM).
//!
//! Not yet lossless: when the queue is full, or the database refuses a batch after its
//! retries, rows are counted (`lifeboat_ledger_rows_dropped_total`) and logged once per
//! burst, then lost. The next slice adds the append-only spool file that holds them
//! until the database is back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use super::{record::AttemptRecord, store::Store};
use crate::metrics;

/// Sizes and timings of the write path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Rows the queue holds before new ones are dropped. Default 8192.
    pub queue_rows: usize,
    /// Rows written in one transaction at most. Default 256.
    pub batch_rows: usize,
    /// How long the first row of a batch waits for company before the batch is written.
    /// Default 200 ms.
    pub batch_interval: Duration,
    /// Tries per batch before its rows are given up (with 100 ms, 200 ms, … between).
    /// Default 3.
    pub write_tries: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            queue_rows: 8192,
            batch_rows: 256,
            batch_interval: Duration::from_millis(200),
            write_tries: 3,
        }
    }
}

/// The writer has stopped (its task ended), so nothing more can be flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the ledger writer has stopped")]
pub struct LedgerClosed;

enum Message {
    Row(Box<AttemptRecord>),
    Flush(oneshot::Sender<()>),
}

/// Counts shared by the handles and the writer task.
#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    /// Set while rows are being dropped for a full queue, so one burst logs one line.
    dropping: AtomicBool,
}

/// A handle to the ledger's writer; cheap to clone. The writer task ends when every
/// handle is dropped, after writing what was queued.
#[derive(Debug, Clone)]
pub struct Ledger {
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
}

impl Ledger {
    /// Starts the writer task on `store`; the handle is how rows reach it.
    pub fn start(store: Store, config: LedgerConfig) -> (Ledger, JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(config.queue_rows.max(1));
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            store,
            config,
            counters: counters.clone(),
        };
        let task = tokio::spawn(writer.run(receiver));
        (Ledger { queue, counters }, task)
    }

    /// Queues `row` without waiting. Returns false when it was dropped (queue full or
    /// writer stopped), which is counted and logged once per burst.
    pub fn record(&self, row: AttemptRecord) -> bool {
        match self.queue.try_send(Message::Row(Box::new(row))) {
            Ok(()) => {
                // Load first: the common case (not dropping) stays a read.
                if self.counters.dropping.load(Ordering::Relaxed)
                    && self.counters.dropping.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(
                        dropped_total = self.dropped_rows(),
                        "ledger queue accepts rows again"
                    );
                }
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped("queue_full");
                if !self.counters.dropping.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "ledger queue full: dropping usage rows until the writer catches up \
                         (counted in {})",
                        metrics::LEDGER_ROWS_DROPPED_TOTAL
                    );
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped("closed");
                false
            }
        }
    }

    /// Waits until every row queued before this call is written (or given up). For
    /// shutdown: call it after the server has drained.
    pub async fn flush(&self) -> Result<(), LedgerClosed> {
        let (done, wait) = oneshot::channel();
        // A flush may wait for queue space: unlike a row, it must not be lost.
        self.queue
            .send(Message::Flush(done))
            .await
            .map_err(|_| LedgerClosed)?;
        wait.await.map_err(|_| LedgerClosed)
    }

    /// Rows committed so far.
    pub fn written_rows(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Rows lost so far, for any reason.
    pub fn dropped_rows(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    fn dropped(&self, reason: &'static str) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::ledger_rows_dropped(reason, 1);
    }
}

/// The background task's state.
struct Writer {
    store: Store,
    config: LedgerConfig,
    counters: Arc<Counters>,
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.config.batch_rows);
        let mut flushes = Vec::new();
        while let Some(first) = receiver.recv().await {
            self.gather(first, &mut receiver, &mut batch, &mut flushes).await;
            self.write(&mut batch).await;
            for done in flushes.drain(..) {
                // The flusher may have stopped waiting; nothing to tell it then.
                let _ = done.send(());
            }
        }
    }

    /// Collects a batch starting with `first`: until it holds `batch_rows`, the interval
    /// since `first` has passed, a flush asks for it, or the queue closes.
    async fn gather(
        &self,
        first: Message,
        receiver: &mut mpsc::Receiver<Message>,
        batch: &mut Vec<AttemptRecord>,
        flushes: &mut Vec<oneshot::Sender<()>>,
    ) {
        let deadline = Instant::now() + self.config.batch_interval;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Row(row) => batch.push(*row),
                Message::Flush(done) => {
                    flushes.push(done);
                    return;
                }
            }
            if batch.len() >= self.config.batch_rows {
                return;
            }
            next = tokio::select! {
                message = receiver.recv() => message,
                () = tokio::time::sleep_until(deadline) => None,
            };
        }
    }

    /// Writes `batch` in one transaction, retrying with a growing pause, and empties it.
    async fn write(&self, batch: &mut Vec<AttemptRecord>) {
        if batch.is_empty() {
            return;
        }
        let rows = batch.len() as u64;
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=self.config.write_tries.max(1) {
            match self.store.insert_batch(batch).await {
                Ok(_inserted) => {
                    // Rows skipped as duplicates are written too: they are in the ledger.
                    self.counters.written.fetch_add(rows, Ordering::Relaxed);
                    metrics::ledger_rows_written(rows);
                    batch.clear();
                    return;
                }
                Err(error) if attempt < self.config.write_tries => {
                    tracing::warn!(%error, attempt, rows, "ledger write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(error) => {
                    tracing::error!(%error, rows, "ledger write failed; these rows are lost");
                }
            }
        }
        self.counters.dropped.fetch_add(rows, Ordering::Relaxed);
        metrics::ledger_rows_dropped("write_failed", rows);
        batch.clear();
    }
}
