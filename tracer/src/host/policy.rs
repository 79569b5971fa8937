//! What else may refuse a bind when capabilities do not explain an EACCES or EPERM: cgroup
//! BPF bind programs in force on the caller's cgroup (BPF_PROG_QUERY, effective, the way
//! `bpftool cgroup show --effective` asks), and the active LSMs.

use std::{
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, BPF_F_QUERY_EFFECTIVE};

/// The bind policy around one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BindPolicy {
    /// The process's cgroup v2 directory (`/sys/fs/cgroup/...`), when the unified hierarchy
    /// is mounted and the process is in it.
    pub cgroup_dir: Option<PathBuf>,
    /// Ids of the BPF programs in force on that cgroup for IPv4 and IPv6 binds (bind and
    /// post_bind hooks, which both can refuse with EPERM), or why they could not be listed.
    pub bind4_programs: Result<Vec<u32>, String>,
    pub bind6_programs: Result<Vec<u32>, String>,
    /// `/sys/kernel/security/lsm` (`lockdown,capability,yama,apparmor`), when securityfs
    /// is mounted.
    pub lsms: Option<Vec<String>>,
}

impl Default for BindPolicy {
    /// Nothing in force, nothing unknown.
    fn default() -> Self {
        Self { cgroup_dir: None, bind4_programs: Ok(Vec::new()), bind6_programs: Ok(Vec::new()), lsms: None }
    }
}

/// The ids of the programs in force on the cgroup at `dir` for `attach_type`, its
/// ancestors' included.
fn effective_programs(dir: &Path, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
    let cgroup = std::fs::File::open(dir)?;
    let mut ids = vec![0u32; 64];
    // SAFETY: bpf_attr is plain data; all-zero is its documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_QUERY member of the union.
    let query = unsafe { &mut attr.query };
    query.__bindgen_anon_1.target_fd = cgroup.as_raw_fd() as u32;
    query.attach_type = attach_type as u32;
    query.query_flags = BPF_F_QUERY_EFFECTIVE;
    query.prog_ids = ids.as_mut_ptr() as u64;
    query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    // SAFETY: BPF_PROG_QUERY writes at most prog_cnt ids into `ids`, alive for the call.
    unsafe { crate::bpf_sys::bpf_syscall(bpf_cmd::BPF_PROG_QUERY, &mut attr) }?;
    // SAFETY: the kernel set prog_cnt to the number of ids it wrote.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    ids.truncate(count.min(ids.len()));
    Ok(ids)
}

/// What may refuse `pid`'s binds besides capabilities.
pub(crate) fn bind_policy(pid: u32) -> BindPolicy {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm")
        .ok()
        .map(|text| text.trim().split(',').map(str::to_owned).collect());
    let cgroup_dir = super::cgroup::v2_mount()
        .zip(super::cgroup::ProcessCgroups::read(pid).and_then(|c| c.v2))
        .map(|(mount, path)| mount.join(path.trim_start_matches('/')));
    let query = |attach_type| match &cgroup_dir {
        Some(dir) => {
            effective_programs(dir, attach_type).map_err(|e| format!("{}: BPF_PROG_QUERY: {e}", dir.display()))
        }
        None => Err("no cgroup v2 hierarchy is mounted, or the process is not in it".to_owned()),
    };
    let both = |bind, post_bind| -> Result<Vec<u32>, String> {
        let mut ids = query(bind)?;
        ids.extend(query(post_bind)?);
        Ok(ids)
    };
    BindPolicy {
        bind4_programs: both(bpf_attach_type::BPF_CGROUP_INET4_BIND, bpf_attach_type::BPF_CGROUP_INET4_POST_BIND),
        bind6_programs: both(bpf_attach_type::BPF_CGROUP_INET6_BIND, bpf_attach_type::BPF_CGROUP_INET6_POST_BIND),
        cgroup_dir,
        lsms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_policy_without_failing() {
        let policy = bind_policy(std::process::id());
        // Whatever this host has: a listing, or a reason; never a panic or an empty reason.
        for programs in [&policy.bind4_programs, &policy.bind6_programs] {
            if let Err(why) = programs {
                assert!(!why.is_empty());
            }
        }
        if let Some(dir) = &policy.cgroup_dir {
            assert!(dir.is_dir(), "{}", dir.display());
        }
    }
}
