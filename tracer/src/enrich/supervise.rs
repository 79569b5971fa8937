//! The lookup workers and their supervision: two lanes, a deadline per job counted from its
//! start, replacement of a worker that hangs, and a restart budget that recovers.
//!
//! Socket searches read /proc and may take seconds on a host with a million fds; identities,
//! sysctls and capabilities take milliseconds. Each kind has a worker of its own (a lane), so
//! a slow search never leaves the events behind it without their container.

use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    sync::{
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::lookup::{Ask, Facts, LookupKey, Lookups};
use crate::{decode::UnixPath, host::owners::SharedOwnerIndex};

/// A job that has run this long has hung: its events are told so, and its worker is
/// replaced. Counted from the job's start, not from when it was queued.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket search may look for owners before it answers with what it found and
/// how far it got; under [`LOOKUP_TIMEOUT`], so a slow search is never taken for a hung one.
pub(crate) const SEARCH_BUDGET: Duration = Duration::from_millis(3_000);
/// Replacements allowed within [`RESTART_WINDOW`]; past them the lane rests until the oldest
/// leaves the window, and its lookups answer at once with the reason.
const RESTARTS_PER_WINDOW: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Jobs queued behind the running one: few, so a queued job waits little.
const JOBS_MAX: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Socket tables and unix names: sock_diag and the /proc owner search.
    Search,
    /// Identities, namespaces' sysctls, capabilities, the container being started.
    Quick,
    /// NAT rules: nft and iptables-save, which can take a while on a big ruleset, apart from
    /// the identities that every event waits for.
    Rules,
}

impl Lane {
    pub(crate) const ALL: [Lane; 3] = [Lane::Search, Lane::Quick, Lane::Rules];

    pub(crate) fn of(key: &LookupKey) -> Self {
        match key {
            LookupKey::Sockets { .. } | LookupKey::UnixName { .. } => Self::Search,
            LookupKey::Netns { .. }
            | LookupKey::Process { .. }
            | LookupKey::Cgroup { .. }
            | LookupKey::Publisher { .. }
            | LookupKey::UnitStarting { .. } => Self::Quick,
            LookupKey::Nat { .. } => Self::Rules,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Search => 0,
            Self::Quick => 1,
            Self::Rules => 2,
        }
    }

    fn thread_name(self) -> &'static str {
        match self {
            Self::Search => "bindtrace-search",
            Self::Quick => "bindtrace-attrib",
            Self::Rules => "bindtrace-rules",
        }
    }
}

pub(crate) struct Job {
    pub key: LookupKey,
    pub pid_hint: u32,
    pub ports: Vec<u16>,
    /// The path of a unix-name key.
    pub unix_path: Option<UnixPath>,
    /// Processes likely to hold the sockets (see [`Ask::hints`]).
    pub hints: Vec<u32>,
    pub requested: Instant,
}

/// A finished lookup, from a worker.
pub(crate) struct Done {
    pub(crate) key: LookupKey,
    pub(crate) requested: Instant,
    pub(crate) facts: Arc<Facts>,
}

/// The job a worker is on: its key, when it was requested and when it started.
type Current = Arc<Mutex<Option<(LookupKey, Instant, Instant)>>>;

fn work(jobs: mpsc::Receiver<Job>, results: UnboundedSender<Done>, current: Current, owners: SharedOwnerIndex) {
    let mut lookups = Lookups::sharing(owners);
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        *current.lock().unwrap_or_else(PoisonError::into_inner) = Some((job.key, job.requested, started));
        let ask = Ask {
            pid_hint: Some(job.pid_hint),
            ports: &job.ports,
            unix_path: job.unix_path.as_ref(),
            hints: &job.hints,
            deadline: started + SEARCH_BUDGET,
        };
        // A lookup that panics answers with an error; the worker goes on.
        let facts = std::panic::catch_unwind(AssertUnwindSafe(|| lookups.run(&job.key, &ask)))
            .unwrap_or_else(|_| Facts::failed(&job.key, "the lookup panicked"));
        *current.lock().unwrap_or_else(PoisonError::into_inner) = None;
        log::debug!(
            "lookup {:?} took {:?} (waited {:?})",
            job.key,
            started.elapsed(),
            started.saturating_duration_since(job.requested)
        );
        if results.send(Done { key: job.key, requested: job.requested, facts: Arc::new(facts) }).is_err() {
            break;
        }
    }
}

struct Worker {
    jobs: SyncSender<Job>,
    current: Current,
}

#[derive(Default)]
struct LaneState {
    worker: Option<Worker>,
    /// When its workers were replaced, within the last [`RESTART_WINDOW`].
    restarts: VecDeque<Instant>,
    /// Why it rests, and until when.
    resting: Option<(Instant, String)>,
}

/// What sending a job came to.
pub(crate) enum Sent {
    Queued,
    /// The lane's queue is full: try again when a job finishes.
    Full,
    /// The lane rests (its workers hung too often); the job is answered at once with why.
    Resting(Job, String),
    /// The lane's worker had ended: the jobs it had queued are lost and must be asked again;
    /// a new worker starts with the next job.
    WorkerGone(Lane),
}

/// The lanes' workers, replaced when they hang, within a budget that recovers.
pub(crate) struct Supervisor {
    lanes: [LaneState; Lane::ALL.len()],
    results: UnboundedSender<Done>,
    owners: SharedOwnerIndex,
    pub(crate) restarts: u64,
}

impl Supervisor {
    pub(crate) fn new(results: UnboundedSender<Done>) -> Self {
        Self { lanes: Default::default(), results, owners: SharedOwnerIndex::default(), restarts: 0 }
    }

    fn spawn(&self, lane: Lane) -> std::io::Result<Worker> {
        let (jobs, jobs_rx) = mpsc::sync_channel(JOBS_MAX);
        let current = Current::default();
        let (results, owners, shared) = (self.results.clone(), self.owners.clone(), current.clone());
        std::thread::Builder::new()
            .name(lane.thread_name().into())
            .spawn(move || work(jobs_rx, results, shared, owners))?;
        Ok(Worker { jobs, current })
    }

    /// Queues `job` on its lane, starting the lane's worker if it has none.
    pub(crate) fn send(&mut self, job: Job, now: Instant) -> Sent {
        let lane = Lane::of(&job.key);
        if let Some(why) = self.resting(lane, now) {
            return Sent::Resting(job, why);
        }
        if self.lanes[lane.index()].worker.is_none() {
            match self.spawn(lane) {
                Ok(worker) => self.lanes[lane.index()].worker = Some(worker),
                Err(err) => {
                    let why = format!("a lookup thread cannot start: {err}");
                    self.rest(lane, now, why.clone());
                    return Sent::Resting(job, why);
                }
            }
        }
        let Some(worker) = &self.lanes[lane.index()].worker else { return Sent::Full };
        match worker.jobs.try_send(job) {
            Ok(()) => Sent::Queued,
            Err(TrySendError::Full(_)) => Sent::Full,
            // The worker ended (it cannot, but if it did): a new one next time.
            Err(TrySendError::Disconnected(_)) => {
                self.lanes[lane.index()].worker = None;
                self.replaced(lane, now, "the lookup thread ended");
                Sent::WorkerGone(lane)
            }
        }
    }

    /// Why `lane` rests now, if it does.
    fn resting(&mut self, lane: Lane, now: Instant) -> Option<String> {
        let state = &mut self.lanes[lane.index()];
        match &state.resting {
            Some((until, why)) if now < *until => Some(why.clone()),
            Some(_) => {
                state.resting = None;
                None
            }
            None => None,
        }
    }

    fn rest(&mut self, lane: Lane, now: Instant, why: String) {
        let state = &mut self.lanes[lane.index()];
        let until = state.restarts.front().map_or(now + RESTART_WINDOW, |oldest| *oldest + RESTART_WINDOW);
        let secs = until.saturating_duration_since(now).as_secs().max(1);
        crate::say::warn(&format!("{why}: these lookups rest for {secs} s; events are still written"));
        state.resting = Some((until, format!("lookups paused for up to {secs} s: {why}")));
    }

    /// Counts a replacement of `lane`'s worker; past the budget the lane rests.
    fn replaced(&mut self, lane: Lane, now: Instant, why: &str) {
        self.restarts += 1;
        let state = &mut self.lanes[lane.index()];
        while state.restarts.front().is_some_and(|at| now.saturating_duration_since(*at) >= RESTART_WINDOW) {
            state.restarts.pop_front();
        }
        state.restarts.push_back(now);
        let restarts = state.restarts.len();
        if restarts > RESTARTS_PER_WINDOW {
            let window = RESTART_WINDOW.as_secs() / 60;
            self.rest(lane, now, format!("{why}, {restarts} times in {window} minutes"));
        } else {
            log::debug!("{why}: a new lookup thread starts with the next lookup");
        }
    }

    /// The lanes whose running job started [`LOOKUP_TIMEOUT`] or more ago: the key it hung
    /// on, and its request time. Its worker is dropped (the thread is left to finish or hang
    /// on its own; its queued jobs go with it) and a new one starts with the next job.
    pub(crate) fn hung(&mut self, now: Instant) -> Vec<(Lane, LookupKey, Instant)> {
        let mut hung = Vec::new();
        for lane in Lane::ALL {
            let current = self.lanes[lane.index()]
                .worker
                .as_ref()
                .and_then(|w| *w.current.lock().unwrap_or_else(PoisonError::into_inner));
            if let Some((key, requested, started)) = current {
                if now >= started + LOOKUP_TIMEOUT {
                    self.lanes[lane.index()].worker = None;
                    self.replaced(lane, now, "a lookup hung");
                    hung.push((lane, key, requested));
                }
            }
        }
        hung
    }

    /// When the running jobs reach [`LOOKUP_TIMEOUT`]: for the event loop's next wake.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.worker.as_ref())
            .filter_map(|w| w.current.lock().unwrap_or_else(PoisonError::into_inner).map(|(_, _, started)| started))
            .min()
            .map(|started| started + LOOKUP_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_budget_recovers() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut supervisor = Supervisor::new(tx);
        let start = Instant::now();
        for i in 0..RESTARTS_PER_WINDOW as u64 {
            supervisor.replaced(Lane::Search, start + Duration::from_secs(i), "a lookup hung");
        }
        assert!(supervisor.resting(Lane::Search, start + Duration::from_secs(5)).is_none(), "within budget");
        supervisor.replaced(Lane::Search, start + Duration::from_secs(5), "a lookup hung");
        let why = supervisor.resting(Lane::Search, start + Duration::from_secs(6)).expect("resting");
        assert!(why.contains("a lookup hung, 4 times in 10 minutes"), "{why}");
        assert!(supervisor.resting(Lane::Quick, start + Duration::from_secs(6)).is_none(), "the other lane works");
        // The oldest restart leaves the window: the lane works again, for good.
        assert!(supervisor.resting(Lane::Search, start + RESTART_WINDOW + Duration::from_secs(1)).is_none());
    }
}
