//! What a hook's entry leaves for its exit: the entry time (and, where the exit cannot reach
//! them, the syscall's arguments) in a per-thread entry, or the kprobe backend's stash.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated};
use bindtrace_common::{attach_state, kernel_helpers, stat, KernelLayout, NO_MEMBER};

use crate::maps::{config, count, ATTACH_STATE, INET_BIND_ARGS, THREAD_ENTRIES};

/// A kprobe-backend bind() between entry and exit: the kretprobe sees only the return value,
/// so the entry stashes the arguments. Everything else is read at exit, after the result
/// filter.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct InetBindArgs {
    pub(crate) entered_ns: u64,
    /// The kernel's copy of the sockaddr.
    pub(crate) addr: u64,
    /// `struct socket *`.
    pub(crate) socket: u64,
    pub(crate) addrlen: u32,
    pub(crate) _pad: u32,
}

/// What a thread's entry into bind() or listen() leaves for its exit, in [`THREAD_ENTRIES`] under
/// its tid: the time (tracepoint and fentry/fexit backends, whose exits have the arguments
/// themselves) and, where the exit cannot reach them (kprobe; the tracepoint before 5.15, no
/// `bpf_task_pt_regs`), the arguments. The exit takes it out. Only the thread itself writes
/// and reads its entry, so it needs no ordering between CPUs; `tid` is checked after the copy
/// all the same, because an LRU map may reuse an evicted entry while it is read.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SyscallEntry {
    pub(crate) tid: u32,
    pub(crate) fd: i32,
    pub(crate) entered_ns: u64,
    pub(crate) addr: u64,
    pub(crate) addrlen: u32,
    /// 1 while this thread is inside `__sys_bind` under a hook on it: the inet_bind hooks of
    /// the same backend then stand aside, so that no bind is reported twice. Taken out with
    /// the entry when the syscall returns.
    pub(crate) in_syscall: u32,
}

/// A bind()'s arguments, as the syscall received them.
#[derive(Clone, Copy)]
pub(crate) struct SyscallArgs {
    pub(crate) fd: i32,
    pub(crate) addr: u64,
    pub(crate) addrlen: u32,
}

const NO_ARGS: SyscallArgs = SyscallArgs { fd: -1, addr: 0, addrlen: 0 };

#[inline(always)]
fn put_entry(args: SyscallArgs, in_syscall: u32) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let stamp = SyscallEntry {
        tid,
        fd: args.fd,
        // SAFETY: a helper without arguments.
        entered_ns: unsafe { bpf_ktime_get_ns() },
        addr: args.addr,
        addrlen: args.addrlen,
        in_syscall,
    };
    // An insert that fails (no memory) leaves no entry: the exit counts that call.
    let _ = THREAD_ENTRIES.insert(tid, stamp, 0);
}

/// The entry hooks of the tracepoint and fentry backends only stamp the time: the exit hook
/// reads the arguments itself, and filters there.
#[inline(always)]
pub(crate) fn stamp_entry() {
    put_entry(NO_ARGS, 0);
}

/// [`stamp_entry`] plus the syscall's arguments, for kernels whose exit hook cannot read them.
#[inline(always)]
pub(crate) fn stamp_entry_with_args(args: SyscallArgs) {
    put_entry(args, 0);
}

/// Entry of `__sys_bind` (fentry: `args` None, the fexit has them; kprobe: saved for the
/// kretprobe): the time, and the mark that makes the inet_bind hooks stand aside.
#[inline(always)]
pub(crate) fn stamp_syscall_entry(args: Option<SyscallArgs>) {
    // A thread cannot enter bind(2) while inside it: under kprobe, a mark still there means
    // the kretprobe of its last bind never ran (out of return instances) and no backstop
    // reported it (a compat caller's: see `hooks::bindtrace_sys_exit_bind_backstop`). Counted
    // now, when the thread binds again.
    if args.is_some() && marked_inside_syscall(bpf_get_current_pid_tgid() as u32) {
        count(stat::RETURN_MISSED);
    }
    put_entry(args.unwrap_or(NO_ARGS), 1);
}

/// Does this thread's entry carry the mark of a hooked `__sys_bind`?
#[inline(always)]
fn marked_inside_syscall(tid: u32) -> bool {
    // SAFETY: a value of the map, read at once.
    unsafe { THREAD_ENTRIES.get(tid) }.is_some_and(|entry| entry.tid == tid && entry.in_syscall != 0)
}

/// Is this thread inside a hooked `__sys_bind` (so an inet_bind hook must stand aside)? From
/// the number of the syscall under way where the kernel lets the probe read it (5.15): that
/// holds even when the entry hook was skipped (a preempted program on PREEMPT_RT: the bind
/// was reported twice) or a missed return left a stale mark. Else from the entry's mark.
#[inline(always)]
pub(crate) fn inside_syscall(tid: u32) -> bool {
    let layout = &config().layout;
    if layout.has_helper(kernel_helpers::TASK_PT_REGS)
        && layout.pt_regs_syscall_nr != NO_MEMBER
        && ATTACH_STATE.get(attach_state::SYSCALL_HOOKED).is_some_and(|hooked| *hooked != 0)
    {
        let nr = current_syscall_nr(layout);
        // Three comparisons, no loop for the verifier to walk.
        let [native, compat, socketcall] = layout.bind_syscall_nrs;
        return nr == native || nr == compat || nr == socketcall;
    }
    marked_inside_syscall(tid)
}

/// The number of the syscall the current task is in, from its saved user registers (see
/// [`syscall_args`]). Kernel threads (io_uring's workers, in-kernel binds) have zeroed
/// registers: syscall 0, never bind.
#[inline(always)]
fn current_syscall_nr(layout: &KernelLayout) -> u32 {
    // SAFETY: as in `syscall_args`: the current task's own registers, at a verifier-known
    // offset. The low 32 bits (little-endian) are the number (arm64's `syscallno` is an int).
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let regs = generated::bpf_task_pt_regs(task) as usize as *const u8;
        core::ptr::read_volatile(regs.add(layout.pt_regs_syscall_nr as usize).cast::<u32>())
    }
}

/// A thread's entry as its exit took it out. Plain, always-initialised fields rather than an
/// `Option` of a tuple: a `None` left the tuple's registers unwritten, and the compiler then
/// stored them anyway, which the verifier rejects ("R8 !read_ok").
#[derive(Clone, Copy)]
pub(crate) struct Taken {
    /// The entry was there (`false`: the call began before the probe attached, or its entry
    /// was lost; see [`missing_entry`]).
    pub(crate) found: bool,
    pub(crate) entered_ns: u64,
    pub(crate) args: SyscallArgs,
    /// It was a `__sys_bind` entry (see [`SyscallEntry::in_syscall`]), not a listen()'s.
    pub(crate) in_syscall: bool,
}

impl Taken {
    #[inline(always)]
    pub(crate) fn entered_ns(&self) -> Option<u64> {
        if self.found {
            Some(self.entered_ns)
        } else {
            None
        }
    }
}

/// Takes this thread's entry out of the map: the time it entered and the arguments it saved.
#[inline(always)]
pub(crate) fn take_entry(tid: u32) -> Taken {
    // SAFETY: a value of the map, copied out at once.
    let Some(entry) = (unsafe { THREAD_ENTRIES.get(tid) }).copied() else {
        return Taken { found: false, entered_ns: 0, args: NO_ARGS, in_syscall: false };
    };
    let _ = THREAD_ENTRIES.remove(tid);
    Taken {
        found: entry.tid == tid,
        entered_ns: entry.entered_ns,
        args: SyscallArgs { fd: entry.fd, addr: entry.addr, addrlen: entry.addrlen },
        in_syscall: entry.in_syscall != 0,
    }
}

/// Takes this thread's entry out of the map, if it is there: the time it entered.
#[inline(always)]
pub(crate) fn take_entry_time(tid: u32) -> Option<u64> {
    take_entry(tid).entered_ns()
}

/// How long after the tracer attached an exit without its entry counts as a call that was
/// under way at attach rather than a lost one.
const ATTACH_WINDOW_NS: u64 = 1_000_000_000;

/// An exit found no entry where only the entry knew the arguments: the call cannot be
/// reported. Counted as under way at attach when it returns within [`ATTACH_WINDOW_NS`] of
/// the attach (inherent to attaching mid-call), else as lost.
#[inline(always)]
pub(crate) fn missing_entry() {
    let attached_at = ATTACH_STATE.get(attach_state::ATTACHED_AT).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if attached_at == 0 || now < attached_at.saturating_add(ATTACH_WINDOW_NS) {
        count(stat::AT_ATTACH);
    } else {
        count(stat::ENTRY_LOST);
    }
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

/// The kprobe backend's inet_bind entry: the arguments, for the kretprobe.
#[inline(always)]
pub(crate) fn remember(tid: u32, args: InetBindArgs) {
    // A stash still there: the kretprobe of this thread's last inet_bind never ran.
    if INET_BIND_ARGS.get_ptr(tid).is_some() {
        count(stat::RETURN_MISSED);
    }
    // An insert that fails (no memory) leaves nothing: the kretprobe counts that call.
    let _ = INET_BIND_ARGS.insert(tid, args, 0);
}

/// The kprobe backend's inet_bind return: what the entry stashed, taken out of the map;
/// `entered_ns` 0 when nothing was (always initialised: see [`Taken`]).
#[inline(always)]
pub(crate) fn take_inet_bind_args(tid: u32) -> InetBindArgs {
    // SAFETY: a value of the map, copied out at once.
    let Some(stashed) = (unsafe { INET_BIND_ARGS.get(tid) }).copied() else {
        return InetBindArgs { entered_ns: 0, addr: 0, socket: 0, addrlen: 0, _pad: 0 };
    };
    let _ = INET_BIND_ARGS.remove(tid);
    stashed
}
