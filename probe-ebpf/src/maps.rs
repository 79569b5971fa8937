//! The probe's maps and its read-only configuration: the only state shared between hooks,
//! and with the tracer (names in `bindtrace_common::names`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use bindtrace_common::{stat, ProbeConfig};

use crate::entry::{EntryStamp, InFlight};

/// Written by the tracer before load (aya rewrites .rodata); read only through [`config`].
#[unsafe(no_mangle)]
pub(crate) static BINDTRACE_CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// Default size; the tracer may resize it before load.
#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// kprobe-backend binds between entry and exit, keyed by thread id.
#[map(name = "IN_FLIGHT")]
pub(crate) static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);

pub(crate) const ENTRY_SLOTS: u32 = 1 << 14;

#[map(name = "ENTRY_TIMES")]
pub(crate) static ENTRY_TIMES: Array<EntryStamp> = Array::with_max_entries(ENTRY_SLOTS, 0);

/// Per-CPU counters, indexed by `bindtrace_common::stat`.
#[map(name = "STATS")]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// When the probe last woke the reader (ns, CLOCK_MONOTONIC).
#[map(name = "LAST_WAKEUP")]
pub(crate) static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// tgids accepted by `--pid` (value unused).
#[map(name = "FILTER_PIDS")]
pub(crate) static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// The configuration, read through an opaque pointer: `BINDTRACE_CONFIG` is an immutable
/// static, so without this the compiler would fold its (all-zero) initial value into the code.
#[inline(always)]
pub(crate) fn config() -> &'static ProbeConfig {
    let ptr = core::hint::black_box(&raw const BINDTRACE_CONFIG);
    // SAFETY: points to a static that lives for the whole program.
    unsafe { &*ptr }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; a program runs to completion on one CPU without preemption
        // by another instance of itself on that CPU.
        unsafe { *counter += 1 };
    }
}
