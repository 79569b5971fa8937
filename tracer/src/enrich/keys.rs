//! What the stage keeps per lookup key (the newest answer, the lookup under way, what waits)
//! and per failure (the memo: one diagnosis for failures that the same answers explain).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rustc_hash::FxHashSet as HashSet;

use super::lookup::{self, Facts};
use crate::decode::{Bind, UnixPath};

/// A process name as a key's part: a pid reused by another program is another key.
pub(super) fn comm_key(comm: &[u8]) -> u32 {
    use std::hash::BuildHasher as _;
    rustc_hash::FxBuildHasher.hash_one(comm) as u32
}

/// What the stage knows and wants for one lookup key.
pub(super) struct KeyState {
    /// The newest answer, and when its lookup was requested: it serves every event that
    /// arrived before then.
    pub(super) answer: Option<(Arc<Facts>, Instant)>,
    /// When the lookup under way was requested.
    pub(super) in_flight: Option<Instant>,
    pub(super) last_requested: Option<Instant>,
    /// Events are waiting for an answer newer than the current one.
    pub(super) wanted: bool,
    /// The ports those events failed on (socket-table keys).
    pub(super) ports: HashSet<u16>,
    /// The path a unix-name key stands for.
    pub(super) unix_path: Option<UnixPath>,
    pub(super) pid_hint: u32,
    pub(super) touched: Instant,
}

impl KeyState {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            answer: None,
            in_flight: None,
            last_requested: None,
            wanted: false,
            ports: HashSet::default(),
            unix_path: None,
            pid_hint: 0,
            touched: now,
        }
    }

    /// The answer, if it was asked for after an event that arrived at `arrived`; or, for an
    /// answer that lasts (see [`lasts_for`]), one asked for within its time before.
    pub(super) fn answer_for(&self, arrived: Instant) -> Option<(&Arc<Facts>, Instant)> {
        self.answer
            .as_ref()
            .filter(|(facts, requested)| {
                *requested >= arrived || lasts_for(facts).is_some_and(|ttl| arrived <= *requested + ttl)
            })
            .map(|(facts, at)| (facts, *at))
    }
}

/// A resolved identity serves the later events of its cgroup this long.
pub(super) const IDENTITY_TTL: Duration = Duration::from_secs(30);

/// How long an answer serves events that arrive after it was asked for, if it does: a
/// cgroup's identity with nothing left unresolved (who runs in a cgroup does not change
/// while it exists; a name may, rarely), and a namespace's NAT rules, which the lookups read
/// no more often than that anyway (a rule added or removed since is seen that much later).
pub(super) fn lasts_for(facts: &Facts) -> Option<Duration> {
    match facts {
        Facts::Identity(identity) if identity.unresolved.is_none() => Some(IDENTITY_TTL),
        // An error too: asked again at each event, a ruleset too slow to read would be read
        // all the time.
        Facts::Nat(_) => Some(lookup::NAT_RULES_TTL),
        _ => None,
    }
}

/// What makes two failures get the same diagnosis from the same answers.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct MemoKey {
    pub(super) ret: i32,
    pub(super) netns: u32,
    pub(super) tgid: u32,
    pub(super) uid: u32,
    pub(super) port: u16,
    pub(super) protocol: u16,
    pub(super) family: u16,
    pub(super) addr: [u8; 16],
    pub(super) sock_flags: u32,
    pub(super) bound_port: u16,
    /// Failures on different unix paths are different failures.
    pub(super) unix_name: Option<u64>,
}

impl MemoKey {
    pub(super) fn of(event: &Bind) -> Self {
        Self {
            ret: event.ret,
            netns: event.netns_ino,
            tgid: event.tgid,
            uid: event.uid,
            port: event.port,
            protocol: event.protocol,
            family: event.family,
            addr: event.addr,
            sock_flags: event.sock_flags,
            bound_port: event.bound_port,
            unix_name: event.unix_path.as_ref().map(lookup::unix_name_key),
        }
    }
}
