//! Everything the tracer writes into the probe's read-only data before load, and the
//! wake-up policy it sets.

#[cfg(feature = "user")]
use crate::{BindEvent, CgroupSlot, TreePlace, UnixBindEvent};
use crate::{FieldLoc, FilterConfig, KernelLayout, NO_MEMBER};

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
/// Every shared layout is checked here and by the `bytemuck::Pod` derives (which refuse any
/// implicit padding): a field added without its padding fails the build.
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 23 * 4 + 11 * 8 + 4 + 4 * 4 + 4 * 4 + 4 * 4);
const _: () = assert!(core::mem::size_of::<FilterConfig>() == 32 + 64 + 32 + 64 + 16 + 16 + 8);
const _: () = assert!(
    core::mem::size_of::<ProbeConfig>()
        == core::mem::size_of::<KernelLayout>() + core::mem::size_of::<FilterConfig>() + 8
);
const _: () = assert!(core::mem::offset_of!(ProbeConfig, filter) == core::mem::size_of::<KernelLayout>());

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
