//! Indices of the per-CPU counters in the `STATS` array.

/// Returns the exit hooks saw (binds, failed listen() calls). Each is then filtered,
/// emitted, lost to a full ring buffer, or without its entry (`ENTRY_LOST`, `AT_ATTACH`).
pub const SEEN: u32 = 0;
/// Events the in-kernel filters rejected (they never touch the ring buffer).
pub const FILTERED: u32 = 1;
/// Events written to the ring buffer.
pub const EMITTED: u32 = 2;
/// Events lost because the ring buffer was full.
pub const RINGBUF_FULL: u32 = 3;
/// Binds lost: their exit found no entry where only the entry knew the arguments (the
/// kprobe backend; the tracepoint backend before 5.15), more than a second after attach.
/// The per-thread entries cannot collide, so this takes an entry evicted with more than
/// 16,384 binds under way at once, or an insert that failed for memory.
pub const ENTRY_LOST: u32 = 4;
/// The same, within a second of attach: binds already under way when the probe attached,
/// inherent to attaching mid-call and not counted as lost.
pub const AT_ATTACH: u32 = 5;
/// Events whose sockaddr could not be read from user memory (emitted without address).
pub const ADDR_READ_FAILED: u32 = 6;
/// Events emitted without their entry time (the bind began before the probe attached, or
/// its entry was lost): duration unknown.
pub const NO_ENTRY_TIME: u32 = 7;
/// Binds lost because their kretprobe never ran (the kprobe's return instances ran out:
/// many binds sleeping at once), found when the same thread next binds: its entry or
/// stash was still there. bind(2) and listen(2) have a backstop (`RETURN_BACKSTOPPED`);
/// what counts here are inet_bind's returns (io_uring's, the kernel's own binds) and
/// compat callers' (32-bit processes), which no syscall tracepoint sees.
pub const RETURN_MISSED: u32 = 8;
/// Calls whose kretprobe never ran, reported all the same from the syscall's exit
/// tracepoint (the kprobe backend's backstop): not lost, counted to show the backstop at
/// work.
pub const RETURN_BACKSTOPPED: u32 = 9;
/// Processes (or threads) of the followed tree that could not be added to the `FOLLOWED`
/// map (it was full): their binds are not traced.
pub const TREE_FULL: u32 = 10;
pub const COUNT: u32 = 11;
