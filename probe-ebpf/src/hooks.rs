//! The programs the tracer attaches, one backend each: the syscall tracepoints; kprobes on
//! `__sys_bind` and on inet_bind/inet6_bind (with backstops on the syscalls' exit
//! tracepoints for the returns a kretprobe misses); fentry/fexit on the same functions. Each
//! turns what its hook sees into a `Returned` for `emit::complete`.
//!
//! With `__sys_bind` hooked, every bind(2) is seen there (any family, any outcome: LSM and
//! cgroup denials, EBADF, ENOTSOCK, EFAULT); the inet_bind hooks of the same backend then
//! stand aside inside it (`entry::inside_syscall`) and report only the binds that do not
//! come through bind(2), so no bind is reported twice.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use bindtrace_common::{kernel_helpers, op, stat, Backend};

use crate::{
    emit::{complete, returned_call, task_passes, Returned, SocketRef, TaskName},
    entry::{
        inside_syscall, missing_entry, remember, stamp_entry, stamp_entry_with_args, stamp_syscall_entry, syscall_args,
        take_entry, take_entry_time, take_inet_bind_args, InetBindArgs, SyscallArgs,
    },
    maps::{config, count},
};

// Offset of `ret` in the syscalls:sys_exit_bind record (after the 8-byte common header and the
// 8-byte syscall number); see /sys/kernel/tracing/events/syscalls/sys_exit_bind/format.
pub(crate) const EXIT_RET: usize = 16;
// The arguments in the syscalls:sys_enter_bind record, each a 64-bit slot (same file).
pub(crate) const ENTER_FD: usize = 16;
pub(crate) const ENTER_ADDR: usize = 24;
pub(crate) const ENTER_ADDRLEN: usize = 32;

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub(crate) fn bindtrace_sys_enter_bind(ctx: TracePointContext) -> u32 {
    if config().layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        stamp_entry();
    } else {
        // Before 5.15 the exit cannot reach the arguments: keep them (see SyscallEntry).
        stamp_entry_with_args(SyscallArgs {
            fd: record_word(&ctx, ENTER_FD) as i32,
            addr: record_word(&ctx, ENTER_ADDR),
            addrlen: record_word(&ctx, ENTER_ADDRLEN) as u32,
        });
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub(crate) fn bindtrace_sys_exit_bind(ctx: TracePointContext) -> u32 {
    on_exit(&ctx);
    0
}

/// A 64-bit field of the tracepoint record, loaded directly: the verifier allows plain loads
/// from a tracepoint's context, which cost far less than a probe-read helper call.
#[inline(always)]
pub(crate) fn record_word(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is a field of the syscalls:sys_{enter,exit}_bind record (syscall ABI).
    unsafe { ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>().read() }
}

/// Entry of `inet_bind(struct socket *, struct sockaddr *, int)` and `inet6_bind` for the
/// kprobe backend: the arguments, stashed for the kretprobe.
#[inline(always)]
pub(crate) fn on_kprobe_entry(socket: u64, addr: u64, addrlen: u64) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if inside_syscall(pid_tgid as u32) {
        return;
    }
    if !task_passes(cfg, (pid_tgid >> 32) as u32, &mut TaskName::unread()) {
        return;
    }
    // SAFETY: a helper without arguments.
    let entered_ns = unsafe { bpf_ktime_get_ns() };
    remember(pid_tgid as u32, InetBindArgs { entered_ns, addr, socket, addrlen: addrlen as u32, _pad: 0 });
}

#[kprobe]
pub(crate) fn bindtrace_kprobe_inet_bind(ctx: ProbeContext) -> u32 {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    on_kprobe_entry(arg(0), arg(1), arg(2));
    0
}

#[kretprobe]
pub(crate) fn bindtrace_kretprobe_inet_bind(ctx: RetProbeContext) -> u32 {
    on_kretprobe(&ctx);
    0
}

/// `__sys_bind(int fd, struct sockaddr __user *umyaddr, int addrlen)`: the arguments,
/// saved for the kretprobe.
#[kprobe]
pub(crate) fn bindtrace_kprobe_sys_bind(ctx: ProbeContext) -> u32 {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    stamp_syscall_entry(Some(SyscallArgs { fd: arg(0) as i32, addr: arg(1), addrlen: arg(2) as u32 }));
    0
}

#[kretprobe]
pub(crate) fn bindtrace_kretprobe_sys_bind(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i64 as i32;
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    if !saved.found {
        missing_entry();
        return 0;
    }
    let returned = syscall_bind(saved.entered_ns(), saved.args, ret, Backend::Kprobe);
    complete(&ctx, caller, returned);
    0
}

/// The kprobe backend's backstop for bind(2), on its exit tracepoint. A kretprobe has a fixed
/// number of return instances (aya cannot raise it): with many binds sleeping at once they run
/// out and the kernel skips the kretprobe. The entry is then still here when the syscall
/// returns, and the bind is reported from here; when the kretprobe ran, it took the entry out
/// and this is one map lookup. 32-bit callers (compat syscalls, socketcall) pass no syscall
/// tracepoint: a skipped return of theirs is counted at the thread's next bind instead.
#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub(crate) fn bindtrace_sys_exit_bind_backstop(ctx: TracePointContext) -> u32 {
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    // Nothing there: the kretprobe reported it (or its kprobe was skipped: nothing to report).
    if !saved.found || !saved.in_syscall {
        return 0;
    }
    count(stat::RETURN_BACKSTOPPED);
    let ret = record_word(&ctx, EXIT_RET) as i64 as i32;
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    complete(&ctx, caller, syscall_bind(saved.entered_ns(), saved.args, ret, Backend::Kprobe));
    0
}

#[fentry(function = "__sys_bind")]
pub(crate) fn bindtrace_fentry_sys_bind(_ctx: FEntryContext) -> u32 {
    stamp_syscall_entry(None);
    0
}

/// fexit of `__sys_bind`: the arguments and the result together; the socket is found from
/// the fd, as the tracepoint backend does.
#[fexit(function = "__sys_bind")]
pub(crate) fn bindtrace_fexit_sys_bind(ctx: FExitContext) -> u32 {
    let entered_ns = take_entry_time(bpf_get_current_pid_tgid() as u32);
    let ret: i64 = ctx.arg(3);
    let Some(caller) = returned_call(ret as i32) else {
        return 0;
    };
    let args = SyscallArgs { fd: ctx.arg::<u64>(0) as i32, addr: ctx.arg(1), addrlen: ctx.arg::<u64>(2) as u32 };
    complete(&ctx, caller, syscall_bind(entered_ns, args, ret as i32, Backend::Fexit));
    0
}

/// fentry of inet_bind/inet6_bind: the entry time, unless the bind came through a hooked
/// `__sys_bind` (whose stamp it must not overwrite).
#[inline(always)]
fn on_inet_fentry() {
    if !inside_syscall(bpf_get_current_pid_tgid() as u32) {
        stamp_entry();
    }
}

#[fentry(function = "inet_bind")]
pub(crate) fn bindtrace_fentry_inet_bind(_ctx: FEntryContext) -> u32 {
    on_inet_fentry();
    0
}

#[fentry(function = "inet6_bind")]
pub(crate) fn bindtrace_fentry_inet6_bind(_ctx: FEntryContext) -> u32 {
    on_inet_fentry();
    0
}

#[fexit(function = "inet_bind")]
pub(crate) fn bindtrace_fexit_inet_bind(ctx: FExitContext) -> u32 {
    on_fexit(&ctx);
    0
}

#[fexit(function = "inet6_bind")]
pub(crate) fn bindtrace_fexit_inet6_bind(ctx: FExitContext) -> u32 {
    on_fexit(&ctx);
    0
}

/// fexit sees the arguments and the return value together; the entry time comes from the
/// fentry program.
#[inline(always)]
pub(crate) fn on_fexit(ctx: &FExitContext) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if inside_syscall(tid) {
        return;
    }
    let entered_ns = take_entry_time(tid);
    let ret: i64 = ctx.arg(3);
    let Some(caller) = returned_call(ret as i32) else {
        return;
    };
    let returned = Returned {
        entered_ns,
        addr: ctx.arg::<u64>(1) as *const u8,
        addr_in_kernel: true,
        socket: SocketRef::Socket(ctx.arg::<u64>(0) as *const u8),
        fd: -1,
        addrlen: ctx.arg::<u64>(2) as u32,
        ret: ret as i32,
        backend: Backend::Fexit,
        op: op::BIND,
    };
    complete(ctx, caller, returned);
}

/// Return of inet_bind/inet6_bind under the kprobe backend: the arguments come from the
/// entry's stash.
#[inline(always)]
pub(crate) fn on_kretprobe(ctx: &RetProbeContext) {
    let ret = ctx.ret::<u64>() as i64 as i32;
    let tid = bpf_get_current_pid_tgid() as u32;
    if inside_syscall(tid) {
        return;
    }
    let stashed = take_inet_bind_args(tid);
    let Some(caller) = returned_call(ret) else {
        return;
    };
    // The clock is never 0 once the machine has run: 0 is "nothing stashed".
    if stashed.entered_ns == 0 {
        missing_entry();
        return;
    }
    let returned = Returned {
        entered_ns: Some(stashed.entered_ns),
        addr: stashed.addr as *const u8,
        addr_in_kernel: true,
        socket: SocketRef::Socket(stashed.socket as *const u8),
        fd: -1,
        addrlen: stashed.addrlen,
        ret,
        backend: Backend::Kprobe,
        op: op::BIND,
    };
    complete(ctx, caller, returned);
}

#[inline(always)]
pub(crate) fn on_exit(ctx: &TracePointContext) {
    let ret = record_word(ctx, EXIT_RET) as i64 as i32;
    // Taken out whatever the filters say: the entry must not outlive its call.
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    let Some(caller) = returned_call(ret) else {
        return;
    };
    let layout = &caller.cfg.layout;
    let args = if layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        syscall_args(layout)
    } else if saved.found {
        // Before 5.15: the arguments the entry saved, or nothing to report.
        saved.args
    } else {
        missing_entry();
        return;
    };
    let entered_ns = saved.entered_ns();
    let returned = syscall_bind(entered_ns, args, ret, Backend::Tracepoint);
    complete(ctx, caller, returned);
}

// listen(): only its failures are events (`op::LISTEN`), with the address the socket is
// bound to: EADDRINUSE when another socket already listens there (two SO_REUSEADDR binds
// succeed, the second listen() does not).

#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub(crate) fn bindtrace_sys_enter_listen(ctx: TracePointContext) -> u32 {
    if config().layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        stamp_entry();
    } else {
        stamp_entry_with_args(SyscallArgs { fd: record_word(&ctx, ENTER_FD) as i32, addr: 0, addrlen: 0 });
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_listen")]
pub(crate) fn bindtrace_sys_exit_listen(ctx: TracePointContext) -> u32 {
    let ret = record_word(&ctx, EXIT_RET) as i64 as i32;
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    if ret >= 0 {
        return 0;
    }
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    let layout = &caller.cfg.layout;
    let fd = if layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        syscall_args(layout).fd
    } else if saved.found {
        saved.args.fd
    } else {
        missing_entry();
        return 0;
    };
    let entered_ns = saved.entered_ns();
    complete(&ctx, caller, listen_failure(entered_ns, fd, ret, Backend::Tracepoint));
    0
}

/// A bind(2) from its syscall arguments (the socket found through the fd), for
/// `emit::complete`.
#[inline(always)]
fn syscall_bind(entered_ns: Option<u64>, args: SyscallArgs, ret: i32, backend: Backend) -> Returned {
    Returned {
        entered_ns,
        addr: args.addr as *const u8,
        addr_in_kernel: false,
        socket: SocketRef::Fd(args.fd),
        fd: args.fd,
        addrlen: args.addrlen,
        ret,
        backend,
        op: op::BIND,
    }
}

/// A failed listen() on `fd`, for `emit::complete`.
#[inline(always)]
fn listen_failure(entered_ns: Option<u64>, fd: i32, ret: i32, backend: Backend) -> Returned {
    Returned {
        entered_ns,
        addr: core::ptr::null(),
        addr_in_kernel: false,
        socket: SocketRef::Fd(fd),
        fd,
        addrlen: 0,
        ret,
        backend,
        op: op::LISTEN,
    }
}

#[fentry(function = "__sys_listen")]
pub(crate) fn bindtrace_fentry_sys_listen(_ctx: FEntryContext) -> u32 {
    stamp_entry();
    0
}

/// fexit of `__sys_listen(int fd, int backlog)`.
#[fexit(function = "__sys_listen")]
pub(crate) fn bindtrace_fexit_sys_listen(ctx: FExitContext) -> u32 {
    // An `int`: only its low 32 bits are the value (the slot's upper half is not a sign).
    let ret = ctx.arg::<u64>(2) as i32;
    let entered_ns = take_entry_time(bpf_get_current_pid_tgid() as u32);
    if ret >= 0 {
        return 0;
    }
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    let fd = ctx.arg::<u64>(0) as i32;
    complete(&ctx, caller, listen_failure(entered_ns, fd, ret, Backend::Fexit));
    0
}

#[kprobe]
pub(crate) fn bindtrace_kprobe_sys_listen(ctx: ProbeContext) -> u32 {
    stamp_entry_with_args(SyscallArgs { fd: ctx.arg::<u64>(0).unwrap_or(0) as i32, addr: 0, addrlen: 0 });
    0
}

#[kretprobe]
pub(crate) fn bindtrace_kretprobe_sys_listen(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i64 as i32;
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    if ret >= 0 {
        return 0;
    }
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    if !saved.found {
        missing_entry();
        return 0;
    }
    complete(&ctx, caller, listen_failure(saved.entered_ns(), saved.args.fd, ret, Backend::Kprobe));
    0
}

/// The kprobe backend's backstop for listen(2), as [`bindtrace_sys_exit_bind_backstop`] is
/// for bind(2).
#[tracepoint(category = "syscalls", name = "sys_exit_listen")]
pub(crate) fn bindtrace_sys_exit_listen_backstop(ctx: TracePointContext) -> u32 {
    let saved = take_entry(bpf_get_current_pid_tgid() as u32);
    if !saved.found || saved.in_syscall {
        return 0;
    }
    count(stat::RETURN_BACKSTOPPED);
    let ret = record_word(&ctx, EXIT_RET) as i64 as i32;
    if ret >= 0 {
        return 0;
    }
    let Some(caller) = returned_call(ret) else {
        return 0;
    };
    complete(&ctx, caller, listen_failure(saved.entered_ns(), saved.args.fd, ret, Backend::Kprobe));
    0
}
