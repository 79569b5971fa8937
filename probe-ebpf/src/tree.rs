//! The followed process tree (`bindtrace -- CMD`, `--tree PID`), kept in the kernel: a fork
//! by a followed process adds the child to `FOLLOWED` before the child first runs (the
//! tracepoint fires before `wake_up_new_task`), so nothing it does is missed; an exit takes
//! it out, so a reused pid never inherits the tree. A daemon that double-forks stays
//! followed: the map knows who forked it, not who its parent is now.
//!
//! Both programs run for every fork and exit on the host while attached (only in this mode):
//! one hash lookup when the task is not followed.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use bindtrace_common::{stat, TreePlace, NO_MEMBER};

use crate::{
    maps::{config, count, FOLLOWED},
    sock::kernel_read,
};

/// The followed process `tgid`'s place, if it is followed.
#[inline(always)]
pub(crate) fn place_of(tgid: u32) -> Option<TreePlace> {
    // SAFETY: the value is copied out at once; a concurrent delete frees nothing the
    // program holds (preallocated hash map).
    unsafe { FOLLOWED.get(tgid) }.copied()
}

/// `sched:sched_process_fork`, in the parent: a followed process's child (or new thread)
/// joins the tree one level down.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub(crate) fn bindtrace_sched_process_fork(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(place) = place_of(parent) else {
        return 0;
    };
    // The record's layout differs between kernels (6.x made the names `__data_loc`), so the
    // offset comes from tracefs through the config. A probe read, not a context load: the
    // verifier allows only constant offsets into a tracepoint's context.
    let child: u32 = kernel_read(ctx.as_ptr().cast::<u8>().wrapping_add(config().layout.fork_child_pid as usize));
    if child == 0 {
        return 0;
    }
    // A new thread is inserted by its tid too (the record does not say which it is): its
    // exit removes it, and binds look up the tgid only.
    let child_place = TreePlace { parent, depth: place.depth.saturating_add(1) };
    if FOLLOWED.insert(child, child_place, 0).is_err() {
        count(stat::TREE_FULL);
    }
    0
}

/// `sched:sched_process_exec`: a thread other than the leader that execs takes the leader's
/// pid, and its own tid is freed without an exit of its own: its entry goes here.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub(crate) fn bindtrace_sched_process_exec(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if place_of(tgid).is_none() {
        return 0;
    }
    // The offset comes from tracefs.
    let old_pid: u32 = kernel_read(ctx.as_ptr().cast::<u8>().wrapping_add(config().layout.exec_old_pid as usize));
    if old_pid != 0 && old_pid != tgid {
        let _ = FOLLOWED.remove(old_pid);
    }
    0
}

/// `sched:sched_process_exit`: a thread's own entry goes, and its process's once the
/// process's last thread exits (`signal->live`, decremented before this tracepoint, is 0).
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub(crate) fn bindtrace_sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // A thread's own entry first, whatever became of its process's: the threads of an
    // exit_group() exit together, and the one that sees the group dead removes the tgid
    // before the others get here.
    if tid != tgid {
        let _ = FOLLOWED.remove(tid);
    }
    // Not followed (nearly every exit on the host): one lookup more.
    if place_of(tgid).is_none() {
        return 0;
    }
    let layout = &config().layout;
    let group_dead = if layout.task_signal == NO_MEMBER || layout.signal_live == NO_MEMBER {
        // Without the members: the leader's exit ends the process (its other threads, if
        // any outlive it, are no longer followed).
        tid == tgid
    } else {
        // SAFETY: reads through bpf_probe_read_kernel; a fault reads 0 (taken as dead, which
        // at worst stops following a process that is exiting anyway).
        let live: i32 = unsafe {
            let task = bpf_get_current_task() as *const u8;
            let signal: *const u8 = kernel_read(task.wrapping_add(layout.task_signal as usize));
            kernel_read(signal.wrapping_add(layout.signal_live as usize))
        };
        live == 0
    };
    if group_dead {
        let _ = FOLLOWED.remove(tgid);
    }
    0
}
