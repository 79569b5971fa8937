//! What the probe counted (its per-CPU counters, summed) and what the kernel counts for each
//! of its programs (runs, time, recursion misses, from fdinfo).

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Result;
use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use bindtrace_common::stat;
use serde::Serialize;

/// The probe's per-CPU counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct KernelCounters {
    /// bind() exits the probe saw.
    pub seen: u64,
    /// Rejected by the in-kernel filters.
    pub filtered: u64,
    /// Written to the ring buffer.
    pub emitted: u64,
    /// Lost: the ring buffer was full.
    pub dropped_ring_buffer_full: u64,
    /// Lost: the exit found no entry where only the entry knew the arguments (kprobe; the
    /// tracepoint before 5.15), more than a second after attach.
    pub dropped_entry_lost: u64,
    /// Exits without their entry within a second of attach: binds already under way when
    /// the probe attached, not emitted (their arguments unknown), and not counted as lost.
    pub in_progress_at_attach: u64,
    /// Emitted without an address: the caller's sockaddr could not be read.
    pub address_unreadable: u64,
    /// Emitted without a duration: the probe did not see the bind's entry.
    pub no_entry_time: u64,
    /// Lost: a return hook the kernel skipped because another BPF program was running on
    /// that CPU (the programs' `recursion_misses`, 5.12+; fentry/fexit and, on newer
    /// kernels, kprobes). An entry hook skipped this way shows at its exit instead.
    pub dropped_recursion: u64,
    /// Lost: binds whose kretprobe never ran (out of return instances) and no backstop
    /// reported (inet_bind's, 32-bit callers'), found when the same thread next bound (kprobe
    /// backend).
    pub dropped_return_missed: u64,
    /// Not lost: bind(2) and listen(2) calls whose kretprobe never ran, reported from the
    /// syscall's exit tracepoint instead (kprobe backend).
    pub returns_backstopped: u64,
    /// Processes (and threads) of the followed tree the kernel could not add to its map (it
    /// was full): their binds were not traced.
    pub tree_not_followed: u64,
}

impl KernelCounters {
    /// Builds the counters from per-index sums, in `bindtrace_common::stat` order.
    pub(crate) fn from_sums(sums: &[u64; stat::COUNT as usize]) -> Self {
        Self {
            seen: sums[stat::SEEN as usize],
            filtered: sums[stat::FILTERED as usize],
            emitted: sums[stat::EMITTED as usize],
            dropped_ring_buffer_full: sums[stat::RINGBUF_FULL as usize],
            dropped_entry_lost: sums[stat::ENTRY_LOST as usize],
            in_progress_at_attach: sums[stat::AT_ATTACH as usize],
            address_unreadable: sums[stat::ADDR_READ_FAILED as usize],
            no_entry_time: sums[stat::NO_ENTRY_TIME as usize],
            dropped_recursion: 0,
            dropped_return_missed: sums[stat::RETURN_MISSED as usize],
            returns_backstopped: sums[stat::RETURN_BACKSTOPPED as usize],
            tree_not_followed: sums[stat::TREE_FULL as usize],
        }
    }

    /// Events the kernel saw but bindtrace will never print.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped_ring_buffer_full + self.dropped_entry_lost + self.dropped_recursion + self.dropped_return_missed
    }
}

/// One attached program, from `/proc/self/fdinfo` of its fd: what the kernel counts for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ProgramStats {
    pub name: String,
    /// Runs and their total time: counted only while `kernel.bpf_stats_enabled` is 1 (0
    /// otherwise).
    pub runs: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because another BPF program was running on that CPU (5.12+).
    pub recursion_misses: u64,
}

/// A hook on a return (exit tracepoint, kretprobe, fexit): one the kernel skips loses its
/// event. A skipped entry hook shows at its exit instead (no entry), so it is not added; nor
/// is a skipped backstop, which only loses what its kretprobe already reported.
pub(super) fn is_return_hook(name: &str) -> bool {
    (name.contains("exit") || name.contains("kretprobe")) && !name.contains("backstop")
}

/// The fields of a BPF program's fdinfo that bindtrace reports; absent ones (older kernels,
/// stats off) are 0.
fn parse_program_fdinfo(name: &str, info: &str) -> ProgramStats {
    let field = |key: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    ProgramStats {
        name: name.to_owned(),
        runs: field("run_cnt"),
        run_time_ns: field("run_time_ns"),
        recursion_misses: field("recursion_misses"),
    }
}

/// The probe's counters, summed over the CPUs, in `bindtrace_common::stat` order.
pub(super) fn stat_sums<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<[u64; stat::COUNT as usize]> {
    let mut sums = [0u64; stat::COUNT as usize];
    for (index, sum) in (0..stat::COUNT).zip(sums.iter_mut()) {
        *sum = stats.get(&index, 0)?.iter().sum();
    }
    Ok(sums)
}

/// What the kernel counts for each loaded program (runs, run time, recursion misses).
pub(super) fn program_stats(ebpf: &Ebpf) -> Vec<ProgramStats> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let fd = program.fd().ok()?.as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            Some(parse_program_fdinfo(name, &info))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bindtrace_common::names;

    use super::*;

    #[test]
    fn program_fdinfo_gives_runs_time_and_recursion_misses() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tab\nmemlock:\t4096\n\
                    prog_id:\t91\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t3\nverified_insns:\t2530\n";
        let stats = parse_program_fdinfo("bindtrace_fexit_inet_bind", info);
        assert_eq!((stats.runs, stats.run_time_ns, stats.recursion_misses), (789, 123456, 3));
        // A 5.10 kernel has no recursion_misses line: 0, not an error.
        assert_eq!(parse_program_fdinfo("x", "run_time_ns:\t5\nrun_cnt:\t1\n").recursion_misses, 0);
        assert!(is_return_hook("bindtrace_sys_exit_bind") && is_return_hook("bindtrace_kretprobe_sys_bind"));
        assert!(is_return_hook("bindtrace_fexit_inet_bind") && !is_return_hook("bindtrace_fentry_inet_bind"));
        assert!(!is_return_hook("bindtrace_sys_enter_bind") && !is_return_hook("bindtrace_kprobe_sys_bind"));
        assert!(!is_return_hook(names::PROG_BACKSTOP_BIND) && !is_return_hook(names::PROG_BACKSTOP_LISTEN));
    }
}
