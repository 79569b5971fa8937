//! The enrich stage: for each failed bind, who or what is in the way and what to do.
//!
//! Events enter in ring-buffer order and leave in the same order, each failure with its
//! [`Diagnosis`]. Lookups (sock_diag, /proc, sysctls) run on one worker thread, keyed by
//! [`LookupKey`] (namespace, protocol, port; namespace; pid) and cached for [`CACHE_TTL`]:
//! a storm of identical failures costs one lookup per key and period, and the event loop
//! never waits on the kernel or /proc. An event waits in the queue only until the lookups it
//! needs (and those of the events before it) have answered.

pub mod diagnose;
pub mod history;
pub mod lookup;
pub mod netns;
pub mod owners;
pub mod sockdiag;

use std::{
    collections::{HashMap, VecDeque},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use bindtrace_common::BindEvent;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use self::diagnose::Diagnosis;
use self::{
    diagnose::{diagnose, needed_lookups},
    history::BindHistory,
    lookup::{Facts, LookupKey, Lookups},
};
use crate::decode::BindEventExt as _;

/// How long looked-up facts are reused.
pub const CACHE_TTL: Duration = Duration::from_secs(1);

struct Job {
    key: LookupKey,
    pid_hint: u32,
}

/// A finished lookup, from the worker.
pub struct Done {
    key: LookupKey,
    facts: Arc<Facts>,
}

enum Cached {
    Waiting,
    Ready { facts: Arc<Facts>, at: Instant },
}

struct Pending {
    event: BindEvent,
    wall_ns: i128,
    keys: Vec<LookupKey>,
}

/// An event ready for the sinks.
pub struct Enriched {
    pub event: BindEvent,
    pub wall_ns: i128,
    pub diagnosis: Option<Arc<Diagnosis>>,
}

/// What makes two failures get the same diagnosis from the same facts.
#[derive(Clone, PartialEq, Eq)]
struct MemoKey {
    ret: i32,
    netns: u32,
    tgid: u32,
    uid: u32,
    port: u16,
    protocol: u16,
    family: u16,
    addr: [u8; 16],
    sock_flags: u32,
    bound_port: u16,
}

impl MemoKey {
    fn of(event: &BindEvent) -> Self {
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
        }
    }
}

pub struct Enricher {
    enabled: bool,
    queue: VecDeque<Pending>,
    cache: HashMap<LookupKey, Cached>,
    history: BindHistory,
    jobs: Option<mpsc::Sender<Job>>,
    results: Option<UnboundedReceiver<Done>>,
    /// The last diagnosis, reused while identical failures keep coming with the same facts.
    memo: Option<(MemoKey, Vec<Arc<Facts>>, Arc<Diagnosis>)>,
    lookups_started: u64,
}

fn worker(jobs: mpsc::Receiver<Job>, results: UnboundedSender<Done>) {
    let mut lookups = Lookups::default();
    while let Ok(Job { key, pid_hint }) = jobs.recv() {
        let facts = Arc::new(lookups.run(&key, Some(pid_hint)));
        if results.send(Done { key, facts }).is_err() {
            break;
        }
    }
}

impl Enricher {
    /// `enabled: false` (`--no-diagnosis`) passes events straight through.
    pub fn new(enabled: bool) -> Self {
        let (results_tx, results) = unbounded_channel();
        let jobs = enabled.then(|| {
            let (jobs_tx, jobs_rx) = mpsc::channel();
            let spawned =
                std::thread::Builder::new().name("bindtrace-attrib".into()).spawn(move || worker(jobs_rx, results_tx));
            if let Err(err) = spawned {
                log::warn!("attribution disabled: cannot start its thread: {err}");
            }
            jobs_tx
        });
        Self {
            enabled,
            queue: VecDeque::new(),
            cache: HashMap::new(),
            history: BindHistory::default(),
            jobs,
            results: Some(results),
            memo: None,
            lookups_started: 0,
        }
    }

    fn is_fresh(&self, key: &LookupKey) -> bool {
        match self.cache.get(key) {
            Some(Cached::Waiting) => true,
            Some(Cached::Ready { at, .. }) => at.elapsed() < CACHE_TTL,
            None => false,
        }
    }

    /// Takes an event in arrival order and starts the lookups it needs.
    pub fn push(&mut self, event: BindEvent, wall_ns: i128) {
        self.history.record(&event, wall_ns);
        let keys = if self.enabled { needed_lookups(&event) } else { Vec::new() };
        for key in &keys {
            if self.is_fresh(key) {
                continue;
            }
            let sent = self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(Job { key: key.clone(), pid_hint: event.tgid }).is_ok());
            if sent {
                self.cache.insert(key.clone(), Cached::Waiting);
                self.lookups_started += 1;
            } else {
                // No worker: answer at once, so the event is not held forever.
                let facts = Arc::new(Facts::Holders(Err("attribution worker unavailable".into())));
                self.cache.insert(key.clone(), Cached::Ready { facts, at: Instant::now() });
            }
        }
        self.queue.push_back(Pending { event, wall_ns, keys });
    }

    /// Stores a finished lookup.
    pub fn complete(&mut self, done: Done) {
        self.cache.insert(done.key, Cached::Ready { facts: done.facts, at: Instant::now() });
    }

    /// The channel finished lookups arrive on, for the event loop to wait on; pass each to
    /// [`Enricher::complete`].
    pub fn take_results(&mut self) -> Option<UnboundedReceiver<Done>> {
        self.results.take()
    }

    fn facts_for(&self, key: &LookupKey) -> Option<&Arc<Facts>> {
        match self.cache.get(key) {
            Some(Cached::Ready { facts, .. }) => Some(facts),
            _ => None,
        }
    }

    /// The next event in order, once every lookup it needs has answered; with `force`,
    /// without waiting (at exit), saying in the diagnosis what did not finish.
    pub fn pop(&mut self, force: bool) -> Option<Enriched> {
        let front = self.queue.front()?;
        if !force && !front.keys.iter().all(|k| self.facts_for(k).is_some()) {
            return None;
        }
        let pending = self.queue.pop_front()?;
        let diagnosis = if self.enabled { self.diagnosis_of(&pending) } else { None };
        Some(Enriched { event: pending.event, wall_ns: pending.wall_ns, diagnosis })
    }

    fn diagnosis_of(&mut self, pending: &Pending) -> Option<Arc<Diagnosis>> {
        pending.event.errno()?;
        let facts: Vec<Arc<Facts>> = pending.keys.iter().filter_map(|k| self.facts_for(k).cloned()).collect();
        let memo_key = MemoKey::of(&pending.event);
        if let Some((key, used, diagnosis)) = &self.memo {
            if *key == memo_key && used.len() == facts.len() && used.iter().zip(&facts).all(|(a, b)| Arc::ptr_eq(a, b))
            {
                return Some(diagnosis.clone());
            }
        }
        let diagnosis =
            Arc::new(diagnose(&pending.event, |key| self.facts_for(key).map(|facts| &**facts), &self.history)?);
        self.memo = Some((memo_key, facts, diagnosis.clone()));
        Some(diagnosis)
    }

    pub fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Lookups started so far (one per key and cache period).
    pub fn lookups_started(&self) -> u64 {
        self.lookups_started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::sample_event;

    #[tokio::test]
    async fn a_storm_of_identical_failures_costs_one_lookup_and_keeps_order() {
        let mut enricher = Enricher::new(true);
        let mut ok = sample_event();
        ok.ret = 0;
        ok.port = 1;
        enricher.push(sample_event(), 1);
        enricher.push(ok, 2);
        for i in 0..10_000 {
            enricher.push(sample_event(), 3 + i);
        }
        assert_eq!(enricher.lookups_started(), 1, "one lookup for 10,001 identical failures");
        assert!(enricher.pop(false).is_none(), "the first failure waits for its lookup");
        let mut results = enricher.take_results().expect("results channel");
        let done = tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("lookup answers");
        enricher.complete(done.expect("worker alive"));
        let mut out = Vec::new();
        while let Some(enriched) = enricher.pop(false) {
            out.push(enriched);
        }
        assert_eq!(out.len(), 10_002);
        assert!(out.windows(2).all(|w| w[0].wall_ns < w[1].wall_ns), "events leave in order");
        assert!(out[0].diagnosis.is_some());
        assert!(out[1].diagnosis.is_none(), "successes get no diagnosis");
        assert!(Arc::ptr_eq(
            out[2].diagnosis.as_ref().expect("diagnosis"),
            out[3].diagnosis.as_ref().expect("diagnosis")
        ));
    }

    #[test]
    fn disabled_passes_through_and_force_empties_the_queue() {
        let mut off = Enricher::new(false);
        off.push(sample_event(), 1);
        let out = off.pop(false).expect("no waiting when disabled");
        assert!(out.diagnosis.is_none());

        let mut on = Enricher::new(true);
        on.push(sample_event(), 1);
        let forced = on.pop(true).expect("forced");
        let diagnosis = forced.diagnosis.expect("a diagnosis even without facts");
        assert_eq!(diagnosis.kind, "unknown");
        assert_eq!(diagnosis.unknown, vec!["holder lookup did not finish".to_owned()]);
        assert!(!on.has_pending());
    }
}
