//! The enrich stage: for each failed bind, who or what is in the way and what to do, without
//! ever holding up the stream.
//!
//! Events enter in ring-buffer order and leave in the same order, within [`EMIT_DEADLINE`] of
//! their arrival whatever the lookups are doing. A failure whose facts are in by then leaves
//! with its diagnosis; otherwise it leaves marked [`Explained::Follows`], and its diagnosis
//! comes later as a [`FollowUp`] carrying the event's sequence number. Under overload the
//! stage sheds diagnoses, never events, and counts them.
//!
//! Lookups (sock_diag, /proc, sysctls) run on a worker thread, one per [`LookupKey`] at a
//! time. An answer serves the events that arrived before its lookup was requested: facts
//! gathered before a bind happened cannot explain it (a holder may have appeared since). For
//! EADDRINUSE the key is (namespace, protocol): one socket-table dump serves every failing
//! port of a window. Every queue and cache has a cap (see the constants). The workers and their
//! supervision live in [`supervise`]: a lookup that hangs times out and its worker is
//! replaced; when that keeps happening, its lane rests for a while (its lookups answer at
//! once, saying why) and then works again: a slow host degrades diagnoses, never ends them.

pub(crate) mod diagnose;
pub(crate) mod history;
pub(crate) mod lookup;
pub(crate) mod supervise;

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use bindtrace_common::BindEvent;
// FxHash: these maps are hit once or twice per event, and SipHash was ~7% of the output
// stage's CPU under a failure storm (`perf record`). Keys are kernel-made, not attacker-chosen
// strings.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub(crate) use self::supervise::Done;
use self::{
    diagnose::{diagnose, needed_lookups, NeededLookups},
    history::BindHistory,
    lookup::{Facts, LookupKey},
    supervise::{Job, Sent, Supervisor, LOOKUP_TIMEOUT},
};
use crate::{
    decode::{Bind, BindEventExt as _, UnixPath},
    host::{cgroup, identity::Identity, owners, sockdiag},
    model::{Diagnosis, DiagnosisKind},
};

/// What the lookups cannot see from where bindtrace runs, one line each, to say once at
/// start: bindtrace in its own PID namespace, capabilities it lacks.
pub(crate) fn blind_spots() -> Vec<String> {
    let mut lines = Vec::new();
    if owners::in_own_pid_namespace() {
        lines.push(
            "bindtrace runs in its own PID namespace: pids shown are the host's, and holders outside this namespace \
             are reported as not visible (run it in the host's: docker run --pid=host, hostPID: true)"
                .to_owned(),
        );
    }
    lines.extend(crate::privileges::lookup_limits());
    lines
}

/// The longest an event waits for its diagnosis before it is written without it.
pub(crate) const EMIT_DEADLINE: Duration = Duration::from_millis(100);
/// The longest a diagnosis may follow its event; after that it says what did not finish.
const FOLLOW_UP_LIMIT: Duration = Duration::from_secs(5);
/// Lookups of one key start at most this often: the failures of a window share one.
const MIN_REFRESH: Duration = Duration::from_millis(50);
/// Caps: events waiting for their deadline, diagnoses to follow, lookup keys remembered,
/// ports per socket-table job, remembered diagnoses, processes hinted per job.
/// Past this many waiting events the oldest leave before their deadline (their diagnosis
/// follows): each takes ~240 bytes, and a storm's backlog was the largest part of the peak
/// RSS.
const QUEUE_MAX: usize = 8_192;
const FOLLOWING_MAX: usize = 4_096;
const KEYS_MAX: usize = 4_096;
const HINTS_MAX: usize = 16;
const PORTS_PER_JOB_MAX: usize = 4_096;
const MEMO_MAX: usize = 1_024;
const RECENT_MAX: usize = 65_536;
/// A key nobody asked about for this long is forgotten.
const KEY_IDLE: Duration = Duration::from_secs(10);

/// A process name as a key's part: a pid reused by another program is another key.
fn comm_key(comm: &[u8]) -> u32 {
    use std::hash::BuildHasher as _;
    rustc_hash::FxBuildHasher.hash_one(comm) as u32
}

/// What the stage knows and wants for one lookup key.
struct KeyState {
    /// The newest answer, and when its lookup was requested: it serves every event that
    /// arrived before then.
    answer: Option<(Arc<Facts>, Instant)>,
    /// When the lookup under way was requested.
    in_flight: Option<Instant>,
    last_requested: Option<Instant>,
    /// Events are waiting for an answer newer than the current one.
    wanted: bool,
    /// The ports those events failed on (socket-table keys).
    ports: HashSet<u16>,
    /// The path a unix-name key stands for.
    unix_path: Option<UnixPath>,
    pid_hint: u32,
    touched: Instant,
}

impl KeyState {
    fn new(now: Instant) -> Self {
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
    fn answer_for(&self, arrived: Instant) -> Option<(&Arc<Facts>, Instant)> {
        self.answer
            .as_ref()
            .filter(|(facts, requested)| {
                *requested >= arrived || lasts_for(facts).is_some_and(|ttl| arrived <= *requested + ttl)
            })
            .map(|(facts, at)| (facts, *at))
    }
}

/// A resolved identity serves the later events of its cgroup this long.
const IDENTITY_TTL: Duration = Duration::from_secs(30);

/// How long an answer serves events that arrive after it was asked for, if it does: a
/// cgroup's identity with nothing left unresolved (who runs in a cgroup does not change
/// while it exists; a name may, rarely), and a namespace's NAT rules, which the lookups read
/// no more often than that anyway (a rule added or removed since is seen that much later).
fn lasts_for(facts: &Facts) -> Option<Duration> {
    match facts {
        Facts::Identity(identity) if identity.unresolved.is_none() => Some(IDENTITY_TTL),
        // An error too: asked again at each event, a ruleset too slow to read would be read
        // all the time.
        Facts::Nat(_) => Some(lookup::NAT_RULES_TTL),
        _ => None,
    }
}

struct Pending {
    seq: u64,
    event: Bind,
    wall_ns: i128,
    /// The lookups its diagnosis needs.
    keys: NeededLookups,
    /// The lookup of its cgroup's identity. Apart from `keys`: a success needs no vector.
    identity_key: Option<LookupKey>,
    /// Its identity when its cgroup's path alone told it (no lookup then).
    identity: Option<Arc<Identity>>,
    arrived: Instant,
    /// Its lookups could not even be tracked (every key slot busy): no diagnosis.
    shed: bool,
}

/// What an event carries about its diagnosis when it is written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Explained {
    /// A success, or diagnoses are off.
    Nothing,
    Now(Arc<Diagnosis>),
    /// The lookups were not done in time: a [`FollowUp`] with the same `seq` comes later.
    Follows,
    /// No diagnosis will come, and why (counted in the summary).
    Shed(&'static str),
}

/// An event ready for the sinks.
pub(crate) struct Enriched {
    /// 1 for the first event of the run, then one more for each.
    pub seq: u64,
    pub event: Bind,
    pub wall_ns: i128,
    pub explained: Explained,
    /// Who ran the bind (container, pod, unit); `None` when lookups are off.
    pub identity: Option<Arc<Identity>>,
}

/// The diagnosis of an event written earlier with [`Explained::Follows`].
pub(crate) struct FollowUp {
    pub seq: u64,
    pub event: Bind,
    pub wall_ns: i128,
    pub diagnosis: Arc<Diagnosis>,
}

/// Why diagnoses were shed.
pub(crate) const SHED_OVERLOAD: &str = "overload: too many diagnoses waiting";

/// Counters for the live report and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct EnrichCounters {
    pub lookups: u64,
    pub lookup_timeouts: u64,
    pub worker_restarts: u64,
    /// Diagnoses written after their event.
    pub followed: u64,
    /// Failures that got no diagnosis.
    pub shed: u64,
    /// Successful binds reported as sharing their port with another service or container.
    pub ports_shared: u64,
    /// Successful binds with SO_REUSEPORT (or UDP SO_REUSEADDR) whose sharing could not be
    /// checked (overload).
    pub sharing_unchecked: u64,
    /// Successful binds to a port a NAT rule takes (`port_forwarded`).
    pub ports_forwarded: u64,
}

/// What makes two failures get the same diagnosis from the same answers.
#[derive(Clone, PartialEq, Eq, Hash)]
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
    /// Failures on different unix paths are different failures.
    unix_name: Option<u64>,
}

impl MemoKey {
    fn of(event: &Bind) -> Self {
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

pub(crate) struct Enricher {
    enabled: bool,
    next_seq: u64,
    queue: VecDeque<Pending>,
    following: VecDeque<Pending>,
    keys: HashMap<LookupKey, KeyState>,
    /// Keys with events waiting for a lookup that has not started.
    wanting: HashSet<LookupKey>,
    history: BindHistory,
    /// The lookup workers; `None` with `--no-diagnosis`.
    workers: Option<Supervisor>,
    results: Option<UnboundedReceiver<Done>>,
    /// Diagnoses by failure, with the answers (by request time) they came from.
    memo: HashMap<MemoKey, (Vec<Instant>, Arc<Diagnosis>)>,
    counters: EnrichCounters,
    last_sweep: Instant,
    /// Each lane's queue was full at the last dispatch: the next finished lookup, not a
    /// timer, starts that lane's next one (by `Lane::index`).
    lanes_full: [bool; supervise::Lane::ALL.len()],
    /// When a diagnosis was last written for a (netns, protocol, port): under pressure, a
    /// failure on a port diagnosed within the last second is the one to shed, so that the
    /// room left goes to ports that have none.
    recently_diagnosed: HashMap<(u32, u16, u16), Instant>,
    /// Cgroup ids whose identity their path alone tells (no container there), or that it
    /// does not (`None`), and since when: see [`Enricher::quick_identity`].
    quick_identities: HashMap<u64, (Instant, Option<Arc<Identity>>)>,
    /// What cgroups' paths alone said of events whose identity was not answered in time, and
    /// when (see [`Enricher::identity_of`]).
    provisional: HashMap<u64, (Instant, Arc<Identity>)>,
}

/// Cgroup ids remembered by [`Enricher::quick_identity`] at most (cleared when full).
const QUICK_IDENTITIES_MAX: usize = 4_096;

impl Enricher {
    /// `enabled: false` (`--no-diagnosis`) passes events straight through.
    pub(crate) fn new(enabled: bool) -> Self {
        let (results_tx, results) = unbounded_channel();
        let now = Instant::now();
        Self {
            enabled,
            next_seq: 0,
            queue: VecDeque::new(),
            following: VecDeque::new(),
            keys: HashMap::default(),
            wanting: HashSet::default(),
            history: BindHistory::default(),
            workers: enabled.then(|| Supervisor::new(results_tx)),
            results: Some(results),
            memo: HashMap::default(),
            quick_identities: HashMap::default(),
            provisional: HashMap::default(),
            counters: EnrichCounters::default(),
            last_sweep: now,
            lanes_full: [false; supervise::Lane::ALL.len()],
            recently_diagnosed: HashMap::default(),
        }
    }

    /// Takes an event in arrival order and asks for the lookups it needs.
    pub(crate) fn push(&mut self, event: Bind, wall_ns: i128, now: Instant) {
        self.next_seq += 1;
        self.history.record(&event, wall_ns);
        let looking = self.enabled;
        // A failure's diagnosis, or whom a success shares its port with (SO_REUSEPORT).
        let mut keys = if looking { needed_lookups(&event) } else { NeededLookups::new() };
        // An id shared by unrelated processes (the root of a hierarchy, or any task on a host
        // without cgroup v2) says nothing of one process: its identity is then the pid's.
        let quick = if looking && event.cgroup_id != 0 { self.quick_identity(event.cgroup_id, now) } else { None };
        let mut identity_key = (looking && event.cgroup_id != 0 && quick.is_none()).then(|| {
            let per_process = !cgroup::names_one_group(event.cgroup_id);
            LookupKey::Cgroup {
                id: event.cgroup_id,
                pid: if per_process { event.tgid } else { 0 },
                comm: if per_process { comm_key(event.comm_bytes()) } else { 0 },
            }
        });
        let mut shed = false;
        let missing = keys.iter().chain(&identity_key).filter(|k| !self.keys.contains_key(k)).count();
        if missing > 0 && self.keys.len() + missing > KEYS_MAX {
            // At most one sweep per period: when every slot is taken by keys events wait
            // for, the new failure's diagnosis is shed instead.
            if now >= self.last_sweep + MIN_REFRESH {
                self.last_sweep = now;
                self.forget_idle_keys(now, Duration::ZERO);
            }
            if self.keys.len() + keys.iter().chain(&identity_key).filter(|k| !self.keys.contains_key(k)).count()
                > KEYS_MAX
            {
                keys.clear();
                identity_key = None;
                shed = true;
            }
        }
        for key in keys.iter().chain(&identity_key) {
            let state = self.keys.entry(*key).or_insert_with(|| KeyState::new(now));
            state.touched = now;
            state.pid_hint = event.tgid;
            if matches!(key, LookupKey::Sockets { .. }) && state.ports.len() < PORTS_PER_JOB_MAX {
                state.ports.insert(event.port);
            }
            if matches!(key, LookupKey::UnixName { .. }) && state.unix_path.is_none() {
                state.unix_path.clone_from(&event.unix_path);
            }
            // Unless the lookup under way (or done) was requested after this event arrived,
            // the event needs a newer one.
            let served = state.in_flight.is_some_and(|at| at >= now) || state.answer_for(now).is_some();
            if !served {
                state.wanted = true;
                self.wanting.insert(*key);
            }
        }
        // Lookups start in `poll`, once the whole ring-buffer batch is in: a lookup started
        // halfway through a batch would predate binds read after it.
        self.queue.push_back(Pending {
            seq: self.next_seq,
            event,
            wall_ns,
            keys,
            identity_key,
            identity: quick,
            arrived: now,
            shed,
        });
    }

    /// The identity of a cgroup that names no container, from its path (one
    /// `open_by_handle_at` per cgroup, then remembered): known at once, with no lookup to
    /// wait for, so the first events of a host process are not written unresolved, and one
    /// that exits at once (its cgroup removed) is named before it goes. Not for the
    /// hierarchy's root, shared by unrelated processes (see `push`).
    fn quick_identity(&mut self, id: u64, now: Instant) -> Option<Arc<Identity>> {
        if !cgroup::names_one_group(id) {
            return None;
        }
        if let Some((at, known)) = self.quick_identities.get(&id) {
            if now < *at + IDENTITY_TTL {
                return known.clone();
            }
        }
        let known = cgroup::path_of_id(id)
            .ok()
            .flatten()
            .and_then(|path| crate::host::identity::without_runtime(&path))
            .map(Arc::new);
        if self.quick_identities.len() >= QUICK_IDENTITIES_MAX {
            self.quick_identities.clear();
        }
        self.quick_identities.insert(id, (now, known.clone()));
        known
    }

    /// Starts the lookups that events wait for, each key at most every [`MIN_REFRESH`].
    fn dispatch(&mut self, now: Instant) {
        let Some(workers) = self.workers.as_mut() else { return };
        let mut started = Vec::new();
        self.lanes_full = [false; supervise::Lane::ALL.len()];
        let mut answered_now = Vec::new();
        let mut lanes_lost = Vec::new();
        for key in &self.wanting {
            let Some(state) = self.keys.get_mut(key) else {
                started.push(*key);
                continue;
            };
            if state.in_flight.is_some() || state.last_requested.is_some_and(|at| now < at + MIN_REFRESH) {
                continue;
            }
            let ports: Vec<u16> = state.ports.iter().copied().collect();
            // Who bindtrace saw bind these ports, and the failing process: asking them first
            // costs their fds alone, where a search of the host reads every process's.
            let mut hints: Vec<u32> = Vec::new();
            if let LookupKey::Sockets { netns, proto } = key {
                let ipproto = match proto {
                    sockdiag::Proto::Tcp => 6,
                    sockdiag::Proto::Udp => 17,
                };
                for &port in &ports {
                    hints.extend(self.history.binders((*netns, ipproto, port)).take(4));
                    if hints.len() >= HINTS_MAX {
                        break;
                    }
                }
            }
            hints.push(state.pid_hint);
            hints.dedup();
            let job = Job {
                key: *key,
                pid_hint: state.pid_hint,
                ports,
                unix_path: state.unix_path.clone(),
                hints,
                requested: now,
            };
            match workers.send(job, now) {
                Sent::Queued => {
                    state.in_flight = Some(now);
                    state.last_requested = Some(now);
                    state.wanted = false;
                    state.ports.clear();
                    self.counters.lookups += 1;
                    started.push(*key);
                }
                // That lane's queue is full: this key waits for a later dispatch.
                Sent::Full => self.lanes_full[supervise::Lane::of(key).index()] = true,
                // Its worker was gone: the jobs it had are asked again.
                Sent::WorkerGone(lane) => lanes_lost.push(lane),
                // That lane rests: its events are answered now, with why.
                Sent::Resting(job, why) => {
                    state.last_requested = Some(now);
                    state.wanted = false;
                    state.ports.clear();
                    answered_now.push(Done {
                        key: job.key,
                        requested: now,
                        facts: Arc::new(Facts::failed(&job.key, &why)),
                    });
                    started.push(*key);
                }
            }
        }
        for key in started {
            self.wanting.remove(&key);
        }
        for done in answered_now {
            self.complete(done);
        }
        for lane in lanes_lost {
            for (key, state) in self.keys.iter_mut() {
                if supervise::Lane::of(key) == lane && state.in_flight.take().is_some() {
                    state.wanted = true;
                    self.wanting.insert(*key);
                }
            }
        }
    }

    /// Stores a finished lookup.
    pub(crate) fn complete(&mut self, done: Done) {
        let Some(state) = self.keys.get_mut(&done.key) else { return };
        if state.in_flight == Some(done.requested) {
            state.in_flight = None;
        }
        if state.answer.as_ref().is_none_or(|(_, at)| *at <= done.requested) {
            // A lasting answer also serves the events that came while it was looked up.
            if lasts_for(&done.facts).is_some() {
                state.wanted = false;
            }
            state.answer = Some((done.facts, done.requested));
        }
        if state.wanted {
            self.wanting.insert(done.key);
        }
    }

    /// The channel finished lookups arrive on, for the event loop to wait on; pass each to
    /// [`Enricher::complete`].
    pub(crate) fn take_results(&mut self) -> Option<UnboundedReceiver<Done>> {
        self.results.take()
    }

    /// Time-driven work: lookups whose refresh interval has passed, lookups that hung, and
    /// forgetting idle keys. Call it at [`Enricher::next_wake`] and after any change.
    pub(crate) fn poll(&mut self, now: Instant) {
        let hung = self.workers.as_mut().map(|w| w.hung(now)).unwrap_or_default();
        for (lane, key, requested) in hung {
            if let Some(state) = self.keys.get_mut(&key) {
                state.in_flight = None;
                // The timeout answers every event that arrived until now.
                let message = format!("the lookup did not answer within {} s of its start", LOOKUP_TIMEOUT.as_secs());
                state.answer = Some((Arc::new(Facts::failed(&key, &message)), now.max(requested)));
                state.wanted = false;
            }
            self.counters.lookup_timeouts += 1;
            self.counters.worker_restarts += 1;
            // The jobs queued behind it on its lane went with its worker: asked again.
            for (other, state) in self.keys.iter_mut() {
                if supervise::Lane::of(other) == lane && state.in_flight.take().is_some() {
                    state.wanted = true;
                }
            }
            self.wanting.extend(self.keys.iter().filter(|(_, s)| s.wanted).map(|(k, _)| *k));
        }
        if now >= self.last_sweep + Duration::from_secs(1) {
            self.last_sweep = now;
            self.forget_idle_keys(now, KEY_IDLE);
        }
        self.dispatch(now);
    }

    /// Forgets keys untouched for `idle` that nothing waits for, and keeps the memo bounded.
    fn forget_idle_keys(&mut self, now: Instant, idle: Duration) {
        let waiting: HashSet<LookupKey> = self
            .queue
            .iter()
            .chain(&self.following)
            .flat_map(|p| p.keys.iter().chain(&p.identity_key).copied())
            .collect();
        self.keys.retain(|key, state| {
            waiting.contains(key) || state.in_flight.is_some() || now.saturating_duration_since(state.touched) < idle
        });
        self.wanting.retain(|key| self.keys.contains_key(key));
        if self.memo.len() > MEMO_MAX {
            self.memo.clear();
        }
    }

    /// When [`Enricher::poll`] or the pops next have something to do.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let deadline = self
            .queue
            .front()
            .filter(|p| !p.keys.is_empty() || p.identity_key.is_some())
            .map(|p| p.arrived + EMIT_DEADLINE);
        let follow_up = self.following.front().map(|p| p.arrived + FOLLOW_UP_LIMIT);
        let refresh = {
            self.wanting
                .iter()
                .filter(|k| !self.lanes_full[supervise::Lane::of(k).index()])
                .filter_map(|k| self.keys.get(k))
                .filter(|s| s.in_flight.is_none())
                .map(|s| s.last_requested.map_or(self.last_sweep, |at| at + MIN_REFRESH))
                .min()
        };
        // A job's timeout counts from its start, which only its worker knows (a job still
        // queued cannot hang; the one ahead of it is watched).
        let timeout = self.workers.as_ref().and_then(Supervisor::next_timeout);
        [deadline, follow_up, refresh, timeout].into_iter().flatten().min()
    }

    /// Is every answer this event needs in?
    fn answered(&self, pending: &Pending) -> bool {
        pending
            .keys
            .iter()
            .chain(&pending.identity_key)
            .all(|k| self.keys.get(k).is_some_and(|s| s.answer_for(pending.arrived).is_some()))
    }

    /// The next event in order: once its answers are in, at its deadline without them, or
    /// at once with `force` (at exit, saying what did not finish).
    pub(crate) fn pop(&mut self, now: Instant, force: bool) -> Option<Enriched> {
        let front = self.queue.front()?;
        let failed = front.event.ret < 0;
        // A success is checked (a shared port, NAT) only when it may be concerned (keys then,
        // unless they were shed).
        let needs_diagnosis = self.enabled && (failed || !front.keys.is_empty() || front.shed);
        let answered = self.answered(front);
        let due = now >= front.arrived + EMIT_DEADLINE || self.queue.len() > QUEUE_MAX;
        if !answered && !due && !force {
            return None;
        }
        let pending = self.queue.pop_front()?;
        let identity = self.identity_of(&pending, now);
        let explained = if !needs_diagnosis {
            Explained::Nothing
        } else if pending.shed {
            self.count_shed(&pending.event);
            Explained::Shed(SHED_OVERLOAD)
        } else if answered || force || pending.keys.is_empty() {
            match self.diagnosis_of(&pending, force && !answered) {
                Some(diagnosis) => {
                    self.note_diagnosed(&pending.event, &diagnosis, now);
                    Explained::Now(diagnosis)
                }
                None => Explained::Nothing,
            }
        } else if self.following.len() >= FOLLOWING_MAX / 2 && self.diagnosed_within_a_second(&pending.event, now) {
            // Under pressure: this port already has a recent diagnosis.
            self.count_shed(&pending.event);
            Explained::Shed(SHED_OVERLOAD)
        } else if self.following.len() < FOLLOWING_MAX {
            let marker = Enriched {
                seq: pending.seq,
                event: pending.event.clone(),
                wall_ns: pending.wall_ns,
                // A success is written as it is: a report follows only if there is one.
                explained: if failed { Explained::Follows } else { Explained::Nothing },
                identity,
            };
            self.following.push_back(pending);
            return Some(marker);
        } else {
            self.count_shed(&pending.event);
            Explained::Shed(SHED_OVERLOAD)
        };
        // A success whose check was shed is written as it is; the summary counts it.
        let explained = match explained {
            Explained::Shed(_) if !failed => Explained::Nothing,
            other => other,
        };
        Some(Enriched { seq: pending.seq, event: pending.event, wall_ns: pending.wall_ns, explained, identity })
    }

    /// Counts a failure's diagnosis, or a success's check for a shared port, not made.
    fn count_shed(&mut self, event: &BindEvent) {
        if event.ret < 0 {
            self.counters.shed += 1;
        } else if diagnose::sharing_option(event).is_some() {
            self.counters.sharing_unchecked += 1;
        }
    }

    /// The identity an event's cgroup lookup found, or why there is none; `None` only when
    /// lookups are off (`--no-diagnosis`) or the kernel gave no cgroup.
    fn identity_of(&mut self, pending: &Pending, now: Instant) -> Option<Arc<Identity>> {
        if !self.enabled || pending.event.cgroup_id == 0 {
            return None;
        }
        if let Some(known) = &pending.identity {
            return Some(known.clone());
        }
        let unresolved = |why: String| Some(Arc::new(Identity { unresolved: Some(why), ..Identity::default() }));
        let Some(key) = &pending.identity_key else {
            return unresolved("not looked up: too many lookups waiting (overload)".to_owned());
        };
        match self.keys.get(key).and_then(|s| s.answer_for(pending.arrived)) {
            Some((facts, _)) => match &**facts {
                Facts::Identity(identity) => Some(identity.clone()),
                _ => None,
            },
            None => {
                let why = format!("not resolved within {} ms of the event", EMIT_DEADLINE.as_millis());
                // What the cgroup's path says by itself: a container's runtime and id, a
                // machine, a unit (the name may come on later events). One syscall per cgroup
                // and second, remembered: a storm of such events must not make one each.
                let id = pending.event.cgroup_id;
                if let Some((at, known)) = self.provisional.get(&id) {
                    if now < *at + Duration::from_secs(1) {
                        return Some(known.clone());
                    }
                }
                let path = cgroup::names_one_group(id).then(|| cgroup::path_of_id(id).ok().flatten()).flatten();
                let identity = match path {
                    Some(path) => Arc::new(crate::host::identity::from_path_alone(&path, why)),
                    None => return unresolved(why),
                };
                if self.provisional.len() >= QUICK_IDENTITIES_MAX {
                    self.provisional.clear();
                }
                self.provisional.insert(id, (now, identity.clone()));
                Some(identity)
            }
        }
    }

    /// Diagnoses of events written earlier, whose answers are now in (or whose time ran
    /// out, or all of them with `force`), in order: at most `max` a call. Bounded because one
    /// answer can complete tens of thousands at once (a storm on 10,000 ports), and building
    /// all their diagnoses before writing any held them all in memory together (`heaptrack`:
    /// 13 MB at the peak of `cargo xtask bench --parts storms`).
    pub(crate) fn follow_ups(&mut self, now: Instant, force: bool, max: usize) -> Vec<FollowUp> {
        let mut out = Vec::new();
        // In place: each waiting one is taken from the front and put back at the end. A
        // second deque per call cost a megabyte a call under a storm (`heaptrack`).
        let mut kept = 0;
        for _ in 0..self.following.len() {
            if out.len() >= max {
                break;
            }
            let Some(pending) = self.following.pop_front() else { break };
            let answered = self.answered(&pending);
            let expired = now >= pending.arrived + FOLLOW_UP_LIMIT;
            if !(answered || expired || force) {
                self.following.push_back(pending);
                kept += 1;
                continue;
            }
            if let Some(diagnosis) = self.diagnosis_of(&pending, !answered) {
                self.counters.followed += 1;
                self.note_diagnosed(&pending.event, &diagnosis, now);
                out.push(FollowUp { seq: pending.seq, event: pending.event, wall_ns: pending.wall_ns, diagnosis });
            }
        }
        // Those put back go before those not visited yet: the order of arrival holds.
        self.following.rotate_right(kept);
        out
    }

    fn port_key(event: &BindEvent) -> (u32, u16, u16) {
        (event.netns_ino, event.protocol, event.port)
    }

    fn note_diagnosed(&mut self, event: &BindEvent, diagnosis: &Diagnosis, now: Instant) {
        if event.ret >= 0 {
            // A success's report: a shared port (see diagnose::sharing), NAT or both.
            if diagnosis.facts.shared_through.is_some() {
                self.counters.ports_shared += 1;
            }
            if diagnosis.kind == DiagnosisKind::PortForwarded {
                self.counters.ports_forwarded += 1;
            }
            return;
        }
        if self.recently_diagnosed.len() >= RECENT_MAX {
            self.recently_diagnosed.clear();
        }
        self.recently_diagnosed.insert(Self::port_key(event), now);
    }

    fn diagnosed_within_a_second(&self, event: &BindEvent, now: Instant) -> bool {
        self.recently_diagnosed
            .get(&Self::port_key(event))
            .is_some_and(|at| now.saturating_duration_since(*at) < Duration::from_secs(1))
    }

    fn diagnosis_of(&mut self, pending: &Pending, incomplete: bool) -> Option<Arc<Diagnosis>> {
        let answers: Vec<Option<(&Arc<Facts>, Instant)>> =
            pending.keys.iter().map(|k| self.keys.get(k).and_then(|s| s.answer_for(pending.arrived))).collect();
        let stamps: Option<Vec<Instant>> = answers.iter().map(|a| a.map(|(_, at)| at)).collect();
        let memo_key = MemoKey::of(&pending.event);
        if let (Some(stamps), Some((used, diagnosis))) = (&stamps, self.memo.get(&memo_key)) {
            if used == stamps {
                return Some(diagnosis.clone());
            }
        }
        let facts = |key: &LookupKey| {
            let index = pending.keys.iter().position(|k| k == key)?;
            answers.get(index).copied().flatten().map(|(facts, _)| &**facts)
        };
        let mut diagnosis = diagnose(&pending.event, facts, &self.history)?;
        if incomplete {
            diagnosis.note_unfinished();
        }
        let diagnosis = Arc::new(diagnosis);
        if let Some(stamps) = stamps {
            if self.memo.len() >= MEMO_MAX {
                self.memo.clear();
            }
            self.memo.insert(memo_key, (stamps, diagnosis.clone()));
        }
        Some(diagnosis)
    }

    /// How many events wait beyond the queue's cap (they leave at the next pops).
    pub(crate) fn over_cap(&self) -> usize {
        self.queue.len().saturating_sub(QUEUE_MAX)
    }

    /// Events not written yet, or diagnoses not written yet.
    pub(crate) fn has_pending(&self) -> bool {
        !self.queue.is_empty() || !self.following.is_empty()
    }

    pub(crate) fn counters(&self) -> EnrichCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::sample_event;
    use crate::host::runtimes::Runtime;

    /// Pops everything ready now.
    fn drain(enricher: &mut Enricher, now: Instant) -> Vec<Enriched> {
        std::iter::from_fn(|| enricher.pop(now, false)).collect()
    }

    async fn next_done(results: &mut UnboundedReceiver<Done>) -> Done {
        tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("lookup answers").expect("worker")
    }

    /// Stores the answers of the `n` lookups started (a failure asks for its port's sockets
    /// and the namespace's NAT rules).
    async fn complete(enricher: &mut Enricher, results: &mut UnboundedReceiver<Done>, n: u64) {
        for _ in 0..n {
            enricher.complete(next_done(results).await);
        }
    }

    /// A success whose socket was not read: only its identity is looked up (no NAT rules,
    /// no sharing).
    fn success_without_socket() -> BindEvent {
        let mut event = sample_event();
        event.ret = 0;
        event.sock_flags &= !bindtrace_common::sock_flags::SOCK_INFO;
        event
    }

    #[tokio::test]
    async fn a_storm_of_identical_failures_costs_one_lookup_and_keeps_order() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results channel");
        let start = Instant::now();
        let mut ok = sample_event();
        ok.ret = 0;
        ok.port = 1;
        enricher.push(sample_event().into(), 1, start);
        enricher.push(ok.into(), 2, start);
        for i in 0..8_000 {
            enricher.push(sample_event().into(), 3 + i, start);
        }
        assert_eq!(enricher.counters().lookups, 0, "lookups start once the batch is in");
        enricher.poll(start);
        assert_eq!(
            enricher.counters().lookups,
            2,
            "one socket dump and one read of the NAT rules for 8,001 identical failures and a success"
        );
        assert!(enricher.pop(start, false).is_none(), "the first failure waits for its lookup");
        // The lookups were requested as the first event arrived: they serve the events that
        // arrived with it, at the same instant.
        complete(&mut enricher, &mut results, 2).await;
        let out = drain(&mut enricher, start);
        assert_eq!(out.len(), 8_002);
        assert!(out.windows(2).all(|w| w[0].seq + 1 == w[1].seq), "events leave in order");
        let Explained::Now(first) = &out[0].explained else { panic!("diagnosed: {:?}", out[0].explained) };
        assert_eq!(out[1].explained, Explained::Nothing, "successes get no diagnosis");
        let (Explained::Now(a), Explained::Now(b)) = (&out[2].explained, &out[3].explained) else {
            panic!("diagnosed")
        };
        assert!(Arc::ptr_eq(a, b) && Arc::ptr_eq(first, a), "identical failures share one diagnosis");
    }

    #[tokio::test]
    async fn an_event_leaves_at_its_deadline_and_its_diagnosis_follows() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results channel");
        let start = Instant::now();
        enricher.push(sample_event().into(), 1, start);
        let mut ok = sample_event();
        ok.ret = 0;
        enricher.push(ok.into(), 2, start);
        enricher.poll(start);
        assert!(enricher.pop(start + EMIT_DEADLINE / 2, false).is_none(), "waits before its deadline");
        assert_eq!(enricher.next_wake(), Some(start + EMIT_DEADLINE));
        let late = start + EMIT_DEADLINE;
        let out = drain(&mut enricher, late);
        assert_eq!(out.len(), 2, "the failure and the success behind it both leave at the deadline");
        assert_eq!((out[0].seq, &out[0].explained), (1, &Explained::Follows));
        assert!(enricher.follow_ups(late, false, usize::MAX).is_empty(), "nothing answered yet");
        let started = enricher.counters().lookups;
        complete(&mut enricher, &mut results, started).await;
        let follow_ups = enricher.follow_ups(late, false, usize::MAX);
        assert_eq!(follow_ups.len(), 1);
        assert_eq!(follow_ups[0].seq, 1, "linked to its event");
        assert!(!enricher.has_pending());
        assert_eq!(enricher.counters().followed, 1);
    }

    #[tokio::test]
    async fn follow_ups_leave_a_slice_at_a_time_in_order() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results channel");
        let start = Instant::now();
        let in_netns = |netns| {
            let mut event = sample_event();
            event.netns_ino = netns;
            Bind::from(event)
        };
        // The first waits for other lookups than the two behind it.
        enricher.push(in_netns(1), 1, start);
        enricher.push(in_netns(2), 2, start);
        enricher.push(in_netns(2), 3, start);
        enricher.poll(start);
        let late = start + EMIT_DEADLINE;
        assert_eq!(drain(&mut enricher, late).len(), 3, "written at their deadline, diagnoses to follow");
        let first_keys = enricher.following.front().expect("following").keys.clone();
        let mut held = Vec::new();
        for _ in 0..enricher.counters().lookups {
            let done = next_done(&mut results).await;
            if first_keys.contains(&done.key) {
                held.push(done);
            } else {
                enricher.complete(done);
            }
        }
        assert!(!held.is_empty(), "the first event's lookups are held back");
        let seqs = |follow_ups: Vec<FollowUp>| follow_ups.iter().map(|f| f.seq).collect::<Vec<_>>();
        assert_eq!(seqs(enricher.follow_ups(late, false, 1)), [2], "one a call, the first answered");
        for done in held {
            enricher.complete(done);
        }
        assert_eq!(seqs(enricher.follow_ups(late, false, 10)), [1, 3], "the rest still in order");
        assert!(!enricher.has_pending());
    }

    #[tokio::test]
    async fn an_answer_from_before_an_event_does_not_explain_it() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results channel");
        let start = Instant::now();
        enricher.push(sample_event().into(), 1, start);
        enricher.poll(start);
        complete(&mut enricher, &mut results, 2).await;
        assert!(matches!(enricher.pop(start, false).map(|e| e.explained), Some(Explained::Now(_))));
        // The same failure again, later: the old answer predates it, and a new lookup starts
        // once MIN_REFRESH has passed.
        let later = start + Duration::from_millis(10);
        enricher.push(sample_event().into(), 2, later);
        enricher.poll(later);
        assert!(enricher.pop(later, false).is_none());
        assert_eq!(enricher.counters().lookups, 2, "not before MIN_REFRESH");
        assert!(enricher.next_wake().is_some_and(|at| at <= start + MIN_REFRESH));
        enricher.poll(start + MIN_REFRESH);
        assert_eq!(enricher.counters().lookups, 3, "the sockets again; the NAT rules' answer lasts");
        complete(&mut enricher, &mut results, 1).await;
        assert!(matches!(enricher.pop(later, false).map(|e| e.explained), Some(Explained::Now(_))));
    }

    /// Past the queue's cap the oldest events leave before their deadline (their diagnosis
    /// follows): a storm's backlog cannot grow the queue without bound.
    #[test]
    fn past_its_cap_the_queue_lets_the_oldest_go() {
        let mut enricher = Enricher::new(true);
        let start = Instant::now();
        for i in 0..QUEUE_MAX + 100 {
            enricher.push(sample_event().into(), i as i128, start);
        }
        assert_eq!(enricher.over_cap(), 100);
        let out = drain(&mut enricher, start);
        assert_eq!(out.len(), 100, "down to the cap");
        assert_eq!(out[0].explained, Explained::Follows, "its diagnosis follows");
        assert_eq!(enricher.over_cap(), 0);
    }

    #[test]
    fn overload_sheds_diagnoses_never_events() {
        let mut enricher = Enricher::new(true);
        let start = Instant::now();
        let total = FOLLOWING_MAX + 10;
        for i in 0..total {
            let mut event = sample_event();
            event.port = 1000 + (i % 50_000) as u16;
            event.netns_ino = 1 + i as u32; // a key each: answers cannot come in time
            enricher.push(event.into(), i as i128, start);
        }
        let out = drain(&mut enricher, start + EMIT_DEADLINE);
        assert_eq!(out.len(), total, "every event is written");
        let follows = out.iter().filter(|e| e.explained == Explained::Follows).count();
        let shed = out.iter().filter(|e| e.explained == Explained::Shed(SHED_OVERLOAD)).count();
        // Each failure takes two keys (its sockets, its namespace's NAT rules): the keys run
        // out, at KEYS_MAX / 2 failures, before the follow-up queue does; the rest are shed.
        assert_eq!((follows, shed), (KEYS_MAX / 2, total - KEYS_MAX / 2));
        assert_eq!(enricher.counters().shed, shed as u64);
        assert!(enricher.keys.len() <= KEYS_MAX);
    }

    /// A success of this process, in its own cgroup.
    fn own_success() -> BindEvent {
        let mut event = success_without_socket();
        event.tgid = std::process::id();
        event.cgroup_id = cgroup::ProcessCgroups::read(event.tgid)
            .and_then(|c| c.v2)
            .and_then(|path| cgroup::id_of_path(&path).ok())
            .map_or(1, |(id, _)| id);
        event
    }

    #[tokio::test]
    async fn a_resolved_identity_is_looked_up_once_and_serves_later_events() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results");
        let start = Instant::now();
        enricher.push(own_success().into(), 0, start);
        enricher.poll(start);
        assert!(drain(&mut enricher, start).is_empty(), "a success waits for its identity");
        enricher.complete(next_done(&mut results).await);
        let first = drain(&mut enricher, Instant::now());
        assert_eq!(first.len(), 1);
        let identity = first[0].identity.clone().expect("an identity");
        assert_eq!(identity.unresolved, None, "{identity:?}");
        assert!(identity.cgroup.is_some() && identity.container.is_none(), "the test runs on the host: {identity:?}");
        // A later event of the same cgroup is served by that answer, at once.
        let later = Instant::now();
        enricher.push(own_success().into(), 0, later);
        enricher.poll(later);
        let second = drain(&mut enricher, later);
        assert_eq!(second.len(), 1, "served without a lookup");
        assert_eq!(second[0].identity, Some(identity));
        assert_eq!(enricher.counters().lookups, 1);
    }

    /// A cgroup whose path names no container (a service, a session) is known at once: the
    /// event waits for no lookup, and its identity is there even if the process and its
    /// cgroup are gone by the time a lookup would run.
    #[tokio::test]
    async fn a_host_cgroup_is_known_from_its_path_at_once() {
        let Some(mount) = cgroup::v2_mount() else {
            if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
                panic!("no cgroup v2 hierarchy is mounted");
            }
            eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
            return;
        };
        let name = format!("bindtrace-quick-{}.scope", std::process::id());
        let dir = mount.join(&name);
        if let Err(err) = std::fs::create_dir(&dir) {
            if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
                panic!("cannot make a cgroup: {err}");
            }
            eprintln!("SKIPPED: cannot make a cgroup: {err}");
            return;
        }
        let (id, _) = cgroup::id_of_path(&format!("/{name}")).expect("its id");
        let mut enricher = Enricher::new(true);
        let mut event = success_without_socket();
        event.tgid = u32::MAX - 9; // no such process
        event.cgroup_id = id;
        let start = Instant::now();
        enricher.push(event.into(), 0, start);
        enricher.poll(start);
        let out = drain(&mut enricher, start);
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(out.len(), 1, "written at once, no lookup awaited");
        let identity = out[0].identity.clone().expect("an identity");
        assert_eq!(identity.unresolved, None, "{identity:?}");
        assert_eq!(identity.cgroup.as_deref(), Some(format!("/{name}").as_str()));
        assert_eq!(identity.unit.as_deref(), Some(name.as_str()));
        assert_eq!(enricher.counters().lookups, 0);
    }

    /// A container's identity not answered by the event's deadline still says what its
    /// cgroup's path says: the runtime and the container's id (its name unknown, and why).
    #[test]
    fn past_its_deadline_a_containers_event_still_names_the_container_by_its_path() {
        let Some(mount) = cgroup::v2_mount() else {
            assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "no cgroup v2 hierarchy is mounted");
            eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
            return;
        };
        let id_text = format!("{:064x}", u64::from(std::process::id()));
        let dir = mount.join(format!("docker-{id_text}.scope"));
        if let Err(err) = std::fs::create_dir(&dir) {
            assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "cannot make a cgroup: {err}");
            eprintln!("SKIPPED: cannot make a cgroup: {err}");
            return;
        }
        let (id, _) = cgroup::id_of_path(&format!("/docker-{id_text}.scope")).expect("its id");
        let mut enricher = Enricher::new(true);
        let mut event = success_without_socket();
        event.cgroup_id = id;
        let start = Instant::now();
        enricher.push(event.into(), 0, start);
        // No poll: the lookup never starts, as if the runtime were slow.
        let out = drain(&mut enricher, start + EMIT_DEADLINE);
        let _ = std::fs::remove_dir(&dir);
        let identity = out[0].identity.clone().expect("an identity");
        let container = identity.container.as_ref().expect("the container its path names");
        assert_eq!(
            (container.runtime, container.id.as_str(), container.name.as_deref()),
            (Runtime::Docker, id_text.as_str(), None)
        );
        assert!(identity.unresolved.as_deref().is_some_and(|why| why.contains("100 ms")), "{identity:?}");
    }

    #[tokio::test]
    async fn an_unresolved_identity_is_asked_again_and_never_reads_as_none() {
        let mut enricher = Enricher::new(true);
        let mut results = enricher.take_results().expect("results");
        // A cgroup that does not exist, of a process that does not either.
        let mut event = success_without_socket();
        event.tgid = u32::MAX - 7;
        event.cgroup_id = u64::MAX - 7;
        let start = Instant::now();
        enricher.push(event.into(), 0, start);
        enricher.poll(start);
        enricher.complete(next_done(&mut results).await);
        let out = drain(&mut enricher, Instant::now());
        let identity = out[0].identity.clone().expect("an identity");
        assert!(identity.unresolved.is_some(), "{identity:?}");
        assert_eq!(identity.container, None);
        // The failed answer does not serve a later event: that one is looked up again.
        let later = Instant::now() + MIN_REFRESH;
        enricher.push(event.into(), 0, later);
        enricher.poll(later);
        assert!(drain(&mut enricher, later).is_empty(), "waits for a new lookup");
        assert_eq!(enricher.counters().lookups, 2);
        // Past its deadline it leaves, saying why it has no identity.
        let due = drain(&mut enricher, later + EMIT_DEADLINE);
        assert!(due[0].identity.as_ref().is_some_and(|i| i.unresolved.is_some()));
    }

    /// A pid reused by another program is not served the old process's identity (issue 19):
    /// on an id shared by every process (the hierarchy's root) the key is the pid and name.
    #[test]
    fn a_reused_pid_with_another_name_is_looked_up_again() {
        let root = cgroup::v2_mount().and_then(|mount| std::fs::metadata(mount).ok()).map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.ino()
        });
        let Some(root) = root else {
            eprintln!("SKIPPED: no cgroup v2 hierarchy on this host");
            return;
        };
        let mut enricher = Enricher::new(true);
        let start = Instant::now();
        let mut first = sample_event();
        first.ret = 0;
        first.cgroup_id = root;
        let mut reused = first;
        reused.comm = *b"other-program\0\0\0";
        enricher.push(first.into(), 0, start);
        enricher.push(first.into(), 0, start);
        enricher.push(reused.into(), 0, start);
        let identity_keys: HashSet<LookupKey> = enricher.queue.iter().filter_map(|p| p.identity_key).collect();
        assert_eq!(identity_keys.len(), 2, "one key per (pid, name): {identity_keys:?}");
    }

    #[test]
    fn disabled_passes_through_and_force_empties_the_queue() {
        let start = Instant::now();
        let mut off = Enricher::new(false);
        off.push(sample_event().into(), 1, start);
        let out = off.pop(start, false).expect("no waiting when disabled");
        assert_eq!(out.explained, Explained::Nothing);

        let mut on = Enricher::new(true);
        on.push(sample_event().into(), 1, start);
        let forced = on.pop(start, true).expect("forced");
        let Explained::Now(diagnosis) = forced.explained else { panic!("a diagnosis even without facts") };
        assert_eq!(diagnosis.kind, DiagnosisKind::Unknown);
        assert!(diagnosis.unknown.iter().any(|u| u.contains("did not finish")), "{diagnosis:?}");
        assert!(!on.has_pending());
    }
}
