//! bindtrace: records every socket bind attempt on a Linux host, with its result, and
//! prints it live. The stages, in the order data flows (see docs/ARCHITECTURE.md):
//!
//! kernel probe → [`probe`] (load, attach, counters) → [`pipeline`] (ring buffer loop) →
//! [`decode`] → [`filter`] → [`enrich`] (holders, diagnosis) → [`sink`] (table or NDJSON) →
//! [`summary`] (exit report). [`who`] answers "who holds this port" with the enrich code.

// `pub`: what the binary and the userspace benchmark (benches/userspace.rs) use; the rest is
// internal to the crate.
pub mod app;
pub mod cli;
pub(crate) mod clock;
pub(crate) mod command;
pub mod decode;
pub mod enrich;
pub(crate) mod errno;
pub mod filter;
pub(crate) mod follow;
pub(crate) mod hook_support;
pub(crate) mod host;
pub(crate) mod layout;
pub(crate) mod load_error;
pub(crate) mod metrics;
pub mod model;
pub(crate) mod pipeline;
pub(crate) mod privileges;
pub(crate) mod probe;
pub(crate) mod say;
pub mod sink;
pub(crate) mod summary;
pub(crate) mod tree;
pub(crate) mod who;
