//! The shared end of every return hook: the filters, the record, the ring buffer.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_ktime_get_ns, generated,
    },
    EbpfContext,
};
use aya_log_ebpf::debug;
use bindtrace_common::{
    filter_flags, kernel_helpers, op, sock_flags, sockaddr::Requested, stat, Backend, BindEvent, KernelLayout,
    ProbeConfig, TreePlace, UnixBindEvent, AF_INET, AF_INET6, AF_UNIX, COMM_LEN, MAX_CGROUPS, NO_MEMBER, UNIX_PATH_MAX,
    WAKEUP_BYTES_MIN_INTERVAL_NS, WAKEUP_INTERVAL_NS,
};

use crate::{
    maps::{config, count, EVENTS, FILTER_PIDS, LAST_WAKEUP, SELECTED_CGROUPS},
    sock::{bound_v6, kernel_read, read_sock, sock_of_fd, SockInfo},
    sockaddr::read_requested_address,
    tree::place_of,
};

/// How a backend reaches the bound socket. A separate variant per backend, not a nullable
/// pointer: each hook builds a constant variant, so the compiler drops the other arm, and the
/// fexit and kprobe programs never contain the fd walk (whose helpers a 5.10 kernel lacks).
#[derive(Clone, Copy)]
pub(crate) enum SocketRef {
    /// The syscall's fd, looked up in the calling task's file table.
    Fd(i32),
    /// The `struct socket *` the kernel function received.
    Socket(*const u8),
}

/// Everything a backend knows when bind() returns, handed to [`complete`].
pub(crate) struct Returned {
    /// `None` when this call's entry was not seen (see [`entry_time`]).
    pub(crate) entered_ns: Option<u64>,
    pub(crate) addr: *const u8,
    pub(crate) addr_in_kernel: bool,
    pub(crate) socket: SocketRef,
    pub(crate) fd: i32,
    pub(crate) addrlen: u32,
    pub(crate) ret: i32,
    pub(crate) backend: Backend,
    /// `bindtrace_common::op`: a bind, or a failed listen() (whose address is the socket's).
    pub(crate) op: u8,
}

pub(crate) const BPF_RB_NO_WAKEUP: u64 = 1;
pub(crate) const BPF_RB_FORCE_WAKEUP: u64 = 2;
pub(crate) const BPF_RB_AVAIL_DATA: u64 = 0;
pub(crate) const ENOTSOCK: i32 = 88;
pub(crate) const EBADF: i32 = 9;

/// The thread's name when the `--comm` filter read it (`read`), kept for the event. Plain,
/// always-initialised scalars: an Option here left padding the verifier rejects
/// ("R3 !read_ok"), and a zeroed byte array becomes a memset call (see `bindtrace_common::sockaddr::Requested`).
pub(crate) struct TaskName {
    pub(crate) words: (u64, u64),
    pub(crate) read: bool,
}

impl TaskName {
    #[inline(always)]
    pub(crate) fn unread() -> Self {
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

/// Task-based filters (pid, process tree, cgroup, comm). The name is fetched only when a --comm filter needs it
/// (the verifier prunes this otherwise), and left in `name` for the event.
#[inline(always)]
pub(crate) fn task_passes(cfg: &ProbeConfig, tgid: u32, name: &mut TaskName) -> bool {
    let filter = &cfg.filter;
    if filter.excludes_tgid(tgid) {
        return false;
    }
    // SAFETY: the value is never dereferenced, only tested for presence.
    if filter.is_active(filter_flags::PIDS) && unsafe { FILTER_PIDS.get(tgid) }.is_none() {
        return false;
    }
    if filter.is_active(filter_flags::TREE) && place_of(tgid).is_none() {
        return false;
    }
    if filter.is_active(filter_flags::CGROUPS) && !in_selected_cgroup(cfg) {
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

/// Is the calling task in one of the selected cgroups, or below one? Its ancestor at each
/// selected cgroup's level is compared with that cgroup (0 when the task sits higher up); or
/// it is a newer cgroup in the same parent (see `bindtrace_common::CgroupSlot`).
#[inline(always)]
fn in_selected_cgroup(cfg: &ProbeConfig) -> bool {
    let (filter, layout) = (&cfg.filter, &cfg.layout);
    let helper = layout.has_helper(kernel_helpers::ANCESTOR_CGROUP_ID);
    // Without the helper (tracing programs before 5.14): the task's v2 cgroup, read once.
    let cgroup: *const u8 = if helper {
        core::ptr::null()
    } else {
        // A read that faults yields null, and the ids read through null are 0, which no
        // cgroup has.
        // SAFETY: a helper without arguments.
        let task = unsafe { generated::bpf_get_current_task() } as *const u8;
        let css_set: *const u8 = kernel_read(task.wrapping_add(layout.task_cgroups as usize));
        kernel_read(css_set.wrapping_add(layout.css_set_dfl_cgrp as usize))
    };
    let level: i32 = if helper { 0 } else { kernel_read(cgroup.wrapping_add(layout.cgroup_level as usize)) };
    let mut i = 0;
    while i < MAX_CGROUPS {
        if i as u32 >= filter.cgroup_count {
            break;
        }
        let Some(slot) = SELECTED_CGROUPS.get(i as u32).copied() else {
            break;
        };
        let ancestor = ancestor_at(layout, helper, cgroup, level, slot.level);
        // 0 is no cgroup (an unset slot; the ancestor of a task that sits higher up).
        if slot.id != 0 && ancestor == slot.id {
            return true;
        }
        if slot.parent_id != 0
            && slot.level > 0
            && ancestor > slot.id
            && ancestor_at(layout, helper, cgroup, level, slot.level - 1) == slot.parent_id
        {
            return true;
        }
        i += 1;
    }
    false
}

/// The id of the calling task's cgroup ancestor at depth `want` (0 when the task sits
/// higher up): from the helper, or from `cgroup` (the task's own, at depth `level`).
#[inline(always)]
fn ancestor_at(layout: &KernelLayout, helper: bool, cgroup: *const u8, level: i32, want: u32) -> u64 {
    if helper {
        // SAFETY: a helper without memory arguments.
        unsafe { generated::bpf_get_current_ancestor_cgroup_id(want as i32) }
    } else if want as i64 > level as i64 {
        0
    } else if layout.cgroup_ancestor_ids != 0 {
        // Before 6.1: the ancestors' ids, root first.
        let at = layout.cgroup_ancestor_ids as usize + 8 * want as usize;
        // A read that faults yields 0.
        kernel_read::<u64>(cgroup.wrapping_add(at))
    } else {
        // Since 6.1: pointers to the ancestors, root first; an id is its kernfs node's.
        let at = layout.cgroup_ancestors as usize + 8 * want as usize;
        let ancestor: *const u8 = kernel_read(cgroup.wrapping_add(at));
        let node: *const u8 = kernel_read(ancestor.wrapping_add(layout.cgroup_kn as usize));
        kernel_read::<u64>(node.wrapping_add(layout.kernfs_node_id as usize))
    }
}

/// The calling thread's name, NUL-padded; read into words so that nothing is zero-filled
/// byte by byte first (the helper fills all 16 bytes, or zeroes them when it fails).
#[inline(always)]
pub(crate) fn current_comm() -> [u8; COMM_LEN] {
    let mut comm = MaybeUninit::<[u64; COMM_LEN / 8]>::uninit();
    // SAFETY: the helper writes all COMM_LEN bytes; [u64; 2] and [u8; 16] have the same size.
    unsafe {
        generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), COMM_LEN as u32);
        core::mem::transmute(comm.assume_init())
    }
}

/// Who is returning from bind(), as the return hooks' prologue found out.
pub(crate) struct Caller {
    pub(crate) cfg: &'static ProbeConfig,
    pub(crate) pid_tgid: u64,
    pub(crate) name: TaskName,
}

/// The start of every return hook: count the call and apply the result and task filters
/// (`None`: filtered, counted).
#[inline(always)]
pub(crate) fn returned_call(ret: i32) -> Option<Caller> {
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

/// Builds, filters and emits the event of a returned bind(), whatever hook saw it. The
/// record is assembled from locals in one struct literal: no zero-fill first (see
/// `bindtrace_common::sockaddr::Requested`).
#[inline(always)]
pub(crate) fn complete<C: EbpfContext>(ctx: &C, caller: Caller, r: Returned) {
    let Caller { cfg, pid_tgid, name } = caller;
    let filter = &cfg.filter;
    let listen = r.op == op::LISTEN;
    // A bind's address is what the caller asked for, filtered before the socket is read; a
    // listen()'s is where the socket is bound, known only once it is read.
    let asked = if listen {
        Requested::none(0)
    } else {
        let req = read_requested_address(r.addr, r.addr_in_kernel, r.addrlen);
        if req.flags & sock_flags::ADDR_FAULT != 0 {
            count(stat::ADDR_READ_FAILED);
            debug!(ctx, "bindtrace: sockaddr of pid {} unreadable", (pid_tgid >> 32) as u32);
        }
        if !filter.accepts_address(req.family, req.port) || !filter.accepts_family(req.family) {
            count(stat::FILTERED);
            return;
        }
        req
    };
    let sk = match r.socket {
        SocketRef::Fd(fd) => {
            // After ENOTSOCK or EBADF the fd holds no socket of this call: do not look behind it.
            let socket_fd = if r.ret == -ENOTSOCK || r.ret == -EBADF { -1 } else { fd };
            sock_of_fd(&cfg.layout, socket_fd)
        }
        SocketRef::Socket(socket) => kernel_read(socket.wrapping_add(cfg.layout.socket_sk as usize)),
    };
    let sock = read_sock(&cfg.layout, sk);
    let req = if listen {
        let bound = bound_address(&cfg.layout, sk, &sock);
        if !filter.accepts_address(bound.family, bound.port) || !filter.accepts_family(bound.family) {
            count(stat::FILTERED);
            return;
        }
        bound
    } else {
        asked
    };
    if !filter.accepts_protocol(sock.protocol) {
        count(stat::FILTERED);
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (timestamp_ns, duration_ns, entry_flag) = match r.entered_ns {
        Some(entered_ns) => (entered_ns, now.saturating_sub(entered_ns), 0),
        None => {
            count(stat::NO_ENTRY_TIME);
            (now, 0, sock_flags::NO_ENTRY_TIME)
        }
    };
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: a helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // A failure keeps what its diagnosis reads of the task, which may exit at once.
    let task = if r.ret < 0 { task_facts(&cfg.layout) } else { TaskFacts::default() };
    // A second lookup of what `task_passes` found (it cannot hand it here through the
    // kprobe entries), only when following a tree.
    let (tree, tree_flag) = match filter.is_active(filter_flags::TREE).then(|| place_of((pid_tgid >> 32) as u32)) {
        Some(Some(place)) => (place, sock_flags::IN_TREE),
        _ => (TreePlace::default(), 0),
    };
    // SAFETY: same size; any bytes are valid u8s.
    let addr: [u8; 16] = unsafe { core::mem::transmute(req.addr) };
    // A macro, not a value: each branch writes the literal straight into its ring-buffer
    // record, with no copy of the 136 bytes on the stack first.
    macro_rules! event {
        () => {
            BindEvent {
                timestamp_ns,
                duration_ns,
                cgroup_id,
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
                sock_flags: req.flags | sock.flags | entry_flag | task.flag | tree_flag,
                family: req.family,
                port: req.port,
                sock_type: sock.sock_type,
                protocol: sock.protocol,
                bound_port: sock.bound_port,
                backend: r.backend as u8,
                op: r.op,
                bound_addr4: sock.bound_addr4.to_le_bytes(),
                sock_family: sock.family,
                tree_depth: tree.depth.min(u32::from(u16::MAX)) as u16,
                mnt_ns_ino: task.mnt_ns_ino,
                tree_parent: tree.parent,
                cap_effective: task.cap_effective,
            }
        };
    }
    if req.family == AF_UNIX && req.flags & sock_flags::ADDR_READ != 0 {
        let Some(mut entry) = EVENTS.reserve::<UnixBindEvent>(0) else {
            count(stat::RINGBUF_FULL);
            return;
        };
        let record = entry.as_mut_ptr();
        let event = event!();
        // SAFETY: `record` is the reserved, exclusively owned ring-buffer slot; the path is
        // copied into it directly (bounded by UNIX_PATH_MAX) and bytes past `path_len` are
        // never read.
        unsafe {
            (*record).event = event;
            let path_len = unix_path_len(r.addrlen);
            (*record).path_len = path_len;
            (*record)._reserved = 0;
            let copied = if r.addr_in_kernel {
                generated::bpf_probe_read_kernel(
                    (&raw mut (*record).path).cast(),
                    path_len,
                    r.addr.wrapping_add(2).cast(),
                )
            } else {
                generated::bpf_probe_read_user(
                    (&raw mut (*record).path).cast(),
                    path_len,
                    r.addr.wrapping_add(2).cast(),
                )
            };
            if copied != 0 {
                // Not "(autobind)": the path was there but could not be read.
                (*record).path_len = 0;
                (*record).event.sock_flags =
                    ((*record).event.sock_flags & !sock_flags::ADDR_READ) | sock_flags::ADDR_FAULT;
            }
        }
        entry.submit(wakeup_flags(cfg, now));
        count(stat::EMITTED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<BindEvent>(0) else {
        count(stat::RINGBUF_FULL);
        return;
    };
    entry.write(event!());
    entry.submit(wakeup_flags(cfg, now));
    count(stat::EMITTED);
}

/// What a failure's diagnosis needs of the calling task after it may have exited.
#[derive(Default)]
struct TaskFacts {
    mnt_ns_ino: u32,
    cap_effective: u64,
    /// [`sock_flags::TASK_FACTS`] once read.
    flag: u32,
}

/// The task's mount namespace and effective capabilities (`cred.cap_effective`: the
/// kernel's `kernel_cap_t`, two u32 words before 6.3 and one u64 since, the same 8 bytes on
/// little-endian).
#[inline(always)]
fn task_facts(layout: &KernelLayout) -> TaskFacts {
    if layout.task_cred == NO_MEMBER || layout.nsproxy_mnt_ns == NO_MEMBER {
        return TaskFacts::default();
    }
    // SAFETY: a helper without arguments; every dereference below is a kernel_read.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy: *const u8 = kernel_read(task.wrapping_add(layout.task_nsproxy as usize));
    let mnt_ns: *const u8 = kernel_read(nsproxy.wrapping_add(layout.nsproxy_mnt_ns as usize));
    let cred: *const u8 = kernel_read(task.wrapping_add(layout.task_cred as usize));
    TaskFacts {
        mnt_ns_ino: kernel_read(mnt_ns.wrapping_add(layout.mnt_ns_inum as usize)),
        cap_effective: kernel_read(cred.wrapping_add(layout.cred_cap_effective as usize)),
        flag: sock_flags::TASK_FACTS,
    }
}

/// Where a socket is bound, as the address of a failed listen(): its family, local port and
/// address (`skc_rcv_saddr`, or `skc_v6_rcv_saddr` for IPv6).
#[inline(always)]
fn bound_address(layout: &KernelLayout, sk: *const u8, sock: &SockInfo) -> Requested {
    let mut bound = Requested::none(0);
    bound.family = sock.family;
    if sock.family == AF_INET {
        bound.addr = [u64::from(sock.bound_addr4), 0];
    } else if sock.family == AF_INET6 {
        bound.addr = bound_v6(layout, sk);
    } else {
        return bound;
    }
    bound.port = sock.bound_port;
    bound.flags = sock_flags::ADDR_READ;
    bound
}

/// Bytes of `sun_path` in a sockaddr_un of `addrlen` bytes, at most [`UNIX_PATH_MAX`]: the
/// mask and the bound are what let the verifier accept it as a copy length.
#[inline(always)]
fn unix_path_len(addrlen: u32) -> u32 {
    let len = addrlen.saturating_sub(2) & 0xff;
    if len > UNIX_PATH_MAX as u32 {
        UNIX_PATH_MAX as u32
    } else {
        len
    }
}

/// Wake the reader for this record only when it has not been woken for
/// [`WAKEUP_INTERVAL_NS`], or when `wakeup_bytes` are unread: see `bindtrace_common`. A record
/// that woke nobody is found by the reader's polling, which lasts longer than the interval.
#[inline(always)]
pub(crate) fn wakeup_flags(cfg: &ProbeConfig, now: u64) -> u64 {
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
