//! The one header both sides of bindtrace share: the record the probe writes into the ring
//! buffer, the configuration the tracer writes into the probe before load, and the filter
//! predicates, so the kernel and userspace decide "does this event pass" with the same code.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers: it crosses the
//! kernel/user boundary as raw bytes.
#![no_std]

/// Length of `task_struct.comm`, including the NUL.
pub const COMM_LEN: usize = 16;
/// Most port ranges `--port` accepts; the probe walks them in a bounded loop.
pub const MAX_PORT_RANGES: usize = 16;
/// Most cgroups `--container` and `--cgroup` select together.
pub const MAX_CGROUPS: usize = 8;
/// One slot of the `SELECTED_CGROUPS` map: a task passes when its cgroup ancestor at `level`
/// is `id` (id 0: an unused slot); or, with `parent_id` set, when that ancestor is a cgroup
/// made after `id` (ids only grow) in the same parent: a restarted container or unit, whose
/// new cgroup its first binds run in before the tracer can learn its id. The tracer checks
/// those by path, and moves `id` to the new cgroup once it sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CgroupSlot {
    pub id: u64,
    pub parent_id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// Errnos 1..=254 have their own bit in [`FilterConfig::results`]; larger ones share bit 255.
pub const ERRNO_BITS: usize = 256;

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

pub mod sockaddr;

/// Names of the maps and globals in the probe object, used by the loader to find them.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const INET_BIND_ARGS: &str = "INET_BIND_ARGS";
    pub const THREAD_ENTRIES: &str = "THREAD_ENTRIES";
    pub const ATTACH_STATE: &str = "ATTACH_STATE";
    pub const STATS: &str = "STATS";
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    pub const SELECTED_CGROUPS: &str = "SELECTED_CGROUPS";
    pub const FOLLOWED: &str = "FOLLOWED";
    /// The process-tree programs (`bindtrace -- CMD`, `--tree PID`) on `sched:` tracepoints.
    pub const PROG_TREE_FORK: &str = "bindtrace_sched_process_fork";
    pub const PROG_TREE_EXIT: &str = "bindtrace_sched_process_exit";
    pub const PROG_TREE_EXEC: &str = "bindtrace_sched_process_exec";
    pub const CONFIG: &str = "BINDTRACE_CONFIG";
    pub const PROG_ENTER_BIND: &str = "bindtrace_sys_enter_bind";
    pub const PROG_EXIT_BIND: &str = "bindtrace_sys_exit_bind";
    pub const PROG_KPROBE_INET_BIND: &str = "bindtrace_kprobe_inet_bind";
    pub const PROG_KRETPROBE_INET_BIND: &str = "bindtrace_kretprobe_inet_bind";
    /// The fexit backend: a program pair per inet_bind function.
    pub const PROG_FENTRY_INET_BIND: &str = "bindtrace_fentry_inet_bind";
    pub const PROG_FEXIT_INET_BIND: &str = "bindtrace_fexit_inet_bind";
    pub const PROG_FENTRY_INET6_BIND: &str = "bindtrace_fentry_inet6_bind";
    pub const PROG_FEXIT_INET6_BIND: &str = "bindtrace_fexit_inet6_bind";
    /// The kernel functions the inet_bind backends hook.
    pub const INET_BIND_FUNCTIONS: [&str; 2] = ["inet_bind", "inet6_bind"];
    /// What every bind(2) goes through, whatever the family and the outcome (compat and
    /// socketcall callers too): the fexit and kprobe backends hook it as well, and the
    /// inet_bind hooks then report only binds that do not come through it (io_uring's, the
    /// kernel's own).
    pub const SYSCALL_BIND_FUNCTION: &str = "__sys_bind";
    pub const PROG_FENTRY_SYS_BIND: &str = "bindtrace_fentry_sys_bind";
    pub const PROG_FEXIT_SYS_BIND: &str = "bindtrace_fexit_sys_bind";
    pub const PROG_KPROBE_SYS_BIND: &str = "bindtrace_kprobe_sys_bind";
    pub const PROG_KRETPROBE_SYS_BIND: &str = "bindtrace_kretprobe_sys_bind";
    /// listen(2): the failures are traced too (`op::LISTEN`).
    pub const SYSCALL_LISTEN_FUNCTION: &str = "__sys_listen";
    pub const PROG_ENTER_LISTEN: &str = "bindtrace_sys_enter_listen";
    pub const PROG_EXIT_LISTEN: &str = "bindtrace_sys_exit_listen";
    pub const PROG_FENTRY_SYS_LISTEN: &str = "bindtrace_fentry_sys_listen";
    pub const PROG_FEXIT_SYS_LISTEN: &str = "bindtrace_fexit_sys_listen";
    pub const PROG_KPROBE_SYS_LISTEN: &str = "bindtrace_kprobe_sys_listen";
    pub const PROG_KRETPROBE_SYS_LISTEN: &str = "bindtrace_kretprobe_sys_listen";
    /// The kprobe backend's backstops: bind(2)'s and listen(2)'s exit tracepoints, which
    /// report a call whose kretprobe the kernel skipped.
    pub const PROG_BACKSTOP_BIND: &str = "bindtrace_sys_exit_bind_backstop";
    pub const PROG_BACKSTOP_LISTEN: &str = "bindtrace_sys_exit_listen_backstop";
}

/// Which kernel hook produced an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Tracepoint = 1,
    Kprobe = 2,
    Fexit = 3,
}

impl Backend {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::Tracepoint),
            2 => Some(Self::Kprobe),
            3 => Some(Self::Fexit),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
            Self::Fexit => "fexit",
        }
    }
}

/// [`BindEvent::op`]: which call the event is about.
pub mod op {
    /// bind(2) (or an in-kernel bind): `family`/`addr`/`port` are what was asked for.
    pub const BIND: u8 = 0;
    /// A listen(2) that failed (EADDRINUSE when another socket already listens on the
    /// address, or no ephemeral port was free for an unbound socket): `family`/`addr`/`port`
    /// are where the socket is bound.
    pub const LISTEN: u8 = 1;
}

/// Bits of [`BindEvent::sock_flags`].
pub mod sock_flags {
    /// The kernel socket behind the fd was found; the fields below and `sock_type`,
    /// `protocol` and `bound_dev_if` are meaningful only with this bit set.
    pub const SOCK_INFO: u32 = 1 << 0;
    /// SO_REUSEADDR (`skc_reuse` non-zero).
    pub const REUSEADDR: u32 = 1 << 1;
    /// SO_REUSEPORT.
    pub const REUSEPORT: u32 = 1 << 2;
    /// IPV6_V6ONLY.
    pub const V6ONLY: u32 = 1 << 3;
    /// IP_FREEBIND.
    pub const FREEBIND: u32 = 1 << 4;
    /// IP_TRANSPARENT.
    pub const TRANSPARENT: u32 = 1 << 5;
    /// IP_BIND_ADDRESS_NO_PORT.
    pub const BIND_ADDRESS_NO_PORT: u32 = 1 << 6;
    /// Every bit that describes the socket (cleared together when the fd was no socket).
    pub const SOCKET_BITS: u32 =
        SOCK_INFO | REUSEADDR | REUSEPORT | V6ONLY | FREEBIND | TRANSPARENT | BIND_ADDRESS_NO_PORT;
    /// The requested sockaddr could be copied from the caller; without it `addr`/`port` are 0.
    pub const ADDR_READ: u32 = 1 << 8;
    /// The sockaddr was shorter than its family needs (`addrlen` tells by how much).
    pub const ADDR_SHORT: u32 = 1 << 9;
    /// The probe did not see this bind's entry: `timestamp_ns` is the return's time and
    /// `duration_ns` is unknown (0).
    pub const NO_ENTRY_TIME: u32 = 1 << 10;
    /// The sockaddr pointer was NULL (bind() fails with EFAULT or EINVAL).
    pub const ADDR_NULL: u32 = 1 << 11;
    /// Copying the sockaddr from the caller's memory faulted (an unmapped pointer: EFAULT).
    pub const ADDR_FAULT: u32 = 1 << 12;
    /// `mnt_ns_ino` and `cap_effective` were read (a failure, on a kernel whose BTF has the
    /// members).
    pub const TASK_FACTS: u32 = 1 << 13;
    /// The caller belongs to the followed process tree (`bindtrace -- CMD`, `--tree PID`):
    /// [`BindEvent::tree_parent`](super::BindEvent::tree_parent) and
    /// [`BindEvent::tree_depth`](super::BindEvent::tree_depth) say where.
    pub const IN_TREE: u32 = 1 << 14;
}

/// Where a process sits in the followed tree: the value of the `FOLLOWED` map, keyed by tgid
/// (and by the tid of each thread the tree creates, so that its exit can remove it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TreePlace {
    /// The process that forked it (kept when it is re-parented, a daemon's double fork); for
    /// the tree's root, its parent when following began.
    pub parent: u32,
    /// 0 for the root, 1 for its children, ...
    pub depth: u32,
}

/// One bind attempt, as the probe writes it into the ring buffer.
///
/// The address and port are the ones the caller *asked for*, copied from the syscall's
/// arguments, so they survive a failed bind (the kernel resets the socket's own address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BindEvent {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) when bind() was entered.
    pub timestamp_ns: u64,
    /// Time spent inside bind().
    pub duration_ns: u64,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// Requested address in network byte order; an IPv4 address fills the first 4 bytes.
    pub addr: [u8; 16],
    /// `task_struct.comm` of the calling thread, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// Inode of the socket's network namespace (the caller's when the socket was not found).
    pub netns_ino: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// bind()'s return value: 0 or a negative errno.
    pub ret: i32,
    pub fd: i32,
    /// The addrlen argument.
    pub addrlen: u32,
    /// sin6_scope_id for IPv6.
    pub scope_id: u32,
    /// SO_BINDTODEVICE ifindex (`skc_bound_dev_if`), 0 if none.
    pub bound_dev_if: u32,
    /// [`sock_flags`] bits.
    pub sock_flags: u32,
    /// sa_family of the requested sockaddr (any value, not only AF_INET/AF_INET6).
    pub family: u16,
    /// Requested port, host byte order.
    pub port: u16,
    /// SOCK_STREAM, SOCK_DGRAM, ... (with SOCK_INFO).
    pub sock_type: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, ... (with SOCK_INFO).
    pub protocol: u16,
    /// The socket's local port when bind() returned (`skc_num`): the port the kernel chose
    /// for a port-0 bind, or for EINVAL the port the socket was already bound to.
    pub bound_port: u16,
    /// [`Backend`] as u8.
    pub backend: u8,
    /// [`op`]: a bind, or a listen() that failed (its address is the socket's own).
    pub op: u8,
    /// The socket's IPv4 local address when bind() returned (`skc_rcv_saddr`), network order;
    /// meaningful for AF_INET requests with SOCK_INFO only.
    pub bound_addr4: [u8; 4],
    /// The socket's own family (`skc_family`, with SOCK_INFO): the domain it was created in,
    /// which a wrong sockaddr may contradict.
    pub sock_family: u16,
    /// Depth in the followed process tree (with [`sock_flags::IN_TREE`]): 0 is its root.
    pub tree_depth: u16,
    /// Inode of the calling task's mount namespace (with [`sock_flags::TASK_FACTS`], failures
    /// only): where its AF_UNIX path is, even after it has exited.
    pub mnt_ns_ino: u32,
    /// The process that forked the caller's process (with [`sock_flags::IN_TREE`]; see
    /// [`TreePlace::parent`]).
    pub tree_parent: u32,
    /// The calling task's effective capabilities (`cred.cap_effective`) when bind() returned
    /// (with [`sock_flags::TASK_FACTS`], failures only): what the kernel checked, not what
    /// /proc says later (or nothing, once it has exited).
    pub cap_effective: u64,
}

/// Size of one ring-buffer record of an inet (or any non-AF_UNIX) bind.
pub const BIND_EVENT_SIZE: usize = core::mem::size_of::<BindEvent>();
const _: () = assert!(BIND_EVENT_SIZE == 136);

/// `sizeof(((struct sockaddr_un *)0)->sun_path)`.
pub const UNIX_PATH_MAX: usize = 108;

/// The record of an AF_UNIX bind: the event, then the path that was asked for. A record of
/// its own so that inet binds, nearly all of them, do not carry 112 unused bytes through the
/// ring buffer; the decoder tells the two apart by size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UnixBindEvent {
    pub event: BindEvent,
    /// Bytes of `path` that are the caller's (`addrlen` - 2, at most 108); the rest is
    /// undefined. A path-named socket's path ends at its first NUL; an abstract name starts
    /// with NUL and is all `path_len` bytes.
    pub path_len: u32,
    pub _reserved: u32,
    pub path: [u8; UNIX_PATH_MAX],
    pub _tail: [u8; 4],
}

pub const UNIX_BIND_EVENT_SIZE: usize = core::mem::size_of::<UnixBindEvent>();
const _: () = assert!(UNIX_BIND_EVENT_SIZE == BIND_EVENT_SIZE + 8 + UNIX_PATH_MAX + 4);

impl BindEvent {
    pub const fn zeroed() -> Self {
        Self {
            timestamp_ns: 0,
            duration_ns: 0,
            cgroup_id: 0,
            addr: [0; 16],
            comm: [0; COMM_LEN],
            netns_ino: 0,
            tgid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            ret: 0,
            fd: 0,
            addrlen: 0,
            scope_id: 0,
            bound_dev_if: 0,
            sock_flags: 0,
            family: 0,
            port: 0,
            sock_type: 0,
            protocol: 0,
            bound_port: 0,
            backend: 0,
            op: 0,
            bound_addr4: [0; 4],
            sock_family: 0,
            tree_depth: 0,
            mnt_ns_ino: 0,
            tree_parent: 0,
            cap_effective: 0,
        }
    }
}

/// Indices of the per-CPU counters in the `STATS` array.
pub mod stat {
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
}

/// Where a struct member lives, resolved from the running kernel's BTF by the tracer.
///
/// The probe reads `(u32 at base + offset) >> bit_shift`, masked to `bit_width` bits;
/// a plain u8/u16/u32 member has `bit_shift` 0 and `bit_width` 8/16/32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FieldLoc {
    pub offset: u32,
    pub bit_shift: u8,
    /// 0 when the kernel has no such member: the probe then leaves the field unset.
    pub bit_width: u8,
    pub _reserved: [u8; 2],
}

impl FieldLoc {
    pub const ABSENT: Self = Self { offset: 0, bit_shift: 0, bit_width: 0, _reserved: [0; 2] };

    pub const fn is_present(&self) -> bool {
        self.bit_width != 0
    }

    /// Extracts this field from the 32 bits read at its offset.
    #[inline(always)]
    pub const fn extract(&self, raw: u32) -> u32 {
        let shifted = raw >> (self.bit_shift & 31);
        if self.bit_width >= 32 {
            shifted
        } else {
            shifted & ((1u32 << self.bit_width) - 1)
        }
    }
}

/// Offsets the probe needs to walk from the current task to the socket behind an fd.
/// Pointer members are byte offsets; value members are [`FieldLoc`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KernelLayout {
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdtable_max_fds: u32,
    /// `fdtable.fd`
    pub fdtable_fd: u32,
    /// `file.private_data`
    pub file_private_data: u32,
    /// `socket.file`
    pub socket_file: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `nsproxy.net_ns`
    pub nsproxy_net_ns: u32,
    /// `sock.__sk_common.skc_net` (a `possible_net_t`, whose first member is the pointer)
    pub sock_net: u32,
    /// `net.ns.inum`
    pub net_inum: u32,
    /// Offsets in `struct pt_regs` of the saved registers holding a syscall's first three
    /// arguments (x86_64: di, si, dx).
    pub syscall_args: [u32; 3],
    /// `sock.__sk_common.skc_rcv_saddr`
    pub sock_rcv_saddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr` (0: the kernel has no IPv6).
    pub sock_v6_rcv_saddr: u32,
    /// The task's cgroup v2 ancestors, for `--cgroup` on kernels whose tracing programs may
    /// not call `bpf_get_current_ancestor_cgroup_id` (before 5.14): `task_struct.cgroups`,
    /// `css_set.dfl_cgrp`, `cgroup.level`, and the ancestors' ids: `cgroup.ancestor_ids`
    /// (before 6.1) or `cgroup.ancestors` with `cgroup.kn` and `kernfs_node.id` (0: absent).
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestor_ids: u32,
    pub cgroup_ancestors: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub sock_family: FieldLoc,
    pub sock_type: FieldLoc,
    pub sock_protocol: FieldLoc,
    pub sock_reuse: FieldLoc,
    pub sock_reuseport: FieldLoc,
    pub sock_ipv6only: FieldLoc,
    pub sock_bound_dev_if: FieldLoc,
    /// `sock.__sk_common.skc_num`
    pub sock_num: FieldLoc,
    /// IP_FREEBIND: a bit of `inet_sock.inet_flags` since 6.6, a bitfield before.
    pub inet_freebind: FieldLoc,
    pub inet_transparent: FieldLoc,
    pub inet_bind_address_no_port: FieldLoc,
    /// [`kernel_helpers`] bits: which optional BPF helpers this kernel has. The probe takes
    /// another path where one is missing; the verifier, which sees this read-only value,
    /// never looks at the call it cannot make.
    pub kernel_helpers: u32,
    /// Where `struct pt_regs` keeps the number of the syscall under way (x86_64 `orig_ax`,
    /// arm64 `syscallno`; [`NO_MEMBER`]: unknown), and the numbers of bind(2) on this
    /// architecture (native, compat, and compat socketcall; [`NO_MEMBER`] where none): with
    /// `bpf_task_pt_regs`, the inet_bind hooks know they run inside bind(2) from these, not
    /// from a mark an entry hook left (which a skipped entry hook never leaves).
    pub pt_regs_syscall_nr: u32,
    pub bind_syscall_nrs: [u32; 3],
    /// What a failure records of its task ([`sock_flags::TASK_FACTS`]): `nsproxy.mnt_ns`,
    /// `mnt_namespace.ns.inum`, `task_struct.cred`, `cred.cap_effective` ([`NO_MEMBER`]: not
    /// recorded).
    pub nsproxy_mnt_ns: u32,
    pub mnt_ns_inum: u32,
    pub task_cred: u32,
    pub cred_cap_effective: u32,
    /// The process tree (`bindtrace -- CMD`, `--tree PID`): `task_struct.signal` and
    /// `signal_struct.live` (a thread group's live threads: 0 once its last thread exits;
    /// [`NO_MEMBER`]: absent), and the offsets of `child_pid` in the `sched:sched_process_fork`
    /// record and of `old_pid` in `sched:sched_process_exec`'s (from tracefs: the records'
    /// layouts differ by kernel; 0 when not following).
    pub task_signal: u32,
    pub signal_live: u32,
    pub fork_child_pid: u32,
    pub exec_old_pid: u32,
}

/// A member the kernel's BTF does not have, or a number that does not exist.
pub const NO_MEMBER: u32 = u32::MAX;

/// Indexes of the `ATTACH_STATE` array, which the tracer writes once attached.
pub mod attach_state {
    /// When attaching ended (CLOCK_MONOTONIC ns; 0 before).
    pub const ATTACHED_AT: u32 = 0;
    /// 1 when the backend's hooks on `__sys_bind` are attached (its inet_bind hooks then
    /// stand aside inside bind(2)).
    pub const SYSCALL_HOOKED: u32 = 1;
    pub const COUNT: u32 = 2;
}

impl KernelLayout {
    /// Does this kernel have the helper behind a [`kernel_helpers`] bit?
    #[inline(always)]
    pub const fn has_helper(&self, helper: u32) -> bool {
        self.kernel_helpers & helper != 0
    }
}

/// Bits of [`KernelLayout::kernel_helpers`].
pub mod kernel_helpers {
    /// `bpf_get_current_task_btf` (5.11): the task as a BTF-typed pointer, read with plain
    /// loads instead of `bpf_probe_read_kernel` calls.
    pub const TASK_BTF: u32 = 1 << 0;
    /// `bpf_task_pt_regs` (5.15): the syscall's arguments read at `sys_exit` from the saved
    /// user registers, instead of copied at `sys_enter`.
    pub const TASK_PT_REGS: u32 = 1 << 1;
    /// `bpf_get_current_ancestor_cgroup_id` in tracing programs (5.14; the helper is older
    /// but was refused to them): `--cgroup` without walking the task's cgroups.
    pub const ANCESTOR_CGROUP_ID: u32 = 1 << 2;
}

/// Every shared layout is checked here and by the `bytemuck::Pod` derives (which refuse any
/// implicit padding): a field added without its padding fails the build.
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 23 * 4 + 11 * 8 + 4 + 4 * 4 + 4 * 4 + 4 * 4);
const _: () = assert!(core::mem::size_of::<FilterConfig>() == 32 + 64 + 32 + 64 + 16 + 16 + 8);
const _: () = assert!(
    core::mem::size_of::<ProbeConfig>()
        == core::mem::size_of::<KernelLayout>() + core::mem::size_of::<FilterConfig>() + 8
);
const _: () = assert!(core::mem::offset_of!(ProbeConfig, filter) == core::mem::size_of::<KernelLayout>());

/// Bits of [`FilterConfig::flags`]: which filters are active.
pub mod filter_flags {
    pub const PIDS: u32 = 1 << 0;
    pub const PORTS: u32 = 1 << 1;
    pub const RESULTS: u32 = 1 << 2;
    pub const FAMILY: u32 = 1 << 3;
    pub const PROTOCOL: u32 = 1 << 4;
    pub const COMM: u32 = 1 << 5;
    pub const CGROUPS: u32 = 1 << 6;
    /// Only the followed process tree (the `FOLLOWED` map).
    pub const TREE: u32 = 1 << 7;
}

/// Filters applied in the kernel, so that a rejected event costs no ring-buffer space.
/// The pid set lives in the `FILTER_PIDS` hash map; everything else is here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FilterConfig {
    /// Accepted results: bit 0 is success, bit N is errno N (N >= 255 all map to bit 255).
    pub results: [u64; ERRNO_BITS / 64],
    /// cgroup v2 ids (`--container`, `--cgroup`): a task passes when its ancestor at
    /// `cgroup_levels[i]` (its own cgroup or above) is `cgroup_ids[i]`, so that descendants
    /// match. The first `cgroup_count` are used. These are the ids at start: the probe reads
    /// the current ones from the `SELECTED_CGROUPS` map, which the tracer fills from these and
    /// updates when a followed container or unit restarts in a new cgroup.
    pub cgroup_ids: [u64; MAX_CGROUPS],
    pub cgroup_levels: [u32; MAX_CGROUPS],
    /// Inclusive port ranges; the first `port_range_count` are used.
    pub port_ranges: [[u16; 2]; MAX_PORT_RANGES],
    /// Exact `comm` to match, NUL-padded.
    pub comm: [u8; COMM_LEN],
    pub port_range_count: u32,
    /// [`filter_flags`] bits.
    pub flags: u32,
    pub family: u16,
    pub protocol: u16,
    /// bindtrace's own process (its lookups bind netlink sockets), never reported; 0: none.
    pub exclude_tgid: u32,
    pub cgroup_count: u32,
    pub _reserved: u32,
}

impl FilterConfig {
    pub const fn accept_all() -> Self {
        Self {
            results: [0; ERRNO_BITS / 64],
            cgroup_ids: [0; MAX_CGROUPS],
            cgroup_levels: [0; MAX_CGROUPS],
            port_ranges: [[0; 2]; MAX_PORT_RANGES],
            comm: [0; COMM_LEN],
            port_range_count: 0,
            flags: 0,
            family: 0,
            protocol: 0,
            exclude_tgid: 0,
            cgroup_count: 0,
            _reserved: 0,
        }
    }

    /// Is this process excluded (bindtrace itself)?
    #[inline(always)]
    pub const fn excludes_tgid(&self, tgid: u32) -> bool {
        self.exclude_tgid != 0 && self.exclude_tgid == tgid
    }

    #[inline(always)]
    pub const fn is_active(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// The bit of [`Self::results`] a bind return value maps to.
    #[inline(always)]
    pub const fn result_bit(ret: i32) -> usize {
        if ret >= 0 {
            0
        } else {
            let errno = ret.unsigned_abs() as usize;
            if errno >= ERRNO_BITS - 1 {
                ERRNO_BITS - 1
            } else {
                errno
            }
        }
    }

    pub fn accept_result_bit(&mut self, bit: usize) {
        let bit = if bit >= ERRNO_BITS { ERRNO_BITS - 1 } else { bit };
        self.results[bit / 64] |= 1u64 << (bit % 64);
        self.flags |= filter_flags::RESULTS;
    }

    /// Does the return value pass the result filter (`--errno`, `--failed`)?
    #[inline(always)]
    pub fn accepts_result(&self, ret: i32) -> bool {
        if !self.is_active(filter_flags::RESULTS) {
            return true;
        }
        let bit = Self::result_bit(ret);
        // `bit` is at most 255, so the index is at most 3; the mask keeps the verifier sure.
        let word = self.results[(bit / 64) & 3];
        word & (1u64 << (bit % 64)) != 0
    }

    /// Does the requested port pass `--port`? Walks a bounded number of ranges.
    #[inline(always)]
    pub fn accepts_port(&self, port: u16) -> bool {
        if !self.is_active(filter_flags::PORTS) {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if (i as u32) >= self.port_range_count {
                break;
            }
            let [lo, hi] = self.port_ranges[i];
            if port >= lo && port <= hi {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Does the requested address pass `--port`? Only inet families have ports: an AF_UNIX
    /// bind (whose path would read as a "port") never matches a port filter.
    #[inline(always)]
    pub fn accepts_address(&self, family: u16, port: u16) -> bool {
        if !self.is_active(filter_flags::PORTS) {
            return true;
        }
        (family == AF_INET || family == AF_INET6) && self.accepts_port(port)
    }

    #[inline(always)]
    pub fn accepts_family(&self, family: u16) -> bool {
        !self.is_active(filter_flags::FAMILY) || self.family == family
    }

    #[inline(always)]
    pub fn accepts_protocol(&self, protocol: u16) -> bool {
        !self.is_active(filter_flags::PROTOCOL) || self.protocol == protocol
    }

    #[inline(always)]
    pub fn accepts_comm(&self, comm: &[u8; COMM_LEN]) -> bool {
        if !self.is_active(filter_flags::COMM) {
            return true;
        }
        let mut i = 0;
        while i < COMM_LEN {
            if comm[i] != self.comm[i] {
                return false;
            }
            if comm[i] == 0 {
                return true;
            }
            i += 1;
        }
        true
    }

    /// Every predicate on an event except the pid set (which the caller checks against its
    /// own pid list): the userspace mirror of what the probe decides in the kernel.
    pub fn accepts_event(&self, event: &BindEvent) -> bool {
        !self.excludes_tgid(event.tgid)
            && self.accepts_result(event.ret)
            && self.accepts_address(event.family, event.port)
            && self.accepts_family(event.family)
            && self.accepts_protocol(event.protocol)
            && self.accepts_comm(&event.comm)
    }
}

/// Everything the tracer writes into the probe's read-only data before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ProbeConfig {
    pub layout: KernelLayout,
    pub filter: FilterConfig,
    /// Unread bytes in the ring buffer at which the probe wakes the reader early (a quarter of
    /// the ring); 0: never for this reason.
    pub wakeup_bytes: u64,
}

/// The probe forces a wake-up of the reader only when it has not done so for this long, or
/// when [`ProbeConfig::wakeup_bytes`] are unread (at most once per
/// [`WAKEUP_BYTES_MIN_INTERVAL_NS`]). Each forced wake-up is an irq_work, a self-IPI on the
/// traced CPU: in a VM an MSR write and a VM exit, several microseconds. The reader, once
/// woken, polls the ring every [`READER_RECHECK_NS`] until it has seen nothing for longer than
/// this interval, so a record that woke nobody still waits at most about one recheck.
pub const WAKEUP_INTERVAL_NS: u64 = 50_000_000;
pub const WAKEUP_BYTES_MIN_INTERVAL_NS: u64 = 1_000_000;
/// How often the reader drains the ring while records flow.
pub const READER_RECHECK_NS: u64 = 5_000_000;

impl ProbeConfig {
    pub const fn zeroed() -> Self {
        Self {
            layout: KernelLayout {
                task_files: 0,
                task_nsproxy: 0,
                files_fdt: 0,
                fdtable_max_fds: 0,
                fdtable_fd: 0,
                file_private_data: 0,
                socket_file: 0,
                socket_sk: 0,
                nsproxy_net_ns: 0,
                sock_net: 0,
                net_inum: 0,
                syscall_args: [0; 3],
                sock_rcv_saddr: 0,
                sock_v6_rcv_saddr: 0,
                task_cgroups: 0,
                css_set_dfl_cgrp: 0,
                cgroup_level: 0,
                cgroup_ancestor_ids: 0,
                cgroup_ancestors: 0,
                cgroup_kn: 0,
                kernfs_node_id: 0,
                sock_family: FieldLoc::ABSENT,
                sock_type: FieldLoc::ABSENT,
                sock_protocol: FieldLoc::ABSENT,
                sock_reuse: FieldLoc::ABSENT,
                sock_reuseport: FieldLoc::ABSENT,
                sock_ipv6only: FieldLoc::ABSENT,
                sock_bound_dev_if: FieldLoc::ABSENT,
                sock_num: FieldLoc::ABSENT,
                inet_freebind: FieldLoc::ABSENT,
                inet_transparent: FieldLoc::ABSENT,
                inet_bind_address_no_port: FieldLoc::ABSENT,
                kernel_helpers: 0,
                pt_regs_syscall_nr: NO_MEMBER,
                bind_syscall_nrs: [NO_MEMBER; 3],
                nsproxy_mnt_ns: NO_MEMBER,
                mnt_ns_inum: NO_MEMBER,
                task_cred: NO_MEMBER,
                cred_cap_effective: NO_MEMBER,
                task_signal: NO_MEMBER,
                signal_live: NO_MEMBER,
                fork_child_pid: 0,
                exec_old_pid: 0,
            },
            filter: FilterConfig::accept_all(),
            wakeup_bytes: 0,
        }
    }
}

// SAFETY: both derive `bytemuck::Pod`, whose derive proves at compile time what aya's Pod
// asks for: repr(C), no padding, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProbeConfig {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for BindEvent {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CgroupSlot {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TreePlace {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for UnixBindEvent {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn result_filter_maps_success_errnos_and_overflow() {
        let mut filter = FilterConfig::accept_all();
        assert!(filter.accepts_result(-98), "inactive filter accepts all");
        filter.accept_result_bit(98);
        assert!(filter.accepts_result(-98));
        assert!(!filter.accepts_result(0));
        assert!(!filter.accepts_result(-13));
        filter.accept_result_bit(0);
        assert!(filter.accepts_result(0));
        assert_eq!(FilterConfig::result_bit(-4000), 255);
        assert_eq!(FilterConfig::result_bit(-255), 255);
        assert_eq!(FilterConfig::result_bit(-254), 254);
    }

    #[test]
    fn port_ranges_are_inclusive_and_bounded_by_count() {
        let mut filter = FilterConfig::accept_all();
        filter.flags |= filter_flags::PORTS;
        filter.port_ranges[0] = [8080, 8080];
        filter.port_ranges[1] = [9000, 9010];
        filter.port_ranges[2] = [1, 65535];
        filter.port_range_count = 2;
        assert!(filter.accepts_port(8080));
        assert!(filter.accepts_port(9000));
        assert!(filter.accepts_port(9010));
        assert!(!filter.accepts_port(9011));
        assert!(!filter.accepts_port(80), "range 3 is beyond the count");
    }

    #[test]
    fn comm_filter_matches_exactly() {
        let mut filter = FilterConfig::accept_all();
        filter.flags |= filter_flags::COMM;
        filter.comm[..5].copy_from_slice(b"nginx");
        let mut comm = [0u8; COMM_LEN];
        comm[..5].copy_from_slice(b"nginx");
        assert!(filter.accepts_comm(&comm));
        comm[5] = b'x';
        assert!(!filter.accepts_comm(&comm));
    }

    #[test]
    fn field_loc_extracts_bitfields() {
        let reuseport = FieldLoc { offset: 0, bit_shift: 4, bit_width: 1, _reserved: [0; 2] };
        assert_eq!(reuseport.extract(0b1_0000), 1);
        assert_eq!(reuseport.extract(0b0_1111), 0);
        let word = FieldLoc { offset: 0, bit_shift: 0, bit_width: 32, _reserved: [0; 2] };
        assert_eq!(word.extract(u32::MAX), u32::MAX);
    }
}
