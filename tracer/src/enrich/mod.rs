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
mod keys;
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
    keys::{comm_key, lasts_for, KeyState, MemoKey, IDENTITY_TTL},
    lookup::{Facts, LookupKey},
    supervise::{Job, Sent, Supervisor, LOOKUP_TIMEOUT},
};
use crate::{
    decode::{Bind, BindEventExt as _},
    host::{cgroup, identity::Identity, owners, sockdiag},
    model::{Diagnosis, DiagnosisKind, EnrichCounters, Enriched, Explained, FollowUp},
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

/// Why diagnoses were shed.
pub(crate) const SHED_OVERLOAD: &str = "overload: too many diagnoses waiting";

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
mod tests;
