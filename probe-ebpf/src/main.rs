//! bindtrace's kernel side: the syscall-tracepoint backend.
//!
//! `sys_enter_bind` copies the requested sockaddr out of the caller's memory (so it survives a
//! failed bind) and reads the socket behind the fd; `sys_exit_bind` adds the return code and
//! duration, applies the filters and writes one `BindEvent` into the ring buffer.
//!
//! Kernel struct offsets are not compiled in: the tracer resolves them from the running
//! kernel's BTF and writes them into `BINDTRACE_CONFIG` before the object is loaded.
#![no_std]
#![no_main]

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_ktime_get_ns, generated,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use bindtrace_common::{
    filter_flags, kernel_helpers, sock_flags, stat, Backend, BindEvent, FieldLoc, KernelLayout, ProbeConfig, AF_INET,
    AF_INET6, COMM_LEN, WAKEUP_BYTES_MIN_INTERVAL_NS, WAKEUP_INTERVAL_NS,
};

/// Written by the tracer before load (aya rewrites .rodata); read only through [`config`].
#[unsafe(no_mangle)]
static BINDTRACE_CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// Default size; the tracer may resize it before load.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// A kprobe-backend bind() between entry and exit: the kretprobe sees only the return value,
/// so the entry stashes the arguments. Everything else is read at exit, after the result
/// filter.
#[repr(C)]
struct InFlight {
    entered_ns: u64,
    /// The kernel's copy of the sockaddr.
    addr: u64,
    /// `struct socket *`.
    socket: u64,
    addrlen: u32,
    _pad: u32,
}

/// How a backend reaches the bound socket. A separate variant per backend, not a nullable
/// pointer: each hook builds a constant variant, so the compiler drops the other arm, and the
/// fexit and kprobe programs never contain the fd walk (whose helpers a 5.10 kernel lacks).
#[derive(Clone, Copy)]
enum SocketRef {
    /// The syscall's fd, looked up in the calling task's file table.
    Fd(i32),
    /// The `struct socket *` the kernel function received.
    Socket(*const u8),
}

/// Everything a backend knows when bind() returns, handed to [`complete`].
struct Returned {
    /// `None` when this call's entry was not seen (see [`entry_time`]).
    entered_ns: Option<u64>,
    addr: *const u8,
    addr_in_kernel: bool,
    socket: SocketRef,
    fd: i32,
    addrlen: u32,
    ret: i32,
    backend: Backend,
}

/// kprobe-backend binds between entry and exit, keyed by thread id.
#[map(name = "IN_FLIGHT")]
static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);

/// When a thread entered bind(), in a slot picked by its tid (tracepoint and fentry/fexit
/// backends, whose return hooks have the arguments themselves). A plain array store at entry
/// and a load at exit: the hash-map insert and delete this replaced cost ~400 ns per bind
/// (kernel.bpf_stats_enabled=1, bind-storm). Two threads whose tids share a slot and bind at
/// the same moment lose the earlier one's duration, never its event.
///
/// On kernels before 5.15 (no `bpf_task_pt_regs`) the tracepoint's exit cannot read the
/// syscall's arguments, so its entry saves them here too; there a lost slot loses the event,
/// counted as `IN_FLIGHT_MISSING`.
#[repr(C)]
struct EntryStamp {
    tid: u32,
    fd: i32,
    entered_ns: u64,
    addr: u64,
    addrlen: u32,
    _pad: u32,
}

/// A bind()'s arguments, as the syscall received them.
#[derive(Clone, Copy)]
struct SyscallArgs {
    fd: i32,
    addr: u64,
    addrlen: u32,
}

const ENTRY_SLOTS: u32 = 1 << 14;

#[map(name = "ENTRY_TIMES")]
static ENTRY_TIMES: Array<EntryStamp> = Array::with_max_entries(ENTRY_SLOTS, 0);

/// Per-CPU counters, indexed by `bindtrace_common::stat`.
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// When the probe last woke the reader (ns, CLOCK_MONOTONIC).
#[map(name = "LAST_WAKEUP")]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// tgids accepted by `--pid` (value unused).
#[map(name = "FILTER_PIDS")]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

// Offset of `ret` in the syscalls:sys_exit_bind record (after the 8-byte common header and the
// 8-byte syscall number); see /sys/kernel/tracing/events/syscalls/sys_exit_bind/format.
const EXIT_RET: usize = 16;
// The arguments in the syscalls:sys_enter_bind record, each a 64-bit slot (same file).
const ENTER_FD: usize = 16;
const ENTER_ADDR: usize = 24;
const ENTER_ADDRLEN: usize = 32;

const SOCKADDR_IN_LEN: u32 = 16;
const SOCKADDR_IN6_LEN: u32 = 28;
/// The shortest sockaddr_in6 the kernel takes (`SIN6_LEN_RFC2133`: without sin6_scope_id).
const SOCKADDR_IN6_MIN_LEN: u32 = 24;
const ENOTSOCK: i32 = 88;
const EBADF: i32 = 9;

/// The configuration, read through an opaque pointer: `BINDTRACE_CONFIG` is an immutable
/// static, so without this the compiler would fold its (all-zero) initial value into the code.
#[inline(always)]
fn config() -> &'static ProbeConfig {
    let ptr = core::hint::black_box(&raw const BINDTRACE_CONFIG);
    // SAFETY: points to a static that lives for the whole program.
    unsafe { &*ptr }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; a program runs to completion on one CPU without preemption
        // by another instance of itself on that CPU.
        unsafe { *counter += 1 };
    }
}

/// The thread's name when the `--comm` filter read it (`read`), kept for the event. Plain,
/// always-initialised scalars: an Option here left padding the verifier rejects
/// ("R3 !read_ok"), and a zeroed byte array becomes a memset call (see [`Requested`]).
struct TaskName {
    words: (u64, u64),
    read: bool,
}

impl TaskName {
    #[inline(always)]
    fn unread() -> Self {
        Self { words: (0, 0), read: false }
    }

    /// The name for the event: the one already read, or a fresh read.
    #[inline(always)]
    fn bytes(&self) -> [u8; COMM_LEN] {
        if self.read {
            // SAFETY: same size; these are the name's bytes.
            unsafe { core::mem::transmute::<[u64; 2], [u8; COMM_LEN]>([self.words.0, self.words.1]) }
        } else {
            current_comm()
        }
    }
}

/// Task-based filters (pid, comm). The name is fetched only when a --comm filter needs it
/// (the verifier prunes this otherwise), and left in `name` for the event.
#[inline(always)]
fn task_passes(cfg: &ProbeConfig, tgid: u32, name: &mut TaskName) -> bool {
    let filter = &cfg.filter;
    // SAFETY: the value is never dereferenced, only tested for presence.
    if filter.is_active(filter_flags::PIDS) && unsafe { FILTER_PIDS.get(tgid) }.is_none() {
        return false;
    }
    if !filter.is_active(filter_flags::COMM) {
        return true;
    }
    let comm = current_comm();
    // SAFETY: same size; any bytes are valid u64s.
    let [low, high]: [u64; 2] = unsafe { core::mem::transmute(comm) };
    *name = TaskName { words: (low, high), read: true };
    filter.accepts_comm(&comm)
}

/// The calling thread's name, NUL-padded; read into words so that nothing is zero-filled
/// byte by byte first (the helper fills all 16 bytes, or zeroes them when it fails).
#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    let mut comm = MaybeUninit::<[u64; COMM_LEN / 8]>::uninit();
    // SAFETY: the helper writes all COMM_LEN bytes; [u64; 2] and [u8; 16] have the same size.
    unsafe {
        generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), COMM_LEN as u32);
        core::mem::transmute(comm.assume_init())
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn bindtrace_sys_enter_bind(ctx: TracePointContext) -> u32 {
    if config().layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        stamp_entry();
    } else {
        // Before 5.15 the exit cannot reach the arguments: keep them (see EntryStamp).
        stamp_entry_with_args(SyscallArgs {
            fd: record_word(&ctx, ENTER_FD) as i32,
            addr: record_word(&ctx, ENTER_ADDR),
            addrlen: record_word(&ctx, ENTER_ADDRLEN) as u32,
        });
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn bindtrace_sys_exit_bind(ctx: TracePointContext) -> u32 {
    on_exit(&ctx);
    0
}

/// A 64-bit field of the tracepoint record, loaded directly: the verifier allows plain loads
/// from a tracepoint's context, which cost far less than a probe-read helper call.
#[inline(always)]
fn record_word(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is a field of the syscalls:sys_{enter,exit}_bind record (syscall ABI).
    unsafe { ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>().read() }
}

/// The entry hooks of the tracepoint and fentry backends only stamp the time: the exit hook
/// reads the arguments itself, and filters there.
#[inline(always)]
fn stamp_entry() {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: an array slot; a racing thread of the same slot is detected by the tid.
        unsafe {
            (*slot).entered_ns = bpf_ktime_get_ns();
            (*slot).tid = tid;
        }
    }
}

/// [`stamp_entry`] plus the syscall's arguments, for kernels whose exit hook cannot read them.
#[inline(always)]
fn stamp_entry_with_args(args: SyscallArgs) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(slot) = ENTRY_TIMES.get_ptr_mut(tid & (ENTRY_SLOTS - 1)) {
        // SAFETY: as in stamp_entry; the tid is written last, after the fields it vouches for.
        unsafe {
            (*slot).entered_ns = bpf_ktime_get_ns();
            (*slot).fd = args.fd;
            (*slot).addr = args.addr;
            (*slot).addrlen = args.addrlen;
            (*slot).tid = tid;
        }
    }
}

/// This thread's entry slot, if the stamp in it is its own.
#[inline(always)]
fn own_entry(tid: u32) -> Option<&'static EntryStamp> {
    let slot = ENTRY_TIMES.get_ptr(tid & (ENTRY_SLOTS - 1))?;
    // SAFETY: an array slot, which lives as long as the map.
    let slot = unsafe { &*slot };
    (slot.tid == tid).then_some(slot)
}

/// The entry time and arguments this thread's entry saved, copied out of its slot. The tid is
/// checked again after the copy: a thread sharing the slot may have overwritten it meanwhile,
/// and a mixed copy would pair this bind with another's fd and address.
#[inline(always)]
fn saved_entry(tid: u32) -> Option<(Option<u64>, SyscallArgs)> {
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
fn entry_time(tid: u32) -> Option<u64> {
    own_entry(tid).map(|slot| slot.entered_ns)
}

/// bind(fd, umyaddr, addrlen) from the syscall's saved user registers, which stay intact
/// until the syscall returns: the exit hook needs no copy of them from the entry. Only on
/// kernels with `bpf_task_pt_regs` (5.15, which also has `bpf_get_current_task_btf`).
#[inline(always)]
fn syscall_args(layout: &KernelLayout) -> SyscallArgs {
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
fn remember(tid: u32, in_flight: InFlight) {
    if IN_FLIGHT.insert(tid, in_flight, 0).is_err() {
        count(stat::IN_FLIGHT_FULL);
    }
}

/// Entry of `inet_bind(struct socket *, struct sockaddr *, int)` and `inet6_bind` for the
/// kprobe backend: the arguments, stashed for the kretprobe.
#[inline(always)]
fn on_kprobe_entry(socket: u64, addr: u64, addrlen: u64) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_passes(cfg, (pid_tgid >> 32) as u32, &mut TaskName::unread()) {
        return;
    }
    let entered_ns = unsafe { bpf_ktime_get_ns() };
    remember(pid_tgid as u32, InFlight { entered_ns, addr, socket, addrlen: addrlen as u32, _pad: 0 });
}

#[kprobe]
pub fn bindtrace_kprobe_inet_bind(ctx: ProbeContext) -> u32 {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    on_kprobe_entry(arg(0), arg(1), arg(2));
    0
}

#[kretprobe]
pub fn bindtrace_kretprobe_inet_bind(ctx: RetProbeContext) -> u32 {
    on_kretprobe(&ctx);
    0
}

#[fentry(function = "inet_bind")]
pub fn bindtrace_fentry_inet_bind(_ctx: FEntryContext) -> u32 {
    stamp_entry();
    0
}

#[fentry(function = "inet6_bind")]
pub fn bindtrace_fentry_inet6_bind(_ctx: FEntryContext) -> u32 {
    stamp_entry();
    0
}

#[fexit(function = "inet_bind")]
pub fn bindtrace_fexit_inet_bind(ctx: FExitContext) -> u32 {
    on_fexit(&ctx);
    0
}

#[fexit(function = "inet6_bind")]
pub fn bindtrace_fexit_inet6_bind(ctx: FExitContext) -> u32 {
    on_fexit(&ctx);
    0
}

/// fexit sees the arguments and the return value together; the entry time comes from the
/// fentry program.
#[inline(always)]
fn on_fexit(ctx: &FExitContext) {
    let ret: i64 = ctx.arg(3);
    let Some(caller) = returned_call(ret as i32) else {
        return;
    };
    let returned = Returned {
        entered_ns: entry_time(caller.pid_tgid as u32),
        addr: ctx.arg::<u64>(1) as *const u8,
        addr_in_kernel: true,
        socket: SocketRef::Socket(ctx.arg::<u64>(0) as *const u8),
        fd: -1,
        addrlen: ctx.arg::<u64>(2) as u32,
        ret: ret as i32,
        backend: Backend::Fexit,
    };
    complete(ctx, caller, returned);
}

/// Who is returning from bind(), as the return hooks' prologue found out.
struct Caller {
    cfg: &'static ProbeConfig,
    pid_tgid: u64,
    name: TaskName,
}

/// The start of every return hook: count the call and apply the result and task filters
/// (`None`: filtered, counted).
#[inline(always)]
fn returned_call(ret: i32) -> Option<Caller> {
    count(stat::SEEN);
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut name = TaskName::unread();
    if !cfg.filter.accepts_result(ret) || !task_passes(cfg, (pid_tgid >> 32) as u32, &mut name) {
        count(stat::FILTERED);
        return None;
    }
    Some(Caller { cfg, pid_tgid, name })
}

/// Return of inet_bind/inet6_bind under the kprobe backend: the arguments come from the
/// entry's stash.
#[inline(always)]
fn on_kretprobe(ctx: &RetProbeContext) {
    let ret = ctx.ret::<u64>() as i64 as i32;
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value stays valid until removed below; only this thread uses its key.
    let stashed = IN_FLIGHT.get_ptr(tid).map(|p| unsafe { core::ptr::read(p) });
    if stashed.is_some() {
        let _ = IN_FLIGHT.remove(tid);
    }
    let Some(caller) = returned_call(ret) else {
        return;
    };
    let Some(stashed) = stashed else {
        count(stat::IN_FLIGHT_MISSING);
        return;
    };
    let returned = Returned {
        entered_ns: Some(stashed.entered_ns),
        addr: stashed.addr as *const u8,
        addr_in_kernel: true,
        socket: SocketRef::Socket(stashed.socket as *const u8),
        fd: -1,
        addrlen: stashed.addrlen,
        ret,
        backend: Backend::Kprobe,
    };
    complete(ctx, caller, returned);
}

/// Reads kernel memory at `src` as a `T`, or zeros: the helper clears the destination itself
/// when the read faults, so callers need no branch per read. Every branch on a read's result
/// multiplies the paths the verifier walks (it dominated load time), and a zero is what the
/// event wants for a field it could not read.
#[inline(always)]
unsafe fn kernel_read<T: Copy>(src: *const u8) -> T {
    let mut value = MaybeUninit::<T>::uninit();
    // SAFETY: the helper copes with any address and fills all of `value` either way.
    unsafe {
        generated::bpf_probe_read_kernel(value.as_mut_ptr().cast(), size_of::<T>() as u32, src.cast());
        value.assume_init()
    }
}

/// The requested sockaddr, decoded. The address is kept as two words so that no byte array
/// is ever zero-filled: LLVM turns such fills into calls to a byte-at-a-time `memset`, which
/// cost more than everything else the probe does (seen in `llvm-objdump -d`).
struct Requested {
    family: u16,
    port: u16,
    /// The address bytes in network order, as `BindEvent::addr`.
    addr: [u64; 2],
    scope_id: u32,
    flags: u32,
    /// The copy from the caller's memory faulted.
    unreadable: bool,
}

/// Copies the sockaddr the caller passed, all of it in one read (`addrlen` bytes, at most
/// 28): the family and the port sit at the same offsets in sockaddr_in and sockaddr_in6.
/// Address and port stay 0 when the length is too short for the family (bind() then fails
/// with EINVAL, and `ADDR_SHORT` says why).
#[inline(always)]
fn read_requested_address(addr: *const u8, in_kernel: bool, addrlen: u32) -> Requested {
    let mut req = Requested { family: 0, port: 0, addr: [0; 2], scope_id: 0, flags: 0, unreadable: false };
    if addr.is_null() || addrlen < 2 {
        req.flags = sock_flags::ADDR_SHORT;
        return req;
    }
    // Zeroed with four word stores: the 5.11-5.15 verifiers refuse an uninitialised buffer
    // handed to a probe-read helper with a variable length ("invalid indirect read from
    // stack"), and a zero-filled array (`[0u8; 32]`, even `[0u64; 4]`) becomes a call to a
    // byte-at-a-time `memset`. Volatile stores stay four instructions.
    let mut buf = MaybeUninit::<[u64; 4]>::uninit();
    for i in 0..4 {
        // SAFETY: within the 32-byte buffer.
        unsafe { core::ptr::write_volatile(buf.as_mut_ptr().cast::<u64>().add(i), 0) };
    }
    let len = if addrlen > SOCKADDR_IN6_LEN { SOCKADDR_IN6_LEN } else { addrlen };
    // SAFETY: both helpers cope with any pointer; `len` is at most 28 of the 32 bytes.
    let ret = unsafe {
        if in_kernel {
            generated::bpf_probe_read_kernel(buf.as_mut_ptr().cast(), len, addr.cast())
        } else {
            generated::bpf_probe_read_user(buf.as_mut_ptr().cast(), len, addr.cast())
        }
    };
    let word = |i: usize| -> u64 {
        // SAFETY: callers read only words the length check below proves were written.
        unsafe { buf.as_ptr().cast::<u64>().add(i).read() }
    };
    if ret != 0 {
        req.unreadable = true;
        return req;
    }
    // Little-endian words: bytes 0-1 family, 2-3 port (network order), 4-7 sin_addr;
    // sin6_addr is bytes 8-23 and sin6_scope_id bytes 24-27.
    let head = word(0);
    let family = head as u16;
    req.family = family;
    let needed = match family {
        AF_INET => SOCKADDR_IN_LEN,
        AF_INET6 => SOCKADDR_IN6_MIN_LEN,
        _ => 2,
    };
    if addrlen < needed {
        req.flags = sock_flags::ADDR_SHORT;
        return req;
    }
    req.port = u16::from_be((head >> 16) as u16);
    if family == AF_INET6 {
        req.addr = [word(1), word(2)];
        // SAFETY: sin6_scope_id, bytes 24..28 of the zeroed 32-byte buffer: 0 when addrlen
        // is 24 and the copy stopped before it.
        req.scope_id = unsafe { buf.as_ptr().cast::<u8>().add(24).cast::<u32>().read() };
    } else if family == AF_INET {
        req.addr = [head >> 32, 0];
    }
    req.flags = sock_flags::ADDR_READ;
    req
}

/// What the probe read of the socket and its network namespace.
#[derive(Default)]
struct SockInfo {
    sock_type: u16,
    protocol: u16,
    bound_port: u16,
    bound_dev_if: u32,
    bound_addr4: u32,
    flags: u32,
    netns_ino: u32,
}

/// The `struct sock` behind the caller's `fd` (tracepoint backend), or null.
#[inline(always)]
fn sock_of_fd(layout: &KernelLayout, fd: i32) -> *const u8 {
    // SAFETY: the current task, used as socket_of_fd documents: BTF-typed where the kernel
    // offers that (5.11), read through bpf_probe_read_kernel before.
    unsafe {
        if layout.has_helper(kernel_helpers::TASK_BTF) {
            socket_of_fd::<TypedLoad>(generated::bpf_get_current_task_btf() as *const u8, layout, fd)
        } else {
            socket_of_fd::<ProbeRead>(bpf_get_current_task() as *const u8, layout, fd)
        }
    }
}

/// How a walk through kernel structures reads a member: [`TypedLoad`] where the base is a
/// BTF-typed pointer, [`ProbeRead`] where it is not.
trait MemberRead {
    /// # Safety
    /// As [`btf_load`] for `TypedLoad`; `ProbeRead` copes with any address.
    unsafe fn member<T: Copy>(base: *const u8, offset: u32) -> T;
}

struct TypedLoad;
struct ProbeRead;

impl MemberRead for TypedLoad {
    #[inline(always)]
    unsafe fn member<T: Copy>(base: *const u8, offset: u32) -> T {
        // SAFETY: the caller's contract.
        unsafe { btf_load(base, offset) }
    }
}

impl MemberRead for ProbeRead {
    #[inline(always)]
    unsafe fn member<T: Copy>(base: *const u8, offset: u32) -> T {
        // SAFETY: kernel_read copes with any address.
        unsafe { kernel_read(base.wrapping_add(offset as usize)) }
    }
}

/// Reads the socket fields from the `struct sock` (null: none) and the netns, from the sock
/// or else from the calling task.
#[inline(always)]
fn read_sock(layout: &KernelLayout, sk: *const u8) -> SockInfo {
    // SAFETY: every dereference below goes through bpf_probe_read_kernel.
    unsafe {
        let (mut info, net): (SockInfo, *const u8) = if sk.is_null() {
            let nsproxy: *const u8 = kernel_read(task_field(layout.task_nsproxy));
            (SockInfo::default(), kernel_read(nsproxy.wrapping_add(layout.nsproxy_net_ns as usize)))
        } else {
            (sock_fields(layout, sk), kernel_read(sk.wrapping_add(layout.sock_net as usize)))
        };
        // A null `net` reads as 0: no netns.
        info.netns_ino = kernel_read(net.wrapping_add(layout.net_inum as usize));
        info
    }
}

#[inline(always)]
fn task_field(offset: u32) -> *const u8 {
    // SAFETY: only an address computation; the caller reads through bpf_probe_read_kernel.
    unsafe { bpf_get_current_task() as *const u8 }.wrapping_add(offset as usize)
}

/// A pointer-sized (or smaller) member of a BTF-typed kernel object, loaded directly. With
/// `base` typed by the verifier (it comes from `bpf_get_current_task_btf` or from another
/// such load) and `offset` a verifier-known constant (the read-only config), the verifier
/// checks the access against the kernel's BTF and makes it a fault-safe load: no helper call,
/// and a null `base` reads as 0.
#[inline(always)]
unsafe fn btf_load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier rejects the program rather than let this fault.
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// The `struct sock` behind `fd` in `task`, or null. The first steps (task → files → fdtable)
/// are typed loads where the kernel gives a typed task (`R`); from the fd array on the
/// kernel's BTF types end (`struct file **`, `void *private_data`), so the rest goes through
/// `bpf_probe_read_kernel`. A pointer that failed to read is null, and reading through null
/// fails again (giving null), so the walk needs no branch per step; the socket's back-pointer
/// to its file proves the fd really is a socket.
#[inline(always)]
unsafe fn socket_of_fd<R: MemberRead>(task: *const u8, layout: &KernelLayout, fd: i32) -> *const u8 {
    if fd < 0 || layout.file_private_data == 0 {
        return core::ptr::null();
    }
    unsafe {
        let files: *const u8 = R::member(task, layout.task_files);
        let fdt: *const u8 = R::member(files, layout.files_fdt);
        let max_fds: u32 = R::member(fdt, layout.fdtable_max_fds);
        if fd as u32 >= max_fds {
            return core::ptr::null();
        }
        let fd_array: u64 = R::member(fdt, layout.fdtable_fd);
        let file: *const u8 = kernel_read((fd_array as usize as *const u8).wrapping_add(fd as usize * 8));
        let socket: *const u8 = kernel_read(file.wrapping_add(layout.file_private_data as usize));
        let socket_file: *const u8 = kernel_read(socket.wrapping_add(layout.socket_file as usize));
        if file.is_null() || socket_file != file {
            return core::ptr::null();
        }
        kernel_read(socket.wrapping_add(layout.socket_sk as usize))
    }
}

#[inline(always)]
unsafe fn sock_fields(layout: &KernelLayout, sk: *const u8) -> SockInfo {
    let mut sock = SockReader::new(sk);
    // 0 or 1 each, shifted into place without a branch.
    let mut flags = sock_flags::SOCK_INFO;
    flags |= nonzero(sock.field(&layout.sock_reuse)) * sock_flags::REUSEADDR;
    flags |= nonzero(sock.field(&layout.sock_reuseport)) * sock_flags::REUSEPORT;
    flags |= nonzero(sock.field(&layout.sock_ipv6only)) * sock_flags::V6ONLY;
    // inet_sock begins with struct sock, so these offsets apply to the same pointer.
    flags |= nonzero(sock.field(&layout.inet_freebind)) * sock_flags::FREEBIND;
    flags |= nonzero(sock.field(&layout.inet_transparent)) * sock_flags::TRANSPARENT;
    flags |= nonzero(sock.field(&layout.inet_bind_address_no_port)) * sock_flags::BIND_ADDRESS_NO_PORT;
    SockInfo {
        sock_type: sock.field(&layout.sock_type) as u16,
        protocol: sock.field(&layout.sock_protocol) as u16,
        bound_dev_if: sock.field(&layout.sock_bound_dev_if),
        // Where the socket is bound now: the port the kernel picked for port 0, or, after
        // EINVAL, what the socket was already bound to. The IPv4 address is read whatever
        // the family; userspace uses it for AF_INET only.
        bound_port: sock.field(&layout.sock_num) as u16,
        bound_addr4: sock.word(layout.sock_rcv_saddr),
        flags,
        netns_ino: 0,
    }
}

/// 1 if `value` is non-zero, else 0.
#[inline(always)]
fn nonzero(value: u32) -> u32 {
    u32::from(value != 0)
}

/// Reads fields of one `struct sock` with as few kernel reads as possible: the first
/// [`SOCK_HEAD`] bytes (skc_rcv_saddr, skc_num, skc_family, the skc_reuse bitfields,
/// skc_bound_dev_if) in one read, and each other 32-bit word once however many fields
/// share it. Offsets come from the read-only config, so the verifier knows them and settles
/// every branch here itself.
struct SockReader {
    sk: *const u8,
    head: [u64; SOCK_HEAD / 8],
    last_offset: u32,
    last_value: u32,
}

const SOCK_HEAD: usize = 32;

impl SockReader {
    #[inline(always)]
    fn new(sk: *const u8) -> Self {
        // SAFETY: kernel_read copes with any address.
        let head = unsafe { kernel_read(sk) };
        Self { sk, head, last_offset: u32::MAX, last_value: 0 }
    }

    #[inline(always)]
    fn word(&mut self, offset: u32) -> u32 {
        let at = offset as usize;
        if at + 4 <= SOCK_HEAD {
            // SAFETY: same size, any bytes are valid u8s.
            let head: &[u8; SOCK_HEAD] = unsafe { &*(&raw const self.head).cast() };
            if let Some(bytes) = head.get(at..at + 4) {
                return u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        if self.last_offset != offset {
            // SAFETY: kernel_read copes with any address.
            self.last_value = unsafe { kernel_read(self.sk.wrapping_add(at)) };
            self.last_offset = offset;
        }
        self.last_value
    }

    /// The field, or 0 when this kernel has no such member.
    #[inline(always)]
    fn field(&mut self, loc: &FieldLoc) -> u32 {
        if !loc.is_present() {
            return 0;
        }
        loc.extract(self.word(loc.offset))
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    let ret = record_word(ctx, EXIT_RET) as i64 as i32;
    let Some(caller) = returned_call(ret) else {
        return;
    };
    let layout = &caller.cfg.layout;
    let tid = caller.pid_tgid as u32;
    let (entered_ns, args) = if layout.has_helper(kernel_helpers::TASK_PT_REGS) {
        (entry_time(tid), syscall_args(layout))
    } else {
        // Before 5.15: the arguments the entry saved, or nothing to report.
        let Some(saved) = saved_entry(tid) else {
            count(stat::IN_FLIGHT_MISSING);
            return;
        };
        saved
    };
    let returned = Returned {
        entered_ns,
        addr: args.addr as *const u8,
        addr_in_kernel: false,
        socket: SocketRef::Fd(args.fd),
        fd: args.fd,
        addrlen: args.addrlen,
        ret,
        backend: Backend::Tracepoint,
    };
    complete(ctx, caller, returned);
}

/// Builds, filters and emits the event of a returned bind(), whatever hook saw it. The
/// record is assembled from locals in one struct literal: no zero-fill first (see
/// [`Requested`]).
#[inline(always)]
fn complete<C: EbpfContext>(ctx: &C, caller: Caller, r: Returned) {
    let Caller { cfg, pid_tgid, name } = caller;
    let filter = &cfg.filter;
    let req = read_requested_address(r.addr, r.addr_in_kernel, r.addrlen);
    if req.unreadable {
        count(stat::ADDR_READ_FAILED);
        debug!(ctx, "bindtrace: sockaddr of pid {} unreadable", (pid_tgid >> 32) as u32);
    }
    if !filter.accepts_port(req.port) || !filter.accepts_family(req.family) {
        count(stat::FILTERED);
        return;
    }
    let sk = match r.socket {
        SocketRef::Fd(fd) => {
            // After ENOTSOCK or EBADF the fd holds no socket of this call: do not look behind it.
            let socket_fd = if r.ret == -ENOTSOCK || r.ret == -EBADF { -1 } else { fd };
            sock_of_fd(&cfg.layout, socket_fd)
        }
        // SAFETY: reads go through bpf_probe_read_kernel.
        SocketRef::Socket(socket) => unsafe { kernel_read(socket.wrapping_add(cfg.layout.socket_sk as usize)) },
    };
    let sock = read_sock(&cfg.layout, sk);
    if !filter.accepts_protocol(sock.protocol) {
        count(stat::FILTERED);
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let (timestamp_ns, duration_ns, entry_flag) = match r.entered_ns {
        Some(entered_ns) => (entered_ns, now.saturating_sub(entered_ns), 0),
        None => {
            count(stat::NO_ENTRY_TIME);
            (now, 0, sock_flags::NO_ENTRY_TIME)
        }
    };
    // Written straight into the ring: no copy of the record on the stack first.
    let Some(mut entry) = EVENTS.reserve::<BindEvent>(0) else {
        count(stat::RINGBUF_FULL);
        return;
    };
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: same size; any bytes are valid u8s.
    let addr: [u8; 16] = unsafe { core::mem::transmute(req.addr) };
    entry.write(BindEvent {
        timestamp_ns,
        duration_ns,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        addr,
        comm: name.bytes(),
        netns_ino: sock.netns_ino,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        ret: r.ret,
        fd: r.fd,
        addrlen: r.addrlen,
        scope_id: req.scope_id,
        bound_dev_if: sock.bound_dev_if,
        sock_flags: req.flags | sock.flags | entry_flag,
        family: req.family,
        port: req.port,
        sock_type: sock.sock_type,
        protocol: sock.protocol,
        bound_port: sock.bound_port,
        backend: r.backend as u8,
        _pad: 0,
        bound_addr4: sock.bound_addr4.to_le_bytes(),
        _reserved: [0; 4],
    });
    entry.submit(wakeup_flags(cfg, now));
    count(stat::EMITTED);
}

/// Wake the reader for this record only when it has not been woken for
/// [`WAKEUP_INTERVAL_NS`], or when `wakeup_bytes` are unread: see `bindtrace_common`. A record
/// that woke nobody is found by the reader's polling, which lasts longer than the interval.
#[inline(always)]
fn wakeup_flags(cfg: &ProbeConfig, now: u64) -> u64 {
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: an array slot; a racing CPU at worst causes one extra or one fewer wake-up,
    // and either way the reader was woken within the interval.
    let last = unsafe { &mut *last };
    let since = now.saturating_sub(*last);
    let force = since >= WAKEUP_INTERVAL_NS
        || (since >= WAKEUP_BYTES_MIN_INTERVAL_NS
            && cfg.wakeup_bytes != 0
            && EVENTS.query(BPF_RB_AVAIL_DATA) >= cfg.wakeup_bytes);
    if force {
        *last = now;
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
