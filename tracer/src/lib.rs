//! bindtrace: records every socket bind attempt on a Linux host, with its result, and
//! prints it live. The stages, in the order data flows (see docs/ARCHITECTURE.md):
//!
//! kernel probe → [`probe`] (load, attach, counters) → [`pipeline`] (ring buffer loop) →
//! [`decode`] → [`filter`] → [`enrich`] (holders, diagnosis) → [`sink`] (table or NDJSON) →
//! [`summary`] (exit report). [`who`] answers "who holds this port" with the enrich code.

// Internal to the crate, all of it: the binary calls [`main`], the userspace benchmark goes
// through `bench_api` (feature `bench`).
pub(crate) mod app;
pub(crate) mod bpf_sys;
pub(crate) mod check;
pub(crate) mod cli;
pub(crate) mod clock;
pub(crate) mod command;
pub(crate) mod config;
pub(crate) mod decode;
pub(crate) mod enrich;
pub(crate) mod errno;
pub(crate) mod filter;
pub(crate) mod follow;
pub(crate) mod host;
pub(crate) mod layout;
pub(crate) mod load_error;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod pipeline;
pub(crate) mod privileges;
pub(crate) mod probe;
pub(crate) mod say;
pub(crate) mod sink;
pub(crate) mod summary;
pub(crate) mod text;
pub(crate) mod tree;
pub(crate) mod tree_run;
pub(crate) mod who;

pub use app::main;

#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench_api;
