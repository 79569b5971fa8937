//! The guests the matrix boots: Debian kernel series × architectures, and what each lacks.

use crate::dist::{Arch, AARCH64, X86_64};

/// One guest of the matrix: a Debian cloud kernel series on one architecture, and the
/// backends that kernel is known not to offer, with the reason. The guest still tries those
/// backends: each must be refused with a one-line error, and `--check` must say no.
pub(super) struct GuestKernel {
    pub(super) arch: Arch,
    pub(super) series: &'static str,
    pub(super) lacks: &'static [(&'static str, &'static str)],
    /// The kernel's page size in KiB: a ring buffer smaller than a page must be refused.
    pub(super) page_kib: u32,
    /// PREEMPT_RT: BPF programs are preemptible, and the fexit and kprobe backends lose binds
    /// under load (each counted as dropped). There their per-thread checks ask "reported or
    /// counted", not "reported", and `--attach auto` takes the tracepoints first.
    pub(super) preempt_rt: bool,
    /// About how long the guest takes (its share of the matrix the CI run of 177ab14 timed,
    /// one guest at a time): the longest start first.
    pub(super) typical_secs: u32,
}

/// The series whose guests also measure the emulated costs with `--costs` (one per
/// architecture).
pub(super) const NEWEST_SERIES: &str = "6.12";

/// The kernels × architectures the matrix boots: README's requirements table is this one.
pub(super) const MATRIX: [GuestKernel; 7] = [
    GuestKernel { arch: X86_64, series: "5.10", lacks: &[], page_kib: 4, preempt_rt: false, typical_secs: 120 },
    GuestKernel { arch: X86_64, series: "6.1", lacks: &[], page_kib: 4, preempt_rt: false, typical_secs: 129 },
    // PREEMPT_RT: programs are preemptible there, where per-CPU counters and recursion
    // guards break.
    GuestKernel { arch: X86_64, series: "6.1-rt", lacks: &[], page_kib: 4, preempt_rt: true, typical_secs: 213 },
    GuestKernel { arch: X86_64, series: "6.12", lacks: &[], page_kib: 4, preempt_rt: false, typical_secs: 86 },
    GuestKernel {
        arch: AARCH64,
        series: "6.1",
        lacks: &[("fexit", "Debian's arm64 6.1 has no BPF trampolines (attaching fails with ENOTSUPP, 524)")],
        page_kib: 4,
        preempt_rt: false,
        typical_secs: 373,
    },
    GuestKernel { arch: AARCH64, series: "6.12", lacks: &[], page_kib: 4, preempt_rt: false, typical_secs: 228 },
    // 16K pages: the ring buffer's size is checked against the page size.
    GuestKernel { arch: AARCH64, series: "6.12-16k", lacks: &[], page_kib: 16, preempt_rt: false, typical_secs: 184 },
];

/// Every bindtrace backend, each forced with --attach in the guest.
pub(super) const BACKENDS: [&str; 3] = ["fexit", "kprobe", "tracepoint"];
