//! The engine at work: the front-door checks a request passes before any work
//! (`admission`), the engine thread (`worker`), its continuous-batching scheduler and the
//! per-client waiting room (`scheduler`, `fair_queue`), token sampling (`sampler`), and the
//! way events reach a client that may read slowly or not at all (`outbox`).

pub(super) mod admission;
mod fair_queue;
mod outbox;
pub mod sampler;
pub(super) mod scheduler;
pub(super) mod worker;
