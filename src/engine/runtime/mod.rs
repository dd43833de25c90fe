//! The engine at work: the front-door checks a request passes before any work
//! (`admission`), the engine thread (`worker`), its continuous-batching scheduler and the
//! per-client waiting room (`scheduler`, `fair_queue`), one choice of a request and what
//! each of its tokens becomes (`sequence`), token sampling (`sampler`), and the way events
//! reach a client that may read slowly or not at all (`outbox`).

pub(super) mod admission;
mod fair_queue;
mod outbox;
pub mod sampler;
pub(super) mod scheduler;
mod sequence;
pub(super) mod worker;
