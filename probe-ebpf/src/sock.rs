//! The socket behind a bind: found from the fd (syscall hooks) or given (inet_bind hooks),
//! and its fields read with as few kernel reads as possible. Kernel offsets come from the
//! read-only config, resolved by the tracer from the running kernel's BTF.

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::helpers::{bpf_get_current_task, generated};
use bindtrace_common::{kernel_helpers, sock_flags, FieldLoc, KernelLayout, AF_INET, AF_INET6};

/// A type every bit pattern is a valid value of, which a kernel read may fill in: integers,
/// arrays of them, raw pointers (any address is a valid raw pointer; what it points to is read
/// through [`kernel_read`] again). bytemuck's `AnyBitPattern` leaves raw pointers out.
///
/// # Safety
/// Implement it only for such types.
pub(crate) unsafe trait KernelValue: Copy {}

// SAFETY: integers, their arrays and raw pointers: any bits are a valid value.
unsafe impl KernelValue for u8 {}
// SAFETY: as above.
unsafe impl KernelValue for u16 {}
// SAFETY: as above.
unsafe impl KernelValue for u32 {}
// SAFETY: as above.
unsafe impl KernelValue for u64 {}
// SAFETY: as above.
unsafe impl KernelValue for i32 {}
// SAFETY: as above.
unsafe impl KernelValue for *const u8 {}
// SAFETY: as above.
unsafe impl<T: KernelValue, const N: usize> KernelValue for [T; N] {}

/// Reads kernel memory at `src` as a `T`, or zeros: the helper clears the destination itself
/// when the read faults, so callers need no branch per read. Every branch on a read's result
/// multiplies the paths the verifier walks (it dominated load time), and a zero is what the
/// event wants for a field it could not read. Safe for any address: the helper checks it, and
/// `T` is a type every bit pattern is a valid value of (integers, raw pointers, arrays of
/// them), so whatever the kernel's bytes were, the value is one.
#[inline(always)]
pub(crate) fn kernel_read<T: KernelValue>(src: *const u8) -> T {
    let mut value = MaybeUninit::<T>::uninit();
    // SAFETY: the helper copes with any address and fills all of `value` either way (the
    // bytes read, or zeros when the read faults), and any bytes are a valid `T`.
    unsafe {
        generated::bpf_probe_read_kernel(value.as_mut_ptr().cast(), size_of::<T>() as u32, src.cast());
        value.assume_init()
    }
}

/// What the probe read of the socket and its network namespace.
#[derive(Default)]
pub(crate) struct SockInfo {
    /// `skc_family`: the socket's own domain.
    pub(crate) family: u16,
    pub(crate) sock_type: u16,
    pub(crate) protocol: u16,
    pub(crate) bound_port: u16,
    pub(crate) bound_dev_if: u32,
    pub(crate) bound_addr4: u32,
    pub(crate) flags: u32,
    pub(crate) netns_ino: u32,
}

/// The `struct sock` behind the caller's `fd` (tracepoint backend), or null.
#[inline(always)]
pub(crate) fn sock_of_fd(layout: &KernelLayout, fd: i32) -> *const u8 {
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
pub(crate) trait MemberRead {
    /// # Safety
    /// As [`btf_load`] for `TypedLoad`; `ProbeRead` copes with any address.
    unsafe fn member<T: KernelValue>(base: *const u8, offset: u32) -> T;
}

pub(crate) struct TypedLoad;
pub(crate) struct ProbeRead;

impl MemberRead for TypedLoad {
    #[inline(always)]
    unsafe fn member<T: KernelValue>(base: *const u8, offset: u32) -> T {
        // SAFETY: the caller's contract.
        unsafe { btf_load(base, offset) }
    }
}

impl MemberRead for ProbeRead {
    #[inline(always)]
    unsafe fn member<T: KernelValue>(base: *const u8, offset: u32) -> T {
        kernel_read(base.wrapping_add(offset as usize))
    }
}

/// Reads the socket fields from the `struct sock` (null: none) and the netns, from the sock
/// or else from the calling task.
#[inline(always)]
pub(crate) fn read_sock(layout: &KernelLayout, sk: *const u8) -> SockInfo {
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
pub(crate) fn task_field(offset: u32) -> *const u8 {
    // SAFETY: only an address computation; the caller reads through bpf_probe_read_kernel.
    unsafe { bpf_get_current_task() as *const u8 }.wrapping_add(offset as usize)
}

/// A pointer-sized (or smaller) member of a BTF-typed kernel object, loaded directly. With
/// `base` typed by the verifier (it comes from `bpf_get_current_task_btf` or from another
/// such load) and `offset` a verifier-known constant (the read-only config), the verifier
/// checks the access against the kernel's BTF and makes it a fault-safe load: no helper call,
/// and a null `base` reads as 0.
#[inline(always)]
pub(crate) unsafe fn btf_load<T: Copy>(base: *const u8, offset: u32) -> T {
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
pub(crate) unsafe fn socket_of_fd<R: MemberRead>(task: *const u8, layout: &KernelLayout, fd: i32) -> *const u8 {
    if fd < 0 || layout.file_private_data == 0 {
        return core::ptr::null();
    }
    // SAFETY: `R::member` as its caller's contract allows (see [`MemberRead`]); the rest are
    // kernel_read, safe for any address.
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
pub(crate) unsafe fn sock_fields(layout: &KernelLayout, sk: *const u8) -> SockInfo {
    let mut sock = SockReader::new(sk);
    // 0 or 1 each, shifted into place without a branch.
    let mut flags = sock_flags::SOCK_INFO;
    flags |= nonzero(sock.field(&layout.sock_reuse)) * sock_flags::REUSEADDR;
    flags |= nonzero(sock.field(&layout.sock_reuseport)) * sock_flags::REUSEPORT;
    flags |= nonzero(sock.field(&layout.sock_ipv6only)) * sock_flags::V6ONLY;
    // inet_sock begins with struct sock, so these offsets apply to the same pointer; but
    // only an inet socket is an inet_sock (a unix socket has other data there).
    let family = sock.field(&layout.sock_family) as u16;
    let inet = u32::from(family == AF_INET || family == AF_INET6);
    flags |= nonzero(sock.field(&layout.inet_freebind)) * inet * sock_flags::FREEBIND;
    flags |= nonzero(sock.field(&layout.inet_transparent)) * inet * sock_flags::TRANSPARENT;
    flags |= nonzero(sock.field(&layout.inet_bind_address_no_port)) * inet * sock_flags::BIND_ADDRESS_NO_PORT;
    SockInfo {
        family,
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

/// The socket's bound IPv6 address (`skc_v6_rcv_saddr`) as two little-endian words of its
/// network-order bytes, for a failed listen(); zeros where the kernel has no IPv6.
#[inline(always)]
pub(crate) fn bound_v6(layout: &KernelLayout, sk: *const u8) -> [u64; 2] {
    if layout.sock_v6_rcv_saddr == 0 {
        return [0; 2];
    }
    // A null `sk` reads zeros.
    kernel_read(sk.wrapping_add(layout.sock_v6_rcv_saddr as usize))
}

/// 1 if `value` is non-zero, else 0.
#[inline(always)]
pub(crate) fn nonzero(value: u32) -> u32 {
    u32::from(value != 0)
}

/// Reads fields of one `struct sock` with as few kernel reads as possible: the first
/// [`SOCK_HEAD`] bytes (skc_rcv_saddr, skc_num, skc_family, the skc_reuse bitfields,
/// skc_bound_dev_if) in one read, and each other 32-bit word once however many fields
/// share it. Offsets come from the read-only config, so the verifier knows them and settles
/// every branch here itself.
pub(crate) struct SockReader {
    pub(crate) sk: *const u8,
    pub(crate) head: [u64; SOCK_HEAD / 8],
    pub(crate) last_offset: u32,
    pub(crate) last_value: u32,
}

pub(crate) const SOCK_HEAD: usize = 32;

impl SockReader {
    #[inline(always)]
    fn new(sk: *const u8) -> Self {
        let head = kernel_read(sk);
        Self { sk, head, last_offset: u32::MAX, last_value: 0 }
    }

    #[inline(always)]
    fn word(&mut self, offset: u32) -> u32 {
        let at = offset as usize;
        if at + 4 <= SOCK_HEAD {
            let head: &[u8; SOCK_HEAD] = bytemuck::cast_ref(&self.head);
            if let Some(bytes) = head.get(at..at + 4) {
                return u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        if self.last_offset != offset {
            self.last_value = kernel_read(self.sk.wrapping_add(at));
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
