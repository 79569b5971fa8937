//! The probe's maps and its read-only configuration: the only state shared between hooks,
//! and with the tracer (names in `bindtrace_common::names`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use bindtrace_common::{attach_state, stat, CgroupSlot, ProbeConfig, TreePlace, MAX_CGROUPS};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use crate::entry::{InetBindArgs, SyscallEntry};

/// Written by the tracer before load (aya rewrites .rodata); read only through [`config`].
#[unsafe(no_mangle)]
pub(crate) static BINDTRACE_CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// Default size; the tracer may resize it before load.
#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Threads between a hook's entry and its exit, keyed by thread id: one entry per thread,
/// so two threads never share one (an array slot per `tid % N` lost or duplicated binds when
/// two threads of the same slot bound at once). LRU: an entry whose exit never ran (a
/// kretprobe out of instances) is evicted in time instead of filling the map; a live one is
/// evicted only with more than `THREADS_MAX` binds under way at once, and its exit then counts
/// it lost. Task-local storage would be cheaper on 5.11+, but its maps need BTF definitions
/// that aya-ebpf 0.2 cannot emit.
#[map(name = "THREAD_ENTRIES")]
pub(crate) static THREAD_ENTRIES: LruHashMap<u32, SyscallEntry> = LruHashMap::with_max_entries(THREADS_MAX, 0);

pub(crate) const THREADS_MAX: u32 = 1 << 14;

/// The kprobe backend's inet_bind calls between entry and return (arguments the kretprobe
/// cannot see), keyed by thread id; LRU for the same reasons as [`THREAD_ENTRIES`].
#[map(name = "INET_BIND_ARGS")]
pub(crate) static INET_BIND_ARGS: LruHashMap<u32, InetBindArgs> = LruHashMap::with_max_entries(THREADS_MAX, 0);

/// What the tracer says once attached (`bindtrace_common::attach_state`): when attaching
/// ended (an exit without its entry this soon after is a bind that was under way at attach,
/// not a loss), and whether `__sys_bind` is hooked.
#[map(name = "ATTACH_STATE")]
pub(crate) static ATTACH_STATE: Array<u64> = Array::with_max_entries(attach_state::COUNT, 0);

/// Per-CPU counters, indexed by `bindtrace_common::stat`.
#[map(name = "STATS")]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// When the probe last woke the reader (ns, CLOCK_MONOTONIC).
#[map(name = "LAST_WAKEUP")]
pub(crate) static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

/// The cgroups `--container` and `--cgroup` select, and at which depth: a map, not the
/// read-only config, because the tracer follows a container or unit across restarts, each
/// of which makes a new cgroup (see `bindtrace_common::CgroupSlot`).
#[map(name = "SELECTED_CGROUPS")]
pub(crate) static SELECTED_CGROUPS: Array<CgroupSlot> = Array::with_max_entries(MAX_CGROUPS as u32, 0);

/// tgids accepted by `--pid` (value unused).
#[map(name = "FILTER_PIDS")]
pub(crate) static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// The followed process tree (`bindtrace -- CMD`, `--tree PID`): tgids, and the tids of
/// threads the tree made, with their place in it (see `tree`). A hash map, not an LRU: a
/// followed process is never evicted silently; a full map is counted (`stat::TREE_FULL`).
/// The tracer shrinks it to one entry when it does not follow a tree.
#[map(name = "FOLLOWED")]
pub(crate) static FOLLOWED: HashMap<u32, TreePlace> = HashMap::with_max_entries(FOLLOWED_MAX, 0);

pub(crate) const FOLLOWED_MAX: u32 = 1 << 16;

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
        // SAFETY: a per-CPU slot, valid and aligned for the map's life. Atomic, because one
        // CPU's slot is not one program's: fentry/fexit programs run with migration disabled
        // but preemptible (PREEMPT_RT, preemptible kernels), so another program can add to
        // the same slot in between a load and a store. An add whose result is unused is
        // BPF's oldest atomic (XADD), on every kernel. The intrinsic, because the BPF target
        // has no `AtomicU64::fetch_add` (it lacks compare-and-swap before v3).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
    }
}
