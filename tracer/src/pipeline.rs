//! Drives the stages in order — ring buffer → decode → filter → enrich → sink — until a
//! signal, the duration, the event count, the traced command's exit or a closed output ends
//! the run, and reports drops live.

use std::{io, os::fd::AsRawFd, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, Signal, SignalKind},
    time::{interval, sleep_until, Instant, MissedTickBehavior},
};

use tokio::sync::mpsc::UnboundedReceiver;

use crate::{
    clock::WallClock,
    decode::decode,
    enrich::{Done, Enricher},
    filter::EventFilter,
    model::EnrichCounters,
    probe::KernelCounters,
    probe::{AttachedProbe, ProbeLogger},
    sink::Sink,
    summary::Summary,
};

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    Signal,
    Duration,
    Count,
    /// The reader of our output went away (`| head`): end quietly.
    OutputClosed,
    /// The followed tree's root exited (`-- CMD`, `--tree PID`).
    RootExited,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub duration: Option<Duration>,
    pub count: Option<u64>,
}

/// How often drops are checked and reported, and the wall clock re-synchronised.
const TICK: Duration = Duration::from_secs(1);

/// How long the end of a run waits for lookups still under way: Ctrl-C under a storm ends
/// within about this long; a second Ctrl-C ends at once.
const FINISH_TIMEOUT: Duration = Duration::from_millis(500);

/// Events written between two reads of the ring (see [`Pipeline::pump`]).
const EMIT_SLICE: usize = 512;
/// Records one read of the ring takes at most, and read-and-write rounds per pump. With the
/// enrich stage's queue cap (8,192), the queue never holds more than 16,384 events: its
/// memory is part of the peak under a storm (`heaptrack`: 15.7 MB when a read of 16,384
/// came on top of a queue of 32,768).
const READ_MAX: usize = 8_192;
const PUMP_ROUNDS: usize = 64;

pub(crate) struct Pipeline<'a> {
    pub filter: &'a EventFilter,
    pub enricher: Enricher,
    pub sink: &'a mut dyn Sink,
    pub summary: Summary,
    pub clock: WallClock,
    pub limits: Limits,
    /// `--metrics`: counts of what is written.
    pub metrics: Option<crate::metrics::Metrics>,
    /// `--file`, reopened on SIGHUP (log rotation); without it SIGHUP ends the run.
    pub file: Option<std::path::PathBuf>,
    /// `--container`/`--cgroup` followed across restarts: what the kernel passed while a
    /// selection was widened to its parent is checked here (see `follow`).
    pub scope: Option<std::sync::Arc<crate::follow::ScopeGate>>,
    /// Resolves when the followed tree's root exits (`-- CMD`, `--tree PID`).
    pub root_exit: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>>,
}

/// SIGINT and SIGTERM handlers. Installed before the probe attaches, so that a signal sent
/// as soon as bindtrace says "attached" still ends it cleanly. None with `-- CMD`: the
/// signals are CMD's then (see `command`), and its exit ends the trace.
pub(crate) struct StopSignals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
    /// The terminal closed (an ssh drop): end as cleanly as on SIGTERM, losing nothing.
    hangup: Option<Signal>,
}

impl StopSignals {
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {
            interrupt: Some(signal(SignalKind::interrupt()).context("installing the SIGINT handler")?),
            terminate: Some(signal(SignalKind::terminate()).context("installing the SIGTERM handler")?),
            hangup: Some(signal(SignalKind::hangup()).context("installing the SIGHUP handler")?),
        })
    }

    /// No handlers: the signals are someone else's (`-- CMD`).
    pub(crate) fn none() -> Self {
        Self { interrupt: None, terminate: None, hangup: None }
    }
}

/// The next delivery of a signal that has a handler; never for one that has none.
async fn received(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The root's exit, if a tree is followed; never otherwise. A failure to watch it ends the
/// trace too (said on stderr): waiting would never end.
async fn root_exited(root_exit: &mut Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>>) {
    match root_exit {
        Some(exit) => {
            if let Err(err) = exit.as_mut().await {
                crate::say::line(&format!("warning: {err:#}"));
            }
        }
        None => std::future::pending().await,
    }
}

/// What a drain of the ring buffer decided.
enum Drained {
    /// Keep going; how many records there were.
    Continue(usize),
    Stop(Ending),
}

/// The probe forces a wake-up at most every `WAKEUP_INTERVAL_NS` while records flow, so the
/// reader, once it has seen records, drains the ring every `RECHECK` until it has seen none
/// for `POLL_AFTER_LAST_RECORD`, longer than that interval: a record that woke nobody waits
/// at most one recheck.
const RECHECK: Duration = Duration::from_nanos(bindtrace_common::READER_RECHECK_NS);
const POLL_AFTER_LAST_RECORD: Duration =
    Duration::from_nanos(bindtrace_common::WAKEUP_INTERVAL_NS + 2 * bindtrace_common::READER_RECHECK_NS);

fn is_closed_output(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::BrokenPipe
}

impl Pipeline<'_> {
    /// Reads every record in the ring buffer now into the enrich stage.
    fn read_ring(&mut self, ring: &mut RingBuf<MapData>) -> (usize, Option<Ending>) {
        let mut records = 0;
        // One arrival time for the batch, taken before it is read (records keep arriving
        // meanwhile): lookups are dispatched only after the loop, so a lookup started for any
        // record of the batch still sees the state after its bind.
        let arrived = std::time::Instant::now();
        // Bounded: under a storm the producer refills the ring while it is read.
        while records < READ_MAX {
            let Some(item) = ring.next() else { break };
            records += 1;
            match decode(&item) {
                Ok(event) => {
                    if !self.filter.accepts(&event) {
                        // The kernel applied the same filters: a disagreement is a bug, counted
                        // and reported, never silent.
                        if self.summary.filter_mismatches() == 0 {
                            log::warn!("an event passed the kernel's filters but not the same filters here (counted in the summary as filter_mismatches)");
                        }
                        self.summary.record_filter_mismatch();
                        continue;
                    }
                    if self.scope.as_ref().is_some_and(|scope| !scope.admits(event.cgroup_id)) {
                        self.summary.record_outside_scope();
                        continue;
                    }
                    self.summary.record(&event);
                    self.summary.record_tree_failure(&event);
                    let wall_ns = self.clock.wall_ns(event.timestamp_ns);
                    self.enricher.push(event, wall_ns, arrived);
                    if self.limits.count.is_some_and(|limit| self.summary.events() >= limit) {
                        return (records, Some(Ending::Count));
                    }
                }
                Err(err) => {
                    if self.summary.decode_errors() == 0 {
                        log::warn!("{err} (further decode errors are only counted)");
                    }
                    self.summary.record_decode_error();
                }
            }
        }
        (records, None)
    }

    /// Reads the ring and writes what is ready, [`EMIT_SLICE`] events at a time with a read
    /// of the ring between slices: an answer that completes a whole window can make
    /// thousands of events ready at once, and writing them all before reading again left the
    /// ring unread for longer than it holds (events lost under `cargo xtask bench --parts
    /// storms`).
    fn pump(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<Drained> {
        let mut total = 0;
        // Bounded too, so that a stop (a signal) is seen between calls however long the
        // storm lasts; the event loop calls again while records flow.
        for _ in 0..PUMP_ROUNDS {
            let (records, stop) = self.read_ring(ring);
            total += records;
            if let Some(ending) = stop {
                self.emit_ready(false)?;
                return Ok(Drained::Stop(ending));
            }
            // The batch is in: start the lookups it needs (see Enricher::push).
            let now = std::time::Instant::now();
            self.enricher.poll(now);
            // At least what brings the queue back to its cap: a storm read in full batches
            // must not pile up events faster than slices of 512 write them.
            let written = self.emit_slice(now, false, EMIT_SLICE.max(self.enricher.over_cap()))?;
            if records == 0 && written < EMIT_SLICE {
                break;
            }
        }
        self.emit_ready(false)?;
        Ok(Drained::Continue(total))
    }

    /// Writes up to `max` ready events; returns how many.
    fn emit_slice(&mut self, now: std::time::Instant, force: bool, max: usize) -> io::Result<usize> {
        let mut written = 0;
        while written < max {
            let Some(ready) = self.enricher.pop(now, force) else { break };
            self.sink.event(&ready)?;
            if let Some(metrics) = &mut self.metrics {
                metrics.observe(&ready);
            }
            written += 1;
        }
        Ok(written)
    }

    /// Passes every event that is ready (diagnosed, or due) to the sink in order, then the
    /// diagnoses that follow earlier events, and writes the batch out. With `force`,
    /// everything still held goes out.
    fn emit_ready(&mut self, force: bool) -> io::Result<()> {
        let now = std::time::Instant::now();
        self.enricher.poll(now);
        self.emit_slice(now, force, usize::MAX)?;
        // A slice at a time: each slice's diagnoses are written and freed before the next
        // are built.
        loop {
            let follow_ups = self.enricher.follow_ups(now, force, EMIT_SLICE);
            for follow_up in &follow_ups {
                self.sink.follow_up(follow_up)?;
            }
            if follow_ups.len() < EMIT_SLICE {
                break;
            }
        }
        self.sink.flush()
    }

    /// Writes the rest of the run to a new file at `path` (the old one was moved away by a
    /// log rotator): appended to when it exists, created otherwise. When it cannot be opened
    /// (a directory that refuses, a full disk), the run goes on writing where it was, and
    /// says so: losing the trace to a rotation would be worse than a file at its old name.
    fn reopen(&mut self, path: &std::path::Path) -> io::Result<()> {
        self.emit_ready(false)?;
        let file = match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => file,
            Err(err) => {
                crate::say::line(&format!(
                    "SIGHUP: cannot reopen {} ({err}): still writing to the file opened before (under its \
                     new name, if it was rotated); the next SIGHUP tries again",
                    path.display()
                ));
                return Ok(());
            }
        };
        self.sink.reopen(Box::new(crate::sink::writer::ThreadWriter::spawn(Box::new(file), None)?))?;
        self.summary.record_reopen();
        crate::say::line(&format!("SIGHUP: writing to a reopened {}", path.display()));
        Ok(())
    }

    /// When the enrich stage next has something to do (a deadline, a lookup to start).
    fn enrich_wake(&self) -> Option<Instant> {
        let at = Instant::from_std(self.enricher.next_wake()?);
        // Never a busy loop on a time already past.
        Some(at.max(Instant::now() + Duration::from_millis(1)))
    }

    /// Waits (a bounded time, or until a second signal) for the lookups of events still
    /// queued, then prints them all.
    async fn finish(
        &mut self,
        results: &mut Option<UnboundedReceiver<Done>>,
        signals: &mut StopSignals,
    ) -> io::Result<()> {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while self.enricher.has_pending() {
            let wake = self.enrich_wake().unwrap_or(deadline).min(deadline);
            tokio::select! {
                done = next_lookup(results) => match done {
                    Some(done) => self.enricher.complete(done),
                    None => break,
                },
                _ = sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                _ = received(&mut signals.interrupt) => break,
                _ = received(&mut signals.terminate) => break,
                _ = received(&mut signals.hangup) => break,
            }
            self.emit_ready(false)?;
        }
        self.emit_ready(true)
    }

    pub(crate) async fn run(&mut self, probe: &mut AttachedProbe, mut signals: StopSignals) -> Result<Ending> {
        let mut ring = poll(probe.take_ring_buffer()?).context("polling the ring buffer")?;
        let mut logger = match probe.take_logger() {
            Some(logger) => Some(poll(logger).context("polling the eBPF log")?),
            None => None,
        };
        let deadline = self.limits.duration.map(|d| Instant::now() + d);
        let mut tick = interval(TICK);
        let mut reported_output_drops = 0;
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The probe's counters start at zero when it is loaded: anything lost before this
        // loop runs is still reported at the first tick.
        let mut reported = KernelCounters::default();
        let mut results = self.enricher.take_results();
        let mut polling = Polling { last_records: Instant::now(), recheck: None };
        let mut reported_enrich = self.enricher.counters();
        let mut root_exit = self.root_exit.take();

        let ending = loop {
            let enrich_wake = self.enrich_wake();
            let recheck = polling.recheck;
            tokio::select! {
                _ = received(&mut signals.interrupt) => break Ending::Signal,
                _ = received(&mut signals.terminate) => break Ending::Signal,
                _ = root_exited(&mut root_exit) => break Ending::RootExited,
                _ = received(&mut signals.hangup) => {
                    // With --file, SIGHUP is log rotation: the file is opened again by name.
                    let Some(path) = self.file.clone() else { break Ending::Signal };
                    self.reopen(&path).with_context(|| format!("reopening {} on SIGHUP", path.display()))?;
                }
                _ = async { sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => break Ending::Duration,
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for the ring buffer")?;
                    // Clear first, then drain: a record that lands after the drain re-arms the fd.
                    guard.clear_ready();
                    if let Some(ending) = settle(self.pump(guard.get_inner_mut()), &mut polling)? {
                        break ending;
                    }
                }
                _ = async { sleep_until(recheck.unwrap_or_else(Instant::now)).await }, if recheck.is_some() => {
                    let ended = settle(self.pump(ring.get_mut()), &mut polling)?;
                    polling.rechecked();
                    if let Some(ending) = ended {
                        break ending;
                    }
                }
                done = next_lookup(&mut results) => {
                    let pumped = match done {
                        Some(done) => {
                            self.enricher.complete(done);
                            self.pump(ring.get_mut())
                        }
                        None => {
                            results = None; // the worker is gone; queued events are forced out at the end
                            Ok(Drained::Continue(0))
                        }
                    };
                    if let Some(ending) = settle(pumped, &mut polling)? {
                        break ending;
                    }
                }
                _ = async { sleep_until(enrich_wake.unwrap_or_else(Instant::now)).await }, if enrich_wake.is_some() => {
                    if let Some(ending) = settle(self.pump(ring.get_mut()), &mut polling)? {
                        break ending;
                    }
                }
                _ = forward_probe_log(&mut logger) => {}
                _ = tick.tick() => {
                    // Also notices a stdout whose reader went away while nothing was written.
                    match self.sink.flush() {
                        Err(err) if is_closed_output(&err) => break Ending::OutputClosed,
                        Err(err) => return Err(err).context("writing events"),
                        Ok(()) => {}
                    }
                    let dropped_lines = crate::sink::writer::lines_dropped();
                    if dropped_lines > reported_output_drops {
                        crate::say::line(&format!(
                            "the output did not keep up: {} lines dropped in the last second ({dropped_lines} in total)",
                            dropped_lines - reported_output_drops
                        ));
                        reported_output_drops = dropped_lines;
                    }
                    self.clock.resync();
                    let mut programs = Vec::new();
                    if let Ok((now, now_programs)) = probe.counters() {
                        report_new_drops(&reported, &now);
                        reported = now;
                        programs = now_programs;
                    }
                    let now = self.enricher.counters();
                    report_shed_diagnoses(&reported_enrich, &now);
                    reported_enrich = now;
                    if let Some(metrics) = &self.metrics {
                        metrics.update(&reported, self.summary.filter_mismatches(), now);
                        metrics.update_programs(&programs);
                    }
                }
            }
        };

        if ending == Ending::OutputClosed {
            return Ok(ending);
        }
        // Records already in the ring when a signal or the deadline arrived are still printed,
        // so every bind that completed before the stop is in the output.
        let mut finished = Ok(());
        if matches!(ending, Ending::Signal | Ending::Duration | Ending::RootExited) {
            finished = self.pump(ring.get_mut()).map(|_| ());
        }
        let finished = match finished {
            Ok(()) => self.finish(&mut results, &mut signals).await,
            Err(err) => Err(err),
        };
        match finished {
            Ok(()) => Ok(ending),
            Err(err) if is_closed_output(&err) => Ok(Ending::OutputClosed),
            Err(err) => Err(err).context("writing events"),
        }
    }
}

/// The reader's polling while records flow (see [`RECHECK`]).
struct Polling {
    last_records: Instant,
    /// When to read the ring again without a wake-up; `None` once records stopped.
    recheck: Option<Instant>,
}

impl Polling {
    /// A read took `records`: any record (and the wake-up it may have carried) keeps the
    /// reader polling, whichever branch read it.
    fn saw(&mut self, records: usize) {
        if records > 0 {
            self.last_records = Instant::now();
            self.recheck = Some(self.last_records + RECHECK);
        }
    }

    /// After a timed re-read: poll on until no record came for `POLL_AFTER_LAST_RECORD`.
    fn rechecked(&mut self) {
        let now = Instant::now();
        self.recheck = (now < self.last_records + POLL_AFTER_LAST_RECORD).then(|| now + RECHECK);
    }
}

/// What the event loop does after reading and writing: go on (`None`) or end.
fn settle(pumped: io::Result<Drained>, polling: &mut Polling) -> Result<Option<Ending>> {
    match pumped {
        Ok(Drained::Continue(records)) => {
            polling.saw(records);
            Ok(None)
        }
        Ok(Drained::Stop(ending)) => Ok(Some(ending)),
        Err(err) if is_closed_output(&err) => Ok(Some(Ending::OutputClosed)),
        Err(err) => Err(err).context("writing events"),
    }
}

/// The next finished lookup; pending forever when there is no worker.
async fn next_lookup(results: &mut Option<UnboundedReceiver<Done>>) -> Option<Done> {
    match results {
        Some(results) => results.recv().await,
        None => std::future::pending().await,
    }
}

/// Registers a map's fd with the runtime for readability.
fn poll<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd (an aya map or logger) and keeps it open and unchanged until
    // it is dropped together with the AsyncFd.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}

/// Passes the probe's log lines (rare error paths) on to the `log` crate; never returns
/// without a logger.
async fn forward_probe_log(logger: &mut Option<AsyncFd<ProbeLogger>>) {
    let Some(fd) = logger.as_mut() else {
        return std::future::pending().await;
    };
    match fd.readable_mut().await {
        Ok(mut guard) => {
            guard.clear_ready();
            guard.get_inner_mut().flush();
        }
        Err(err) => {
            log::debug!("eBPF log unavailable: {err}");
            *logger = None;
        }
    }
}

/// One stderr line whenever diagnoses were shed since the last tick (the events were not).
fn report_shed_diagnoses(before: &EnrichCounters, now: &EnrichCounters) {
    let shed = now.shed.saturating_sub(before.shed);
    if shed > 0 {
        crate::say::line(&format!(
            "{shed} failures in the last second got no diagnosis (lookups could not keep up); \
             every event was still written ({} in total)",
            now.shed
        ));
    }
}

/// One stderr line whenever events were lost since the last tick: never silently.
fn report_new_drops(before: &KernelCounters, now: &KernelCounters) {
    let unfollowed = now.tree_not_followed.saturating_sub(before.tree_not_followed);
    if unfollowed > 0 {
        crate::say::line(&format!(
            "{unfollowed} new processes or threads of the tree were not followed (the kernel's map of the tree is \
             full): their binds are missing"
        ));
    }
    let lost = now.dropped().saturating_sub(before.dropped());
    if lost == 0 {
        return;
    }
    let parts = [
        (now.dropped_ring_buffer_full.saturating_sub(before.dropped_ring_buffer_full), "ring buffer full"),
        (now.dropped_entry_lost.saturating_sub(before.dropped_entry_lost), "entry lost"),
        (now.dropped_recursion.saturating_sub(before.dropped_recursion), "return hook skipped by the kernel"),
        (now.dropped_return_missed.saturating_sub(before.dropped_return_missed), "kretprobe missed"),
    ];
    let why: Vec<String> = parts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    crate::say::line(&format!(
        "lost {lost} events in the last second ({}; {} lost in total)",
        why.join(", "),
        now.dropped()
    ));
}
