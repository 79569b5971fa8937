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

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        bpf_probe_read_user_buf,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use bindtrace_common::{
    filter_flags, sock_flags, stat, Backend, BindEvent, FieldLoc, KernelLayout, ProbeConfig, AF_INET, AF_INET6,
    COMM_LEN,
};

/// Written by the tracer before load (aya rewrites .rodata); read only through [`config`].
#[unsafe(no_mangle)]
static BINDTRACE_CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// Default size; the tracer may resize it before load.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// A bind() between entry and exit: only the syscall's arguments and the entry time. Everything
/// else is read at exit, after the result filter, so a filtered-out call costs a map update and
/// a lookup, nothing more. The sockaddr is still the caller's until bind() returns.
#[repr(C)]
struct InFlight {
    entered_ns: u64,
    /// The sockaddr: in the caller's memory (tracepoint) or the kernel's copy (inet_bind).
    addr: u64,
    /// `struct socket *` for the inet_bind backends, 0 for the tracepoint (it has the fd).
    socket: u64,
    fd: i32,
    addrlen: u32,
}

/// Everything a backend knows when bind() returns, handed to [`complete`].
struct Returned {
    entered_ns: u64,
    addr: *const u8,
    addr_in_kernel: bool,
    socket: *const u8,
    fd: i32,
    addrlen: u32,
    ret: i32,
    backend: Backend,
}

/// bind() calls between entry and exit, keyed by thread id.
#[map(name = "IN_FLIGHT")]
static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);

/// Per-CPU counters, indexed by `bindtrace_common::stat`.
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// When the probe last woke the reader (ns, CLOCK_MONOTONIC).
#[map(name = "LAST_WAKEUP")]
static LAST_WAKEUP: Array<u64> = Array::with_max_entries(1, 0);

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the reader at least this often while records flow (2 ms)...
const WAKEUP_INTERVAL_NS: u64 = 2_000_000;
/// ...and whenever this much is unread (the default ring holds 1 MiB).
const WAKEUP_BYTES: u64 = 64 * 1024;

/// tgids accepted by `--pid` (value unused).
#[map(name = "FILTER_PIDS")]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

// Offsets into the syscalls:sys_{enter,exit}_bind records (after the 8-byte common header and
// the 8-byte syscall number); see /sys/kernel/tracing/events/syscalls/sys_enter_bind/format.
const ENTER_FD: usize = 16;
const ENTER_UMYADDR: usize = 24;
const ENTER_ADDRLEN: usize = 32;
const EXIT_RET: usize = 16;

const SOCKADDR_IN_LEN: u32 = 16;
const SOCKADDR_IN6_LEN: u32 = 28;
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

/// Task-based filters (pid, comm), checked at entry and again at exit so that a filtered
/// call never touches the in-flight map.
#[inline(always)]
fn task_passes(cfg: &ProbeConfig, tgid: u32, comm: impl FnOnce() -> [u8; COMM_LEN]) -> bool {
    let filter = &cfg.filter;
    // SAFETY: the value is never dereferenced, only tested for presence.
    if filter.is_active(filter_flags::PIDS) && unsafe { FILTER_PIDS.get(tgid) }.is_none() {
        return false;
    }
    // Only fetch the name when a --comm filter needs it (the verifier prunes this otherwise).
    !filter.is_active(filter_flags::COMM) || filter.accepts_comm(&comm())
}

#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn bindtrace_sys_enter_bind(ctx: TracePointContext) -> u32 {
    on_enter(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn bindtrace_sys_exit_bind(ctx: TracePointContext) -> u32 {
    on_exit(&ctx);
    0
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_passes(cfg, (pid_tgid >> 32) as u32, current_comm) {
        return;
    }
    // SAFETY: the offsets are inside the tracepoint record, whose layout is syscall ABI.
    let in_flight = unsafe {
        InFlight {
            entered_ns: bpf_ktime_get_ns(),
            addr: ctx.read_at::<u64>(ENTER_UMYADDR).unwrap_or(0),
            socket: 0,
            fd: ctx.read_at::<u64>(ENTER_FD).unwrap_or(u64::MAX) as i32,
            addrlen: ctx.read_at::<u64>(ENTER_ADDRLEN).unwrap_or(0) as u32,
        }
    };
    remember(pid_tgid as u32, in_flight);
}

#[inline(always)]
fn remember(tid: u32, in_flight: InFlight) {
    if IN_FLIGHT.insert(tid, in_flight, 0).is_err() {
        count(stat::IN_FLIGHT_FULL);
    }
}

/// Entry of `inet_bind(struct socket *, struct sockaddr *, int)` and `inet6_bind` for the
/// kprobe and fentry backends: the arguments, stashed for the return hook.
#[inline(always)]
fn on_inet_bind_entry(socket: u64, addr: u64, addrlen: u64) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_passes(cfg, (pid_tgid >> 32) as u32, current_comm) {
        return;
    }
    let entered_ns = unsafe { bpf_ktime_get_ns() };
    remember(pid_tgid as u32, InFlight { entered_ns, addr, socket, fd: -1, addrlen: addrlen as u32 });
}

#[kprobe]
pub fn bindtrace_kprobe_inet_bind(ctx: ProbeContext) -> u32 {
    let arg = |n| ctx.arg::<u64>(n).unwrap_or(0);
    on_inet_bind_entry(arg(0), arg(1), arg(2));
    0
}

#[kretprobe]
pub fn bindtrace_kretprobe_inet_bind(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i64 as i32;
    on_inet_bind_return(&ctx, ret, Backend::Kprobe, None);
    0
}

#[fentry(function = "inet_bind")]
pub fn bindtrace_fentry_inet_bind(ctx: FEntryContext) -> u32 {
    on_inet_bind_entry(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[fentry(function = "inet6_bind")]
pub fn bindtrace_fentry_inet6_bind(ctx: FEntryContext) -> u32 {
    on_inet_bind_entry(ctx.arg(0), ctx.arg(1), ctx.arg(2));
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
/// fentry program when it ran.
#[inline(always)]
fn on_fexit(ctx: &FExitContext) {
    let ret: i64 = ctx.arg(3);
    let args = (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2));
    on_inet_bind_return(ctx, ret as i32, Backend::Fexit, Some(args));
}

/// The start of every return hook: count the call, apply the task filters (`None`: filtered)
/// and take its in-flight entry, if the entry hook left one.
#[inline(always)]
fn returned_call() -> Option<(&'static ProbeConfig, u64, Option<InFlight>)> {
    count(stat::SEEN);
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !task_passes(cfg, (pid_tgid >> 32) as u32, current_comm) {
        count(stat::FILTERED);
        return None;
    }
    let tid = pid_tgid as u32;
    // SAFETY: the value stays valid until removed below; only this thread uses its key.
    let stashed = IN_FLIGHT.get_ptr(tid).map(|p| unsafe { core::ptr::read(p) });
    if stashed.is_some() {
        let _ = IN_FLIGHT.remove(tid);
    }
    Some((cfg, pid_tgid, stashed))
}

/// Return of inet_bind/inet6_bind (kretprobe, fexit).
#[inline(always)]
fn on_inet_bind_return<C: EbpfContext>(ctx: &C, ret: i32, backend: Backend, args: Option<(u64, u64, u64)>) {
    let Some((cfg, pid_tgid, stashed)) = returned_call() else {
        return;
    };
    let (entered_ns, socket, addr, addrlen) = match (stashed, args) {
        (stashed, Some((socket, addr, addrlen))) => {
            (stashed.map_or_else(|| unsafe { bpf_ktime_get_ns() }, |s| s.entered_ns), socket, addr, addrlen as u32)
        }
        (Some(s), None) => (s.entered_ns, s.socket, s.addr, s.addrlen),
        (None, None) => {
            count(stat::IN_FLIGHT_MISSING);
            return;
        }
    };
    complete(
        ctx,
        cfg,
        pid_tgid,
        Returned {
            entered_ns,
            addr: addr as *const u8,
            addr_in_kernel: true,
            socket: socket as *const u8,
            fd: -1,
            addrlen,
            ret,
            backend,
        },
    );
}

/// Copies the sockaddr the caller passed. Only the family is read when the length is too
/// short for it (bind() then fails with EINVAL, and the event still says so).
#[inline(always)]
fn read_requested_address(event: &mut BindEvent, addr: *const u8, in_kernel: bool, addrlen: u32) -> Result<(), i32> {
    if addr.is_null() || addrlen < 2 {
        event.sock_flags |= sock_flags::ADDR_SHORT;
        return Ok(());
    }
    // SAFETY: both helpers cope with any pointer.
    let read = |dst: &mut [u8]| unsafe {
        if in_kernel {
            bpf_probe_read_kernel_buf(addr, dst)
        } else {
            bpf_probe_read_user_buf(addr, dst)
        }
    };
    let mut head = [0u8; 2];
    read(&mut head)?;
    let family = u16::from_ne_bytes(head);
    event.family = family;
    match family {
        AF_INET => {
            if addrlen < SOCKADDR_IN_LEN {
                event.sock_flags |= sock_flags::ADDR_SHORT;
                return Ok(());
            }
            let mut raw = [0u8; SOCKADDR_IN_LEN as usize];
            read(&mut raw)?;
            event.port = u16::from_be_bytes([raw[2], raw[3]]);
            event.addr[..4].copy_from_slice(&raw[4..8]);
        }
        AF_INET6 => {
            if addrlen < SOCKADDR_IN6_LEN {
                event.sock_flags |= sock_flags::ADDR_SHORT;
                return Ok(());
            }
            let mut raw = [0u8; SOCKADDR_IN6_LEN as usize];
            read(&mut raw)?;
            event.port = u16::from_be_bytes([raw[2], raw[3]]);
            event.addr.copy_from_slice(&raw[8..24]);
            event.scope_id = u32::from_ne_bytes([raw[24], raw[25], raw[26], raw[27]]);
        }
        _ => {}
    }
    event.sock_flags |= sock_flags::ADDR_READ;
    Ok(())
}

#[inline(always)]
unsafe fn read_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    // SAFETY: bpf_probe_read_kernel copes with any address.
    let value = unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<*const u8>()) }.ok()?;
    if value.is_null() {
        None
    } else {
        Some(value)
    }
}

/// Walks task → files → fdtable → file → socket → sock and fills the socket fields and the
/// netns. Any failed read leaves `SOCK_INFO` clear; the event is still emitted.
#[inline(always)]
fn read_socket(event: &mut BindEvent, layout: &KernelLayout, fd: i32) {
    // SAFETY: every dereference goes through bpf_probe_read_kernel.
    let sk = unsafe { socket_of_fd(bpf_get_current_task() as *const u8, layout, fd) };
    read_sock(event, layout, sk);
}

/// Fills the socket fields from the `struct sock` (when there is one) and the netns, from
/// the sock or else from the calling task.
#[inline(always)]
fn read_sock(event: &mut BindEvent, layout: &KernelLayout, sk: Option<*const u8>) {
    // SAFETY: every dereference below goes through bpf_probe_read_kernel.
    unsafe {
        let net = match sk {
            Some(sk) => {
                fill_sock_fields(event, layout, sk);
                read_ptr(sk, layout.sock_net)
            }
            None => {
                let task = bpf_get_current_task() as *const u8;
                read_ptr(task, layout.task_nsproxy).and_then(|ns| read_ptr(ns, layout.nsproxy_net_ns))
            }
        };
        if let Some(net) = net {
            if let Ok(inum) = bpf_probe_read_kernel(net.add(layout.net_inum as usize).cast::<u32>()) {
                event.netns_ino = inum;
            }
        }
    }
}

#[inline(always)]
unsafe fn socket_of_fd(task: *const u8, layout: &KernelLayout, fd: i32) -> Option<*const u8> {
    if fd < 0 || layout.file_private_data == 0 {
        return None;
    }
    unsafe {
        let files = read_ptr(task, layout.task_files)?;
        let fdt = read_ptr(files, layout.files_fdt)?;
        let max_fds: u32 = bpf_probe_read_kernel(fdt.add(layout.fdtable_max_fds as usize).cast::<u32>()).ok()?;
        if fd as u32 >= max_fds {
            return None;
        }
        let fd_array = read_ptr(fdt, layout.fdtable_fd)?;
        let file = read_ptr(fd_array, (fd as u32) * 8)?;
        let socket = read_ptr(file, layout.file_private_data)?;
        // A socket's `file` points back at its file; anything else behind private_data
        // (the fd is not a socket) fails this check.
        if read_ptr(socket, layout.socket_file)? != file {
            return None;
        }
        read_ptr(socket, layout.socket_sk)
    }
}

#[inline(always)]
unsafe fn fill_sock_fields(event: &mut BindEvent, layout: &KernelLayout, sk: *const u8) {
    let mut sock = SockReader::new(sk);
    let Some(sock_type) = sock.field(&layout.sock_type) else {
        return;
    };
    event.sock_type = sock_type as u16;
    event.protocol = sock.field(&layout.sock_protocol).unwrap_or(0) as u16;
    event.bound_dev_if = sock.field(&layout.sock_bound_dev_if).unwrap_or(0);
    let mut flags = sock_flags::SOCK_INFO;
    let mut set = |loc: &FieldLoc, flag: u32| {
        if sock.field(loc).unwrap_or(0) != 0 {
            flags |= flag;
        }
    };
    set(&layout.sock_reuse, sock_flags::REUSEADDR);
    set(&layout.sock_reuseport, sock_flags::REUSEPORT);
    set(&layout.sock_ipv6only, sock_flags::V6ONLY);
    // inet_sock begins with struct sock, so these offsets apply to the same pointer.
    set(&layout.inet_freebind, sock_flags::FREEBIND);
    set(&layout.inet_transparent, sock_flags::TRANSPARENT);
    set(&layout.inet_bind_address_no_port, sock_flags::BIND_ADDRESS_NO_PORT);
    event.sock_flags |= flags;
    // Where the socket is bound now: the port the kernel picked for port 0, or, after
    // EINVAL, what the socket was already bound to.
    event.bound_port = sock.field(&layout.sock_num).unwrap_or(0) as u16;
    if event.family == AF_INET {
        if let Some(addr) = sock.word(layout.sock_rcv_saddr) {
            event.bound_addr4 = addr.to_le_bytes();
        }
    }
}

/// Reads fields of one `struct sock` with as few kernel reads as possible: the first
/// [`SOCK_HEAD`] bytes (skc_rcv_saddr, skc_num, skc_family, the skc_reuse bitfields,
/// skc_bound_dev_if) in one read, and each other 32-bit word once however many fields
/// share it. Every probe read is a helper call on the traced program's time.
struct SockReader {
    sk: *const u8,
    // Plain, always-initialised fields rather than Options of arrays: LLVM may otherwise
    // store undefined padding, which the verifier rejects ("R1 !read_ok").
    head: [u8; SOCK_HEAD],
    head_ok: bool,
    last_offset: u32,
    last_value: u32,
    last_ok: bool,
}

const SOCK_HEAD: usize = 32;

impl SockReader {
    #[inline(always)]
    fn new(sk: *const u8) -> Self {
        let mut head = [0u8; SOCK_HEAD];
        // SAFETY: bpf_probe_read_kernel_buf copes with any address.
        let head_ok = unsafe { bpf_probe_read_kernel_buf(sk, &mut head) }.is_ok();
        Self { sk, head, head_ok, last_offset: 0, last_value: 0, last_ok: false }
    }

    #[inline(always)]
    fn word(&mut self, offset: u32) -> Option<u32> {
        let at = offset as usize;
        if self.head_ok && at + 4 <= SOCK_HEAD {
            if let Some(bytes) = self.head.get(at..at + 4) {
                return Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            }
        }
        if self.last_ok && self.last_offset == offset {
            return Some(self.last_value);
        }
        // SAFETY: as above.
        let value = unsafe { bpf_probe_read_kernel(self.sk.add(at).cast::<u32>()) }.ok()?;
        self.last_offset = offset;
        self.last_value = value;
        self.last_ok = true;
        Some(value)
    }

    #[inline(always)]
    fn field(&mut self, loc: &FieldLoc) -> Option<u32> {
        if !loc.is_present() {
            return None;
        }
        self.word(loc.offset).map(|raw| loc.extract(raw))
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    let Some((cfg, pid_tgid, stashed)) = returned_call() else {
        return;
    };
    let Some(InFlight { entered_ns, addr, fd, addrlen, .. }) = stashed else {
        count(stat::IN_FLIGHT_MISSING);
        return;
    };
    // SAFETY: offset inside the tracepoint record.
    let ret = unsafe { ctx.read_at::<u64>(EXIT_RET) }.unwrap_or(0) as i64 as i32;
    complete(
        ctx,
        cfg,
        pid_tgid,
        Returned {
            entered_ns,
            addr: addr as *const u8,
            addr_in_kernel: false,
            socket: core::ptr::null(),
            fd,
            addrlen,
            ret,
            backend: Backend::Tracepoint,
        },
    );
}

/// Builds, filters and emits the event of a returned bind(), whatever hook saw it.
#[inline(always)]
fn complete<C: EbpfContext>(ctx: &C, cfg: &ProbeConfig, pid_tgid: u64, r: Returned) {
    let filter = &cfg.filter;
    if !filter.accepts_result(r.ret) {
        count(stat::FILTERED);
        return;
    }
    let mut event = BindEvent::zeroed();
    event.timestamp_ns = r.entered_ns;
    event.duration_ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(r.entered_ns);
    event.ret = r.ret;
    event.fd = r.fd;
    event.addrlen = r.addrlen;
    if read_requested_address(&mut event, r.addr, r.addr_in_kernel, r.addrlen).is_err() {
        count(stat::ADDR_READ_FAILED);
        debug!(ctx, "bindtrace: sockaddr of pid {} unreadable", (pid_tgid >> 32) as u32);
    }
    if !filter.accepts_port(event.port) || !filter.accepts_family(event.family) {
        count(stat::FILTERED);
        return;
    }
    if r.socket.is_null() {
        // After ENOTSOCK or EBADF the fd holds no socket of this call: do not look behind it.
        let socket_fd = if r.ret == -ENOTSOCK || r.ret == -EBADF { -1 } else { r.fd };
        read_socket(&mut event, &cfg.layout, socket_fd);
    } else {
        // SAFETY: reads go through bpf_probe_read_kernel.
        let sk = unsafe { read_ptr(r.socket, cfg.layout.socket_sk) };
        read_sock(&mut event, &cfg.layout, sk);
    }
    if !filter.accepts_protocol(event.protocol) {
        count(stat::FILTERED);
        return;
    }
    event.tgid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.comm = current_comm();
    let uid_gid = bpf_get_current_uid_gid();
    event.uid = uid_gid as u32;
    event.gid = (uid_gid >> 32) as u32;
    event.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    event.backend = r.backend as u8;

    if EVENTS.output::<BindEvent>(&event, wakeup_flags()).is_ok() {
        count(stat::EMITTED);
    } else {
        count(stat::RINGBUF_FULL);
    }
}

/// Wake the reader for this record only when it has not been woken for [`WAKEUP_INTERVAL_NS`]
/// or the unread data passes [`WAKEUP_BYTES`]: one wake-up per record costs the traced
/// program more than the record itself. Userspace drains again shortly after any batch, so a
/// record that woke nobody waits at most that long (see the tracer's pipeline).
#[inline(always)]
fn wakeup_flags() -> u64 {
    let now = unsafe { bpf_ktime_get_ns() };
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: an array slot; a racing CPU at worst causes one extra or one fewer wake-up.
    let last = unsafe { &mut *last };
    if pending >= WAKEUP_BYTES || now.saturating_sub(*last) >= WAKEUP_INTERVAL_NS {
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
