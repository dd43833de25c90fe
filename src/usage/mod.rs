//! The usage ledger: one row per attempt with its tokens and its cost, stored in SQLite
//! (default) or PostgreSQL, written off the request path. A leaf: anyone may call it.
//!
//! - [`record`]: [`AttemptRecord`] and reading a backend's `usage` into [`TokenCounts`].
//! - [`prices`]: per-model prices in integer nano-dollars, time windows, [`PriceTable`].
//! - [`store`]: the database: migrations, idempotent batch inserts, per-backend sums.
//! - [`writer`]: [`Ledger`], the bounded queue and the batching writer task.
//!
//! Not wired into the router yet; the spool file, retention, the usage API and the CLI
//! are later slices (issue 20).

pub mod prices;
pub mod record;
pub mod store;
pub mod writer;

#[cfg(test)]
mod tests;

pub use prices::{Cost, ModelPrice, NanosPerToken, PriceTable, PriceWindow};
pub use record::{AttemptRecord, Outcome, TokenCounts};
pub use store::{BackendTotals, Store, StoreError};
pub use writer::{Ledger, LedgerClosed, LedgerConfig};
