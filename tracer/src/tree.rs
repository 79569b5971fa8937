//! The followed process tree (`bindtrace -- CMD`, `--tree PID`), the tracer's side: the
//! kernel keeps the tree (`FOLLOWED`, filled by the probe's fork program, see
//! probe-ebpf/src/tree.rs); this module gives it its root, adopts the descendants a running
//! root already has, tells the pipeline when the root exits, and says at the end which
//! processes of the tree still run.
//!
//! Chosen over a cgroup made for the command (the existing in-kernel cgroup filter, which
//! costs nothing per fork): `--tree` would have to move a running process, and its whole
//! service, out of its cgroup; and a daemon the command starts through systemd or a
//! container runtime leaves that cgroup. The fork program costs one hash lookup per fork on
//! the host (`cargo xtask bench --parts tree`, docs/PERFORMANCE.md).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, MapData};
use bindtrace_common::TreePlace;
use tokio::io::unix::AsyncFd;

/// The tracefs files that say where `child_pid` is in a fork record, and `old_pid` in an
/// exec record.
const FORK_FORMAT: &str = "events/sched/sched_process_fork/format";
const EXEC_FORMAT: &str = "events/sched/sched_process_exec/format";

/// Offsets of `child_pid` in the `sched:sched_process_fork` record and of `old_pid` in
/// `sched:sched_process_exec`'s on this kernel. `child_pid` is at 44 where the names are
/// inline `char[16]` (Debian's 5.10 to 6.12), at 20 where they are `__data_loc` (6.18).
pub(crate) fn record_offsets() -> Result<(u32, u32)> {
    let offset = |file: &str, field: &str| -> Result<u32> {
        let format = crate::probe::read_tracefs(file)?;
        field_offset(&format, field)
            .with_context(|| format!("{file} has no 4-byte {field} field: this kernel's record is unknown"))
    };
    Ok((offset(FORK_FORMAT, "child_pid")?, offset(EXEC_FORMAT, "old_pid")?))
}

/// The offset of a 4-byte field from a tracepoint's format file (`field:pid_t child_pid;
/// offset:44; size:4; signed:1;`).
fn field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.rsplit(' ').next()? != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(value) = part.strip_prefix("offset:") {
                offset = value.parse::<u32>().ok();
            } else if let Some(value) = part.strip_prefix("size:") {
                size = value.parse::<u32>().ok();
            }
        }
        (size == Some(4)).then_some(offset).flatten()
    })
}

/// The kernel's map of the tree, and its root.
pub(crate) struct FollowedTree {
    map: HashMap<MapData, u32, TreePlace>,
    root: u32,
}

impl FollowedTree {
    /// Makes `root` (whose parent is `parent`) the tree's root: from now on everything it
    /// forks is followed by the kernel.
    pub(crate) fn new(mut map: HashMap<MapData, u32, TreePlace>, root: u32, parent: u32) -> Result<Self> {
        map.insert(root, TreePlace { parent, depth: 0 }, 0).context("adding the tree's root to the probe's map")?;
        Ok(Self { map, root })
    }

    /// `--tree`: adds the processes the root already has below it (from /proc), until a
    /// walk finds none new (at most 5 walks): one of them forking between two walks is caught
    /// by the next (or, once added, by the kernel). Returns how many were added.
    pub(crate) fn adopt_descendants(&mut self) -> usize {
        let mut adopted = 0;
        for _ in 0..5 {
            let added = self.adopt_once();
            adopted += added;
            if added == 0 {
                break;
            }
        }
        adopted
    }

    fn adopt_once(&mut self) -> usize {
        let parents = process_parents();
        let mut known: StdHashMap<u32, TreePlace> = StdHashMap::new();
        known.insert(self.root, TreePlace { parent: 0, depth: 0 });
        let mut added = 0;
        // Each pass settles the processes whose parent is already known; a chain deeper than
        // the passes is settled by the next walk.
        for _ in 0..64 {
            let mut progress = false;
            for (&pid, &ppid) in &parents {
                if known.contains_key(&pid) {
                    continue;
                }
                let Some(parent_place) = known.get(&ppid).copied() else { continue };
                let place = TreePlace { parent: ppid, depth: parent_place.depth + 1 };
                known.insert(pid, place);
                progress = true;
                if self.map.get(&pid, 0).is_err() && self.map.insert(pid, place, 0).is_ok() {
                    // Gone between the walk and the insert: its exit went by unseen, and its
                    // entry would follow whatever gets the pid next.
                    if is_process(pid) {
                        added += 1;
                    } else {
                        let _ = self.map.remove(&pid);
                    }
                }
            }
            if !progress {
                break;
            }
        }
        added
    }

    /// Processes of the tree, other than the root, that still run (a daemon the command
    /// left): each key of the map that is a live process's id.
    pub(crate) fn still_running(&self) -> Vec<u32> {
        let keys: Vec<u32> = self.map.keys().filter_map(Result::ok).collect();
        let stale = keys.iter().filter(|&&pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()).count();
        log::debug!("the tree's map holds {} entries at the end, {stale} of tasks gone", keys.len());
        let mut alive: Vec<u32> = keys
            .into_iter()
            .filter(|&pid| pid != self.root && is_process(pid))
            .collect::<HashSet<u32>>()
            .into_iter()
            .collect();
        alive.sort_unstable();
        alive
    }
}

/// Every process's parent, from /proc/PID/stat.
fn process_parents() -> StdHashMap<u32, u32> {
    let Ok(all) = procfs::process::all_processes() else { return StdHashMap::new() };
    all.filter_map(Result::ok)
        .filter_map(|process| process.stat().ok())
        .filter_map(|stat| Some((u32::try_from(stat.pid).ok()?, u32::try_from(stat.ppid).ok()?)))
        .collect()
}

/// Is `pid` a process (a thread group's leader), not a thread nor gone?
fn is_process(pid: u32) -> bool {
    crate::host::owners::tgid_of(pid) == Some(pid)
}

/// A process's parent now (`--tree`'s root is recorded with it).
pub(crate) fn parent_of(pid: u32) -> Result<u32> {
    let stat = procfs::process::Process::new(pid as i32)
        .and_then(|process| process.stat())
        .with_context(|| format!("--tree {pid}: no such process"))?;
    if let Some(tgid) = crate::host::owners::tgid_of(pid).filter(|&tgid| tgid != pid) {
        bail!("--tree {pid} is a thread of process {tgid}: use --tree {tgid}");
    }
    Ok(u32::try_from(stat.ppid).unwrap_or(0))
}

/// A process to be told about when it exits: a pidfd (Linux 5.3), readable once it has.
pub(crate) struct ProcessHandle {
    fd: OwnedFd,
}

impl ProcessHandle {
    pub(crate) fn open(pid: u32) -> Result<Self> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("watching process {pid}"));
        }
        // SAFETY: a new fd that nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// Sends `signal` to this very process (never to another that reused its pid).
    pub(crate) fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a pidfd we own and no siginfo.
        let ret = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A copy for another thread (the signal relay).
    pub(crate) fn try_clone(&self) -> Result<Self> {
        Ok(Self { fd: self.fd.try_clone().context("duplicating a pidfd")? })
    }

    /// Waits until the process has exited.
    pub(crate) async fn exited(self) -> Result<()> {
        // SAFETY: the OwnedFd moves into the AsyncFd, open and the same until both drop.
        let fd = unsafe { AsyncFd::register_with_interest(self.fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("polling a pidfd")?;
        let _ = fd.readable().await.context("waiting for a process to exit")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_pid_offset_comes_from_either_record_layout() {
        // Linux 6.18: the names are `__data_loc`.
        let new = "name: sched_process_fork\nID: 318\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                   \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                   \tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(new, "child_pid"), Some(20));
        // Linux 5.10 to 6.12: `char[16]` inline.
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                   \tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(old, "child_pid"), Some(44));
        assert_eq!(field_offset(old, "parent_pid"), Some(24));
        assert_eq!(field_offset(old, "pid"), None, "a suffix of a name is not the name");
        assert_eq!(field_offset("\tfield:u64 child_pid;\toffset:8;\tsize:8;\tsigned:0;\n", "child_pid"), None);
    }
}
