//! Counts what went by, for the report printed at exit: events by result, by port, the
//! busiest processes, and the probe's own counters (drops among them).

use crate::model::EnrichCounters;
use std::collections::HashMap;

use bindtrace_common::{BindEvent, COMM_LEN};
use serde::Serialize;

use crate::{
    decode::BindEventExt as _,
    errno,
    probe::{KernelCounters, ProgramStats},
};

/// How many ports and processes the report lists.
const TOP: usize = 10;

#[derive(Default)]
pub(crate) struct Summary {
    events: u64,
    decode_errors: u64,
    filter_mismatches: u64,
    outside_scope: u64,
    file_reopens: u64,
    by_result: HashMap<i32, u64>,
    by_port: HashMap<(u16, &'static str), u64>,
    by_process: HashMap<u32, ([u8; COMM_LEN], u64)>,
    /// The followed tree's processes that failed to bind (`-- CMD`, `--tree`).
    /// By pid: the order of its first failure, and the process.
    tree_failures: HashMap<u32, (usize, FailedProcess)>,
    /// Failed processes past the listed ones (their pids, bounded; then only counted).
    tree_unlisted_pids: std::collections::HashSet<u32>,
    tree_failures_unlisted: u64,
}

/// A process of the followed tree that failed to bind: where it sits, and its first failure.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct FailedProcess {
    pub pid: u32,
    pub comm: String,
    /// The process that started it, and its depth below the tree's root (0: the root).
    pub ppid: u32,
    pub depth: u16,
    pub failures: u64,
    /// The first failure: its errno's name and the address asked for.
    pub first_errno: String,
    pub first_address: String,
}

/// The followed process tree at the end of the run (`-- CMD`, `--tree PID`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct TreeReport {
    pub root_pid: u32,
    /// CMD as given (`-- CMD`); absent for `--tree`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// CMD's exit status (128+N for signal N), as bindtrace exits with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u8>,
    /// How the root ended, in words ("exited with status 3", "was killed by SIGTERM"); absent
    /// when the trace ended first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Processes of the tree still running when the trace ended (daemons it left).
    pub still_running: Vec<u32>,
    /// Processes of the tree that failed to bind, in the order of their first failure.
    pub failed_processes: Vec<FailedProcess>,
    /// Failed processes past the first [`TREE_FAILURES_LISTED`], counted only.
    pub failed_processes_unlisted: u64,
}

/// How many failed processes of the tree the report names.
pub(crate) const TREE_FAILURES_LISTED: usize = 64;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ResultCount {
    pub result: String,
    pub errno: i32,
    pub count: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct PortCount {
    pub port: u16,
    pub proto: &'static str,
    pub count: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ProcessCount {
    pub pid: u32,
    pub comm: String,
    pub count: u64,
}

/// The finished report, in the shape both sinks print.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub backend: &'static str,
    pub start: String,
    pub end: String,
    pub duration_s: f64,
    pub events: u64,
    pub by_result: Vec<ResultCount>,
    pub by_port: Vec<PortCount>,
    pub top_processes: Vec<ProcessCount>,
    /// Events lost before reaching bindtrace: `KernelCounters::dropped`.
    pub dropped: u64,
    /// Ring-buffer records that could not be decoded.
    pub decode_errors: u64,
    /// Events the kernel's filters passed and the same predicates in user space rejected:
    /// a probe/tracer mismatch, expected 0 (the events are not printed).
    pub filter_mismatches: u64,
    /// Binds outside `--container`/`--cgroup` that the kernel passed while a followed cgroup
    /// was gone (a restart: its parent was selected meanwhile, so that the new cgroup's first
    /// binds are not missed), dropped here by their cgroup's path (not printed).
    pub outside_scope: u64,
    /// Times `--file` was reopened on SIGHUP (log rotation).
    pub file_reopens: u64,
    /// Output lines dropped because the output (a blocked stdout) did not take them in time.
    pub output_dropped_lines: u64,
    pub kernel: KernelCounters,
    /// What the enrich stage did: lookups, diagnoses that followed their event, diagnoses
    /// shed under overload (the events were still written).
    pub diagnoses: EnrichCounters,
    /// What each attached program cost, from the kernel's own counters.
    pub programs: Vec<ProgramStats>,
    /// The followed process tree (`-- CMD`, `--tree PID`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeReport>,
}

/// Processes counted at most, and how many of the busiest stay when that is reached.
const PROCESSES_MAX: usize = 4_096;
const PROCESSES_KEPT: usize = 256;
/// The same for ports: a host that binds new ports all day (ephemeral ports, a churn of pods)
/// would otherwise grow the counts with every port ever bound (the soak bench saw it).
const PORTS_MAX: usize = 4_096;
const PORTS_KEPT: usize = 256;

/// Text label of a result: "ok", "EADDRINUSE", or "errno 300" for unnamed numbers.
pub(crate) fn result_label(ret: i32) -> String {
    if ret >= 0 {
        return "ok".to_owned();
    }
    let errno = ret.saturating_neg();
    errno::name(errno).map_or_else(|| format!("errno {errno}"), str::to_owned)
}

/// Keeps the `kept` largest counts of `map` (ties at the cut go too).
fn forget_small<K, V>(map: &mut HashMap<K, V>, count: impl Fn(&V) -> u64, kept: usize) {
    let mut counts: Vec<u64> = map.values().map(&count).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let keep_from = counts.get(kept).copied().unwrap_or(0);
    map.retain(|_, value| count(value) > keep_from);
}

impl Summary {
    pub(crate) fn record(&mut self, event: &BindEvent) {
        self.events += 1;
        *self.by_result.entry(event.ret.min(0)).or_default() += 1;
        // Ports are inet's: an AF_UNIX path is not counted as one.
        if event.requested_ip().is_some() {
            let proto = event.proto_name().unwrap_or("?");
            let key = (event.port, proto);
            if self.by_port.len() >= PORTS_MAX && !self.by_port.contains_key(&key) {
                forget_small(&mut self.by_port, |count| *count, PORTS_KEPT);
            }
            *self.by_port.entry(key).or_default() += 1;
        }
        if self.by_process.len() >= PROCESSES_MAX && !self.by_process.contains_key(&event.tgid) {
            self.forget_small_processes();
        }
        self.by_process.entry(event.tgid).or_insert((event.comm, 0)).1 += 1;
    }

    /// Keeps the busiest processes: a daemon traces for weeks and pids keep changing, so the
    /// per-process counts must not grow with every process ever seen. The top list is then
    /// of the busiest since the last pruning.
    fn forget_small_processes(&mut self) {
        forget_small(&mut self.by_process, |(_, count)| *count, PROCESSES_KEPT);
    }

    /// A failed bind of the followed tree (the event has `IN_TREE`): its process is named in
    /// the report.
    pub(crate) fn record_tree_failure(&mut self, bind: &crate::decode::Bind) {
        if bind.ret >= 0 || !bind.has(bindtrace_common::sock_flags::IN_TREE) {
            return;
        }
        if let Some((_, known)) = self.tree_failures.get_mut(&bind.tgid) {
            known.failures += 1;
            return;
        }
        if self.tree_failures.len() >= TREE_FAILURES_LISTED {
            // Counted once per process: a set up to a bound, past it every new failure.
            if self.tree_unlisted_pids.len() < PROCESSES_MAX {
                self.tree_unlisted_pids.insert(bind.tgid);
            } else if !self.tree_unlisted_pids.contains(&bind.tgid) {
                self.tree_failures_unlisted += 1;
            }
            return;
        }
        let end = bind.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        let order = self.tree_failures.len();
        self.tree_failures.insert(
            bind.tgid,
            (
                order,
                FailedProcess {
                    pid: bind.tgid,
                    comm: crate::text::from_bytes(&bind.comm[..end]),
                    ppid: bind.tree_parent,
                    depth: bind.tree_depth,
                    failures: 1,
                    first_errno: result_label(bind.ret),
                    first_address: bind.endpoint(),
                },
            ),
        );
    }

    /// The tree's part of the report: its failed processes, first failure first.
    pub(crate) fn tree_report(&self) -> TreeReport {
        let mut failed: Vec<&(usize, FailedProcess)> = self.tree_failures.values().collect();
        failed.sort_by_key(|(order, _)| *order);
        let failed = failed.into_iter().map(|(_, process)| process.clone()).collect();
        TreeReport {
            failed_processes: failed,
            failed_processes_unlisted: self.tree_failures_unlisted,
            ..Default::default()
        }
    }

    pub(crate) fn record_reopen(&mut self) {
        self.file_reopens += 1;
    }

    pub(crate) fn record_decode_error(&mut self) {
        self.decode_errors += 1;
    }

    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    pub(crate) fn record_filter_mismatch(&mut self) {
        self.filter_mismatches += 1;
    }

    pub(crate) fn record_outside_scope(&mut self) {
        self.outside_scope += 1;
    }

    pub(crate) fn filter_mismatches(&self) -> u64 {
        self.filter_mismatches
    }

    pub(crate) fn decode_errors(&self) -> u64 {
        self.decode_errors
    }

    pub(crate) fn report(
        &self,
        backend: &'static str,
        start: String,
        end: String,
        duration_s: f64,
        kernel: KernelCounters,
    ) -> Report {
        let mut by_result: Vec<ResultCount> = self
            .by_result
            .iter()
            .map(|(&ret, &count)| ResultCount { result: result_label(ret), errno: ret.saturating_neg(), count })
            .collect();
        by_result.sort_by(|a, b| b.count.cmp(&a.count).then(a.errno.cmp(&b.errno)));

        let mut by_port: Vec<PortCount> =
            self.by_port.iter().map(|(&(port, proto), &count)| PortCount { port, proto, count }).collect();
        by_port.sort_by(|a, b| b.count.cmp(&a.count).then(a.port.cmp(&b.port)));
        by_port.truncate(TOP);

        let mut top_processes: Vec<ProcessCount> = self
            .by_process
            .iter()
            .map(|(&pid, (comm, count))| {
                let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
                ProcessCount { pid, comm: crate::text::from_bytes(&comm[..end]), count: *count }
            })
            .collect();
        top_processes.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
        top_processes.truncate(TOP);

        Report {
            backend,
            start,
            end,
            duration_s,
            events: self.events,
            by_result,
            by_port,
            top_processes,
            dropped: kernel.dropped(),
            decode_errors: self.decode_errors,
            filter_mismatches: self.filter_mismatches,
            outside_scope: self.outside_scope,
            file_reopens: self.file_reopens,
            output_dropped_lines: crate::sink::writer::lines_dropped(),
            kernel,
            diagnoses: EnrichCounters::default(),
            programs: Vec::new(),
            tree: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_process_counts_stay_bounded_over_many_pids() {
        let mut summary = Summary::default();
        let mut event = crate::decode::tests::sample_event();
        for pid in 0..100_000u32 {
            event.tgid = pid;
            summary.record(&event);
            if pid % 7 == 0 {
                summary.record(&event);
            }
        }
        assert!(summary.by_process.len() <= PROCESSES_MAX);
        assert_eq!(summary.events(), 100_000 + 100_000u64.div_ceil(7));
    }

    /// A host that binds new ports all day: the per-port counts stay bounded, the busiest kept.
    #[test]
    fn per_port_counts_stay_bounded_over_every_port() {
        let mut summary = Summary::default();
        let mut event = crate::decode::tests::sample_event();
        event.port = 80;
        for _ in 0..1_000 {
            summary.record(&event);
        }
        for port in 1_000..=u16::MAX {
            event.port = port;
            summary.record(&event);
        }
        assert!(summary.by_port.len() <= PORTS_MAX, "{}", summary.by_port.len());
        assert_eq!(summary.by_port.get(&(80, "tcp")), Some(&1_000), "the busiest port stays");
    }
    use crate::decode::tests::sample_event;

    #[test]
    fn counts_by_result_port_and_process() {
        let mut summary = Summary::default();
        let failed = sample_event();
        let mut ok = failed;
        ok.ret = 0;
        ok.port = 9000;
        let mut other = failed;
        other.tgid = 7;
        for event in [failed, failed, ok, other] {
            summary.record(&event);
        }
        summary.record_decode_error();
        let kernel = KernelCounters { dropped_ring_buffer_full: 2, dropped_entry_lost: 1, ..Default::default() };
        let report = summary.report("tracepoint", "a".into(), "b".into(), 1.0, kernel);
        assert_eq!(report.events, 4);
        assert_eq!(report.dropped, 3);
        assert_eq!(report.decode_errors, 1);
        assert_eq!(
            report.by_result,
            vec![
                ResultCount { result: "EADDRINUSE".into(), errno: 98, count: 3 },
                ResultCount { result: "ok".into(), errno: 0, count: 1 },
            ]
        );
        assert_eq!(report.by_port[0], PortCount { port: 8080, proto: "tcp", count: 3 });
        assert_eq!(report.top_processes[0], ProcessCount { pid: 4242, comm: "python3".into(), count: 3 });
        assert_eq!(report.top_processes[1].pid, 7);
    }

    #[test]
    fn labels() {
        assert_eq!(result_label(0), "ok");
        assert_eq!(result_label(-13), "EACCES");
        assert_eq!(result_label(-300), "errno 300");
    }
}
