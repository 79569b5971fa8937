//! What a hook's entry leaves for its exit: the entry time (and, where the exit cannot reach
//! them, the syscall's arguments) in a per-thread slot, or the kprobe backend's stash.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated};
use bindtrace_common::{stat, KernelLayout};

use crate::maps::{count, ENTRY_SLOTS, ENTRY_TIMES, IN_FLIGHT};

/// A kprobe-backend bind() between entry and exit: the kretprobe sees only the return value,
/// so the entry stashes the arguments. Everything else is read at exit, after the result
/// filter.
#[repr(C)]
pub(crate) struct InFlight {
    pub(crate) entered_ns: u64,
    /// The kernel's copy of the sockaddr.
    pub(crate) addr: u64,
    /// `struct socket *`.
    pub(crate) socket: u64,
    pub(crate) addrlen: u32,
    pub(crate) _pad: u32,
}

/// When a thread entered bind(), in a slot picked by its tid (tracepoint and fentry/fexit
/// backends, whose return hooks have the arguments themselves). A plain array store at entry
/// and a load at exit: the hash-map insert and delete this replaced cost ~400 ns per bind
/// (kernel.bpf_stats_enabled=1, bind-storm). Two threads whose tids share a slot and bind at
/// the same moment lose the earlier one's duration, never its event; under fexit or kprobe
/// such a collision can also hide the `in_syscall` mark from an inet_bind hook, which then
/// reports a bind(2) that `__sys_bind` reports too (a duplicate, never a loss; see the notes).
///
/// On kernels before 5.15 (no `bpf_task_pt_regs`) the tracepoint's exit cannot read the
/// syscall's arguments, so its entry saves them here too; there a lost slot loses the event,
/// counted as `IN_FLIGHT_MISSING`.
#[repr(C)]
pub(crate) struct EntryStamp {
    pub(crate) tid: u32,
    pub(crate) fd: i32,
    pub(crate) entered_ns: u64,
    pub(crate) addr: u64,
    pub(crate) addrlen: u32,
    /// 1 while this thread is inside `__sys_bind` under a hook on it: the inet_bind hooks of
    /// the same backend then stand aside, so that no bind is reported twice.
    pub(crate) in_syscall: u32,
}

/// A bind()'s arguments, as the syscall received them.
#[derive(Clone, Copy)]
pub(crate) struct SyscallArgs {
    pub(crate) fd: i32,
    pub(crate) addr: u64,
    pub(crate) addrlen: u32,
}

/// The entry hooks of the tracepoint and fentry backends only stamp the time: the exit hook
/// reads the arguments itself, and filters there.
#[inline(always)]
pub(crate) fn stamp_entry() {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: an array slot; a racing thread of the same slot is detected by the tid.
        unsafe {
            (*slot).entered_ns = bpf_ktime_get_ns();
            (*slot).in_syscall = 0;
            (*slot).tid = tid;
        }
    }
}

/// [`stamp_entry`] plus the syscall's arguments, for kernels whose exit hook cannot read them.
#[inline(always)]
pub(crate) fn stamp_entry_with_args(args: SyscallArgs) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: as in stamp_entry; the tid is written last, after the fields it vouches for.
        unsafe {
            (*slot).entered_ns = bpf_ktime_get_ns();
            (*slot).fd = args.fd;
            (*slot).addr = args.addr;
            (*slot).addrlen = args.addrlen;
            (*slot).in_syscall = 0;
            (*slot).tid = tid;
        }
    }
}

/// Entry of `__sys_bind` (fentry: `args` None, the fexit has them; kprobe: saved for the
/// kretprobe): the time, and the mark that makes the inet_bind hooks stand aside.
#[inline(always)]
pub(crate) fn stamp_syscall_entry(args: Option<SyscallArgs>) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: as in stamp_entry; the tid is written last, after the fields it vouches for.
        unsafe {
            (*slot).entered_ns = bpf_ktime_get_ns();
            if let Some(args) = args {
                (*slot).fd = args.fd;
                (*slot).addr = args.addr;
                (*slot).addrlen = args.addrlen;
            }
            (*slot).in_syscall = 1;
            (*slot).tid = tid;
        }
    }
}

/// Is this thread inside a hooked `__sys_bind` (so an inet_bind hook must stand aside)?
#[inline(always)]
pub(crate) fn inside_syscall(tid: u32) -> bool {
    own_entry(tid).is_some_and(|slot| slot.in_syscall != 0)
}

/// The hooked `__sys_bind` returned.
#[inline(always)]
pub(crate) fn end_syscall(tid: u32) {
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: an array slot; only its own thread clears its mark.
        unsafe {
            if (*slot).tid == tid {
                (*slot).in_syscall = 0;
            }
        }
    }
}

/// This thread's entry slot, if the stamp in it is its own.
#[inline(always)]
pub(crate) fn own_entry(tid: u32) -> Option<&'static EntryStamp> {
    let slot = ENTRY_TIMES.get_ptr(tid & (ENTRY_SLOTS - 1))?;
    // SAFETY: an array slot, which lives as long as the map.
    let slot = unsafe { &*slot };
    (slot.tid == tid).then_some(slot)
}

/// The entry time and arguments this thread's entry saved, copied out of its slot. The tid is
/// checked again after the copy: a thread sharing the slot may have overwritten it meanwhile,
/// and a mixed copy would pair this bind with another's fd and address.
#[inline(always)]
pub(crate) fn saved_entry(tid: u32) -> Option<(Option<u64>, SyscallArgs)> {
    let slot = own_entry(tid)?;
    // SAFETY: fields of an array slot; volatile, so that the copy happens between the checks.
    let copy = unsafe {
        (
            core::ptr::read_volatile(&raw const slot.entered_ns),
            SyscallArgs {
                fd: core::ptr::read_volatile(&raw const slot.fd),
                addr: core::ptr::read_volatile(&raw const slot.addr),
                addrlen: core::ptr::read_volatile(&raw const slot.addrlen),
            },
        )
    };
    // SAFETY: as above.
    let still_ours = unsafe { core::ptr::read_volatile(&raw const slot.tid) } == tid;
    still_ours.then_some((Some(copy.0), copy.1))
}

/// When this thread entered the bind() now returning, if its stamp is still there.
#[inline(always)]
pub(crate) fn entry_time(tid: u32) -> Option<u64> {
    own_entry(tid).map(|slot| slot.entered_ns)
}

/// bind(fd, umyaddr, addrlen) from the syscall's saved user registers, which stay intact
/// until the syscall returns: the exit hook needs no copy of them from the entry. Only on
/// kernels with `bpf_task_pt_regs` (5.15, which also has `bpf_get_current_task_btf`).
#[inline(always)]
pub(crate) fn syscall_args(layout: &KernelLayout) -> SyscallArgs {
    // SAFETY: both helpers take and return the current task's own structures. `regs` is a
    // BTF-typed pointer and the offsets are verifier-known constants (read-only config), so
    // the verifier turns these plain loads into fault-safe ones, far cheaper than helper
    // calls.
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let regs = generated::bpf_task_pt_regs(task) as usize as *const u8;
        let [fd, addr, addrlen] =
            layout.syscall_args.map(|offset| core::ptr::read_volatile(regs.add(offset as usize).cast::<u64>()));
        SyscallArgs { fd: fd as i32, addr, addrlen: addrlen as u32 }
    }
}

#[inline(always)]
pub(crate) fn remember(tid: u32, in_flight: InFlight) {
    if IN_FLIGHT.insert(tid, in_flight, 0).is_err() {
        count(stat::IN_FLIGHT_FULL);
    }
}
