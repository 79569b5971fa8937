//! bindtrace: records every socket bind attempt on a Linux host, with its result, and
//! prints it live. The stages, in the order data flows (see docs/ARCHITECTURE.md):
//!
//! kernel probe → [`probe`] (load, attach, counters) → [`pipeline`] (ring buffer loop) →
//! [`decode`] → [`filter`] → [`enrich`] (holders, diagnosis) → [`sink`] (table or NDJSON) →
//! [`summary`] (exit report). [`who`] answers "who holds this port" with the enrich code.

pub mod app;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod enrich;
pub mod errno;
pub mod filter;
pub mod hook_support;
pub mod layout;
pub mod load_error;
pub mod pipeline;
pub mod probe;
pub mod sink;
pub mod summary;
pub mod who;
