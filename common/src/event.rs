//! The records the probe writes into the ring buffer (`BindEvent`, `UnixBindEvent`) and the
//! values their fields take.

use crate::COMM_LEN;

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

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
