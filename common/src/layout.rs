//! Where the kernel keeps what the probe reads: struct members resolved from the running
//! kernel's BTF by the tracer, and the helpers the kernel has.

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
