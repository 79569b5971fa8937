//! Resolves the kernel struct members the probe reads (task → files → fdtable → file → socket
//! → sock, and the netns inode) from the running kernel's BTF, so that no offset is compiled
//! in for one kernel. Bitfields (skc_reuse, skc_reuseport, and sk_protocol before 5.6) come
//! out as a byte offset plus a bit shift and width.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use bindtrace_common::{kernel_helpers, names, FieldLoc, KernelLayout, NO_MEMBER};
use btf_rs::{Backend, Btf, Struct, Type};

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A BPF helper the probe uses where the kernel has it, and works around where it does not.
pub(crate) struct OptionalHelper {
    /// Its name without the `bpf_` prefix, as in `enum bpf_func_id` (`BPF_FUNC_<name>`).
    pub name: &'static str,
    pub bit: u32,
    /// The first kernel release that has it.
    pub since: &'static str,
}

pub(crate) const OPTIONAL_HELPERS: [OptionalHelper; 3] = [
    OptionalHelper { name: "get_current_task_btf", bit: kernel_helpers::TASK_BTF, since: "5.11" },
    OptionalHelper { name: "task_pt_regs", bit: kernel_helpers::TASK_PT_REGS, since: "5.15" },
    OptionalHelper {
        name: "get_current_ancestor_cgroup_id",
        bit: kernel_helpers::ANCESTOR_CGROUP_ID,
        since: "5.14 in tracing programs",
    },
];

/// The offsets of [`KernelTypes::fd_to_socket`]'s walk; all 0 (the probe's "no walk") when
/// the kernel lacks one of them.
#[derive(Clone, Copy, Default)]
struct FdToSocket {
    task_files: u32,
    files_fdt: u32,
    fdtable_max_fds: u32,
    fdtable_fd: u32,
    file_private_data: u32,
    socket_file: u32,
}

/// bind(2)'s numbers on this architecture: native, 32-bit compat, and the compat socketcall
/// multiplexer (x86 only). The others' numbers on the native table are syscalls that never
/// bind (x86_64 102 is getuid; arm64 282 is userfaultfd), so a match means bind.
#[cfg(target_arch = "x86_64")]
const BIND_SYSCALL_NRS: [u32; 3] = [49, 361, 102];
#[cfg(target_arch = "aarch64")]
const BIND_SYSCALL_NRS: [u32; 3] = [200, 282, NO_MEMBER];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const BIND_SYSCALL_NRS: [u32; 3] = [NO_MEMBER; 3];

/// Where one member sits inside its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MemberLoc {
    bit_offset: u32,
    /// Width in bits: the bitfield width, or the member's size times 8.
    bits: u32,
}

pub(crate) struct KernelTypes {
    btf: Btf,
    /// Structs already found by name: each lookup by name scans the type table.
    structs: std::cell::RefCell<std::collections::HashMap<String, Struct>>,
    /// Every enumerator of the anonymous enums, read once on first use.
    enumerators: std::cell::OnceCell<std::collections::HashMap<String, u32>>,
    /// Members treated as absent (`struct.member`, [`HIDE_MEMBERS_ENV`]), so that the tests
    /// can run what a kernel without them gets.
    hidden: Vec<String>,
}

impl KernelTypes {
    /// Opens a BTF file, mapping it instead of parsing it whole: only a few structs are read.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let btf = Btf::from_file_with_backend(path, Backend::Mmap)
            .or_else(|_| Btf::from_file(path))
            .with_context(|| format!("cannot read kernel BTF from {}", path.display()))?;
        Ok(Self { btf, structs: Default::default(), enumerators: Default::default(), hidden: Vec::new() })
    }

    fn find_struct(&self, name: &str) -> Result<Struct> {
        if let Some(found) = self.structs.borrow().get(name) {
            return Ok(found.clone());
        }
        let found = self.find_struct_uncached(name)?;
        self.structs.borrow_mut().insert(name.to_owned(), found.clone());
        Ok(found)
    }

    fn find_struct_uncached(&self, name: &str) -> Result<Struct> {
        self.btf
            .resolve_types_by_name(name)
            .ok()
            .into_iter()
            .flatten()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("kernel BTF has no struct {name}"))
    }

    /// Follows typedefs and qualifiers down to the type that has a shape.
    fn strip(&self, mut ty: Type) -> Result<Type> {
        for _ in 0..32 {
            ty = match ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(&t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => self.btf.resolve_chained_type(&t)?,
                Type::TypeTag(t) => self.btf.resolve_chained_type(&t)?,
                other => return Ok(other),
            };
        }
        bail!("type chain too long")
    }

    fn size_in_bytes(&self, ty: Type) -> Result<u32> {
        let size = match self.strip(ty)? {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Struct(s) | Type::Union(s) => s.size(),
            // arm64's `pt_regs.regs` is `u64[31]`.
            Type::Array(a) => {
                let element = self.size_in_bytes(self.btf.resolve_chained_type(&a)?)?;
                return u32::try_from(a.len()).ok().and_then(|n| n.checked_mul(element)).context("array too large");
            }
            other => bail!("unexpected member type {}", other.name()),
        };
        u32::try_from(size).context("member too large")
    }

    /// Finds `name` among the members of `parent`, looking inside anonymous structs and
    /// unions too. Returns the member's bit offset relative to `parent` and its type.
    fn find_member(&self, parent: &Struct, name: &str) -> Result<Option<(u32, Option<u32>, Type)>> {
        for member in &parent.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            if member_name == name {
                let ty = self.btf.resolve_chained_type(member)?;
                return Ok(Some((member.bit_offset(), member.bitfield_size(), ty)));
            }
            if member_name.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) = self.strip(self.btf.resolve_chained_type(member)?)? {
                    if let Some((offset, bits, ty)) = self.find_member(&inner, name)? {
                        return Ok(Some((member.bit_offset() + offset, bits, ty)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The BTF id of the kernel function `name`, if the BTF describes it.
    fn function_id(&self, name: &str) -> Option<u32> {
        let ids = self.btf.resolve_ids_by_name(name).ok()?;
        ids.into_iter().find(|&id| matches!(self.btf.resolve_type_by_id(id), Ok(Type::Func(_))))
    }

    /// Resolves a dotted member path such as `__sk_common.skc_reuse` inside `struct_name`.
    fn member(&self, struct_name: &str, path: &str) -> Result<MemberLoc> {
        if self.hidden.iter().any(|hidden| hidden.split_once('.') == Some((struct_name, path))) {
            bail!("kernel BTF: struct {struct_name} has no member {path} (hidden by {HIDE_MEMBERS_ENV})");
        }
        let mut current = self.find_struct(struct_name)?;
        let mut bit_offset = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (offset, bitfield, ty) = self
                .find_member(&current, part)?
                .ok_or_else(|| anyhow!("kernel BTF: struct {struct_name} has no member {path}"))?;
            bit_offset += offset;
            if parts.peek().is_none() {
                let bits = match bitfield {
                    Some(bits) if bits > 0 => bits,
                    _ => self.size_in_bytes(ty)? * 8,
                };
                return Ok(MemberLoc { bit_offset, bits });
            }
            current = match self.strip(ty)? {
                Type::Struct(s) | Type::Union(s) => s,
                other => bail!("kernel BTF: {struct_name}.{path}: {part} is a {}, not a struct", other.name()),
            };
        }
        bail!("empty member path")
    }

    /// Byte offset of a pointer (or other whole-byte) member.
    fn offset(&self, struct_name: &str, path: &str) -> Result<u32> {
        let loc = self.member(struct_name, path)?;
        if loc.bit_offset % 8 != 0 {
            bail!("kernel BTF: {struct_name}.{path} is not byte-aligned");
        }
        Ok(loc.bit_offset / 8)
    }

    /// A value member the probe reads as (u32 at offset >> shift) & mask.
    fn field(&self, struct_name: &str, path: &str) -> Result<FieldLoc> {
        let loc = self.member(struct_name, path)?;
        field_loc(loc).with_context(|| format!("kernel BTF: {struct_name}.{path}"))
    }

    /// Registers the struct that `struct_name.member` points to under its own name, so that
    /// finding it later costs no scan of the whole type table (each scan is ~0.7 ms, and
    /// start-up time is a target; the scans also keep the BTF mapping, and so peak RSS, up
    /// for longer).
    fn follow(&self, struct_name: &str, member: &str) -> Result<()> {
        let parent = self.find_struct(struct_name)?;
        let (_, _, ty) = self
            .find_member(&parent, member)?
            .ok_or_else(|| anyhow!("kernel BTF: struct {struct_name} has no member {member}"))?;
        let Type::Ptr(ptr) = self.strip(ty)? else {
            bail!("kernel BTF: {struct_name}.{member} is not a pointer");
        };
        if let Type::Struct(pointee) = self.strip(self.btf.resolve_chained_type(&ptr)?)? {
            if !pointee.members.is_empty() {
                let name = self.btf.resolve_name(&pointee)?;
                self.structs.borrow_mut().entry(name).or_insert(pointee);
            }
        }
        Ok(())
    }

    /// Every offset the probe needs. Members only some hooks read do not fail the whole
    /// layout: without the fd-to-socket walk's, that walk is off (`fd_to_socket`, see
    /// [`KernelBtf::fd_to_socket`]); without `pt_regs`' argument registers, the tracepoint
    /// takes the path of kernels without `bpf_task_pt_regs` (arguments saved at entry).
    pub(crate) fn layout(&self) -> Result<(KernelLayout, Result<(), String>)> {
        // Reach most structs through pointers from the few found by name.
        for (parent, member) in [("task_struct", "nsproxy"), ("nsproxy", "net_ns"), ("sock", "sk_socket")] {
            self.follow(parent, member)?;
        }
        let fd_to_socket = self.fd_to_socket();
        let (syscall_args, pt_regs) = match self.syscall_arg_registers() {
            Ok(registers) => (registers, 0),
            Err(err) => {
                log::info!("{err:#}: the tracepoint backend saves bind()'s arguments at entry instead");
                ([0; 3], kernel_helpers::TASK_PT_REGS)
            }
        };
        let fd_path = fd_to_socket.as_ref().map_or(FdToSocket::default(), |path| *path);
        let layout = KernelLayout {
            task_files: fd_path.task_files,
            task_nsproxy: self.offset("task_struct", "nsproxy")?,
            files_fdt: fd_path.files_fdt,
            fdtable_max_fds: fd_path.fdtable_max_fds,
            fdtable_fd: fd_path.fdtable_fd,
            file_private_data: fd_path.file_private_data,
            socket_file: fd_path.socket_file,
            socket_sk: self.offset("socket", "sk")?,
            nsproxy_net_ns: self.offset("nsproxy", "net_ns")?,
            sock_net: self.offset("sock", "__sk_common.skc_net.net")?,
            net_inum: self.offset("net", "ns.inum")?,
            syscall_args,
            sock_rcv_saddr: self.offset("sock", "__sk_common.skc_rcv_saddr")?,
            // Absent on kernels built without IPv6: the probe then reads no IPv6 address.
            sock_v6_rcv_saddr: self.offset("sock", "__sk_common.skc_v6_rcv_saddr").unwrap_or(0),
            // Only --cgroup on kernels without the ancestor helper reads these: absent ones
            // are 0, and the kernel tests say when the walk cannot be made.
            task_cgroups: self.offset("task_struct", "cgroups").unwrap_or(0),
            css_set_dfl_cgrp: self.offset("css_set", "dfl_cgrp").unwrap_or(0),
            cgroup_level: self.offset("cgroup", "level").unwrap_or(0),
            cgroup_ancestor_ids: self.offset("cgroup", "ancestor_ids").unwrap_or(0),
            cgroup_ancestors: self.offset("cgroup", "ancestors").unwrap_or(0),
            cgroup_kn: self.offset("cgroup", "kn").unwrap_or(0),
            kernfs_node_id: self.offset("kernfs_node", "id").unwrap_or(0),
            sock_family: self.field("sock", "__sk_common.skc_family")?,
            sock_type: self.field("sock", "sk_type")?,
            sock_protocol: self.field("sock", "sk_protocol")?,
            sock_reuse: self.field("sock", "__sk_common.skc_reuse")?,
            sock_reuseport: self.field("sock", "__sk_common.skc_reuseport")?,
            sock_ipv6only: self.field("sock", "__sk_common.skc_ipv6only")?,
            sock_bound_dev_if: self.field("sock", "__sk_common.skc_bound_dev_if")?,
            sock_num: self.field("sock", "__sk_common.skc_num")?,
            inet_freebind: self.inet_flag("freebind", "INET_FLAGS_FREEBIND")?,
            inet_transparent: self.inet_flag("transparent", "INET_FLAGS_TRANSPARENT")?,
            inet_bind_address_no_port: self.inet_flag("bind_address_no_port", "INET_FLAGS_BIND_ADDRESS_NO_PORT")?,
            kernel_helpers: self.kernel_helpers() & !pt_regs,
            pt_regs_syscall_nr: self.syscall_nr_register().unwrap_or(NO_MEMBER),
            bind_syscall_nrs: BIND_SYSCALL_NRS,
            // Failures record these when the kernel's BTF has them (every supported kernel
            // does); without them a diagnosis reads /proc, as long as the process lives.
            nsproxy_mnt_ns: self.offset("nsproxy", "mnt_ns").unwrap_or(NO_MEMBER),
            mnt_ns_inum: self.offset("mnt_namespace", "ns.inum").unwrap_or(NO_MEMBER),
            task_cred: self.offset("task_struct", "cred").unwrap_or(NO_MEMBER),
            cred_cap_effective: self.offset("cred", "cap_effective").unwrap_or(NO_MEMBER),
            // The tree's exit program tells a process's end from a thread's by these.
            task_signal: self.offset("task_struct", "signal").unwrap_or(NO_MEMBER),
            signal_live: self.offset("signal_struct", "live").unwrap_or(NO_MEMBER),
            fork_child_pid: 0,
            exec_old_pid: 0,
        };
        let mut layout = layout;
        let task_facts = [layout.nsproxy_mnt_ns, layout.mnt_ns_inum, layout.task_cred, layout.cred_cap_effective];
        if task_facts.contains(&NO_MEMBER) {
            log::info!("the kernel's BTF lacks a member of the task's mount namespace or credentials: failures are diagnosed from /proc");
            layout.nsproxy_mnt_ns = NO_MEMBER;
            layout.task_cred = NO_MEMBER;
        }
        Ok((layout, fd_to_socket.map(|_| ()).map_err(|err| format!("{err:#}"))))
    }

    /// The members of the walk from a bind(2)'s fd to its socket (task → files → fdtable →
    /// file → socket), which the tracepoint and `__sys_bind` hooks need and the inet_bind
    /// hooks (handed the socket) do not.
    fn fd_to_socket(&self) -> Result<FdToSocket> {
        for (parent, member) in [("task_struct", "files"), ("files_struct", "fdt"), ("socket", "file")] {
            self.follow(parent, member)?;
        }
        Ok(FdToSocket {
            task_files: self.offset("task_struct", "files")?,
            files_fdt: self.offset("files_struct", "fdt")?,
            fdtable_max_fds: self.offset("fdtable", "max_fds")?,
            fdtable_fd: self.offset("fdtable", "fd")?,
            file_private_data: self.offset("file", "private_data")?,
            socket_file: self.offset("socket", "file")?,
        })
    }

    /// Where `struct pt_regs` keeps the number of the syscall under way: `orig_ax` on x86_64
    /// (`ax` holds the return value by the end), `syscallno` on arm64.
    fn syscall_nr_register(&self) -> Result<u32> {
        self.offset("pt_regs", "orig_ax").or_else(|_| self.offset("pt_regs", "syscallno"))
    }

    /// Where `struct pt_regs` keeps a syscall's first three arguments when `sys_exit` runs:
    /// di, si, dx on x86_64. On arm64 the first argument's register, x0, already holds the
    /// return value by then: the kernel keeps the argument in `orig_x0`; x1 and x2 are
    /// `regs[1]` and `regs[2]`.
    fn syscall_arg_registers(&self) -> Result<[u32; 3]> {
        if let (Ok(di), Ok(si), Ok(dx)) =
            (self.offset("pt_regs", "di"), self.offset("pt_regs", "si"), self.offset("pt_regs", "dx"))
        {
            return Ok([di, si, dx]);
        }
        let (Ok(orig_x0), Ok(regs)) = (self.offset("pt_regs", "orig_x0"), self.offset("pt_regs", "regs")) else {
            bail!("kernel BTF: struct pt_regs has neither di/si/dx (x86_64) nor orig_x0 and regs (arm64)");
        };
        Ok([orig_x0, regs + 8, regs + 16])
    }

    /// The [`kernel_helpers`] bits of the optional helpers this kernel has: the enumerators of
    /// its `enum bpf_func_id` name every helper it knows.
    fn kernel_helpers(&self) -> u32 {
        let known = self.helper_numbers();
        let mut bits = OPTIONAL_HELPERS
            .iter()
            .filter(|helper| known.contains_key(&format!("BPF_FUNC_{}", helper.name)))
            .fold(0, |bits, helper| bits | helper.bit);
        // This one existed before tracing programs were allowed to call it: ask the kernel.
        if bits & kernel_helpers::ANCESTOR_CGROUP_ID != 0 {
            let number = known.get("BPF_FUNC_get_current_ancestor_cgroup_id").copied().unwrap_or(0);
            if !crate::bpf_sys::tracing_may_call(number) {
                bits &= !kernel_helpers::ANCESTOR_CGROUP_ID;
            }
        }
        bits
    }

    /// The kernel's `enum bpf_func_id`: every helper it knows, by enumerator name.
    fn helper_numbers(&self) -> std::collections::HashMap<String, u32> {
        let Some(helpers) =
            self.btf.resolve_types_by_name("bpf_func_id").ok().into_iter().flatten().find_map(|t| match t {
                Type::Enum(e) => Some(e),
                _ => None,
            })
        else {
            log::debug!("kernel BTF has no enum bpf_func_id: assuming no optional helpers");
            return std::collections::HashMap::new();
        };
        helpers.members.iter().filter_map(|m| Some((self.btf.resolve_name(m).ok()?, m.val()))).collect()
    }

    /// The value of an enumerator of one of the kernel's anonymous enums (INET_FLAGS_* live
    /// in one); they are indexed in one pass on first use.
    fn enumerator(&self, name: &str) -> Result<Option<u32>> {
        let index = self.enumerators.get_or_init(|| {
            let mut index = std::collections::HashMap::new();
            for ty in self.btf.resolve_types_by_name("").unwrap_or_default() {
                if let Type::Enum(e) = ty {
                    for member in &e.members {
                        if let Ok(n) = self.btf.resolve_name(member) {
                            index.insert(n, member.val());
                        }
                    }
                }
            }
            index
        });
        Ok(index.get(name).copied())
    }

    /// An inet socket option flag: since 6.6 bit `enum_name` of `inet_sock.inet_flags`,
    /// before that the bitfield `inet_sock.<bitfield>`.
    fn inet_flag(&self, bitfield: &str, enum_name: &str) -> Result<FieldLoc> {
        if let Ok(loc) = self.member("inet_sock", bitfield) {
            return field_loc(loc).with_context(|| format!("kernel BTF: inet_sock.{bitfield}"));
        }
        let flags = self.member("inet_sock", "inet_flags")?;
        let bit = self
            .enumerator(enum_name)?
            .ok_or_else(|| anyhow!("kernel BTF has neither inet_sock.{bitfield} nor {enum_name}"))?;
        if bit >= flags.bits {
            bail!("kernel BTF: {enum_name} = {bit} does not fit in inet_sock.inet_flags");
        }
        // inet_flags is a little-endian unsigned long: bit N lives in byte N / 8.
        field_loc(MemberLoc { bit_offset: flags.bit_offset + bit, bits: 1 })
    }
}

/// The probe reads 32 bits at `offset` and shifts. Offsets are aligned down to 4 bytes when
/// the field still fits, so that fields sharing a word (the skc_reuse bitfields and
/// skc_family, sk_type and sk_protocol, the inet_flags bits) share one kernel read.
fn field_loc(loc: MemberLoc) -> Result<FieldLoc> {
    if loc.bits == 0 || loc.bits > 32 {
        bail!("{} bits at bit {} do not fit in a 32-bit read", loc.bits, loc.bit_offset);
    }
    let word = loc.bit_offset / 32 * 4;
    let (offset, shift) = if loc.bit_offset - word * 8 + loc.bits <= 32 {
        (word, loc.bit_offset - word * 8)
    } else {
        (loc.bit_offset / 8, loc.bit_offset % 8)
    };
    if shift + loc.bits > 32 {
        bail!("{} bits at bit {} do not fit in a 32-bit read", loc.bits, loc.bit_offset);
    }
    Ok(FieldLoc { offset, bit_shift: shift as u8, bit_width: loc.bits as u8, _reserved: [0; 2] })
}

/// What bindtrace needs from the running kernel's BTF.
#[derive(Clone, Debug)]
pub(crate) struct KernelBtf {
    pub layout: KernelLayout,
    /// The BTF ids of the functions the fexit backend hooks (`names::INET_BIND_FUNCTIONS`
    /// order); `None` where the kernel's BTF lacks one.
    pub bind_function_ids: [Option<u32>; 2],
    /// The walk from a bind(2)'s fd to its socket, or why the kernel's BTF does not allow it
    /// (a member it lacks): the tracepoint backend then cannot attach, and the others attach
    /// without their `__sys_bind` hooks (inet binds only, with their socket).
    pub fd_to_socket: std::result::Result<(), String>,
}

/// The running kernel's layout and hook targets, from /sys/kernel/btf/vmlinux.
pub(crate) fn running_kernel_btf() -> Result<KernelBtf> {
    let path = Path::new(VMLINUX_BTF);
    if !path.exists() {
        bail!("{VMLINUX_BTF} is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF, which bindtrace needs");
    }
    let mut types = KernelTypes::open(path)?;
    types.hidden = hidden_members(std::env::var(HIDE_MEMBERS_ENV).ok().as_deref());
    let (mut layout, fd_to_socket) = types.layout()?;
    layout.kernel_helpers &= !hidden_helpers(std::env::var(HIDE_HELPERS_ENV).ok().as_deref());
    Ok(KernelBtf {
        layout,
        bind_function_ids: names::INET_BIND_FUNCTIONS.map(|name| types.function_id(name)),
        fd_to_socket,
    })
}

/// Names struct members (comma-separated `struct.member`) to treat as absent from the
/// kernel's BTF, so that the tests run what a kernel without them gets.
pub(crate) const HIDE_MEMBERS_ENV: &str = "BINDTRACE_HIDE_MEMBERS";

fn hidden_members(names: Option<&str>) -> Vec<String> {
    names
        .into_iter()
        .flat_map(|names| names.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Names optional helpers (comma-separated, as in [`OPTIONAL_HELPERS`]) to treat as missing,
/// so that a new kernel runs the paths an old one takes: the tests use it.
pub(crate) const HIDE_HELPERS_ENV: &str = "BINDTRACE_HIDE_HELPERS";

fn hidden_helpers(names: Option<&str>) -> u32 {
    let Some(names) = names else { return 0 };
    names
        .split(',')
        .map(|name| name.trim().trim_start_matches("bpf_"))
        .filter_map(|name| OPTIONAL_HELPERS.iter().find(|helper| helper.name == name))
        .fold(0, |bits, helper| bits | helper.bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_helpers_are_named_with_or_without_the_prefix() {
        assert_eq!(hidden_helpers(None), 0);
        assert_eq!(hidden_helpers(Some("task_pt_regs")), kernel_helpers::TASK_PT_REGS);
        assert_eq!(
            hidden_helpers(Some("bpf_get_current_task_btf, task_pt_regs,unknown")),
            kernel_helpers::TASK_BTF | kernel_helpers::TASK_PT_REGS
        );
    }

    #[test]
    fn bitfields_become_shift_and_width() {
        // skc_reuseport: bit 4 of byte 19, i.e. bit 28 of the word at 16.
        let loc = field_loc(MemberLoc { bit_offset: 19 * 8 + 4, bits: 1 }).expect("fits");
        assert_eq!((loc.offset, loc.bit_shift, loc.bit_width), (16, 28, 1));
        assert_eq!(loc.extract(1 << 28), 1);
        let word = field_loc(MemberLoc { bit_offset: 64, bits: 32 }).expect("fits");
        assert_eq!((word.offset, word.bit_shift, word.bit_width), (8, 0, 32));
        // A u16 straddling a word boundary falls back to its own byte offset.
        let straddling = field_loc(MemberLoc { bit_offset: 3 * 8, bits: 16 }).expect("fits");
        assert_eq!((straddling.offset, straddling.bit_shift), (3, 0));
        assert!(field_loc(MemberLoc { bit_offset: 4, bits: 32 }).is_err());
        assert!(field_loc(MemberLoc { bit_offset: 0, bits: 64 }).is_err());
    }

    /// Reads the real BTF of the kernel this runs on: every member must resolve.
    #[test]
    fn running_kernel_btf_resolves_every_member() {
        if !Path::new(VMLINUX_BTF).exists() {
            println!("SKIPPED: {VMLINUX_BTF} is missing on this kernel");
            return;
        }
        let btf = running_kernel_btf().expect("layout");
        let layout = btf.layout;
        assert!(layout.task_files > 0 && layout.task_nsproxy > 0);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(layout.syscall_args, [112, 104, 96], "pt_regs di, si, dx (UAPI layout)");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(layout.pt_regs_syscall_nr, 120, "pt_regs orig_ax (UAPI layout)");
        assert_ne!(layout.pt_regs_syscall_nr, bindtrace_common::NO_MEMBER, "the syscall number's register");
        assert_eq!(layout.socket_sk % 8, 0);
        assert_eq!(layout.sock_reuse.bit_width, 4, "skc_reuse is a 4-bit field");
        assert_eq!(layout.sock_reuseport.bit_width, 1);
        assert_eq!(layout.sock_ipv6only.bit_width, 1);
        assert_eq!(layout.sock_family.bit_width, 16);
        assert_eq!(layout.sock_type.bit_width, 16);
        assert_eq!(layout.sock_bound_dev_if.bit_width, 32);
        assert_eq!(layout.sock_num.bit_width, 16);
        for flag in [layout.inet_freebind, layout.inet_transparent, layout.inet_bind_address_no_port] {
            assert_eq!(flag.bit_width, 1, "{flag:?}");
        }
        assert_ne!(layout.inet_freebind, layout.inet_transparent);
        assert!(btf.bind_function_ids.iter().all(Option::is_some), "inet_bind and inet6_bind are in every BTF kernel");
        assert_ne!(btf.bind_function_ids[0], btf.bind_function_ids[1]);
    }
}
