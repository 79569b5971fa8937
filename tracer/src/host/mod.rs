//! Host inspection: facts about this machine, read where they live, and nothing else. The
//! enrich stage decides what to ask and when, and what the answers mean; `who`, the filters
//! and the sinks read facts and their types from here too.
//!
//! sock_diag (`sockdiag`, `unixdiag`), /proc (`owners`: which processes hold a socket),
//! network namespaces (`netns`), cgroupfs (`cgroup`), the container runtimes' APIs
//! (`runtimes`), systemd's socket units (`systemd`), what runs where (`identity`), what
//! besides capabilities may refuse a bind (`policy`), and the NAT rules that take a port's
//! traffic before any socket (`nat`).

pub(crate) mod cgroup;
pub(crate) mod identity;
pub(crate) mod nat;
pub(crate) mod netns;
pub(crate) mod owners;
pub(crate) mod policy;
pub(crate) mod runtimes;
pub(crate) mod sockdiag;
pub(crate) mod systemd;
pub(crate) mod unixdiag;
