//! The filter stage: turns the [`Selection`] (the command line's filters, resolved by
//! `config`) into the [`FilterConfig`] the probe applies in the kernel, and applies the very same predicates (shared through `bindtrace-common`) to
//! every decoded event, so that an event only reaches the sinks if both sides agree.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Result};
use bindtrace_common::{filter_flags, BindEvent, FilterConfig, COMM_LEN, MAX_CGROUPS, MAX_PORT_RANGES};

use crate::host::{cgroup, identity::Identities};

/// Most pids `--pid` takes (the size of the probe's FILTER_PIDS map).
pub(crate) const MAX_PIDS: usize = 1024;

/// Which results to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Results {
    #[default]
    All,
    /// Failures only.
    Failed,
    /// These errnos only (positive numbers).
    Errnos(Vec<i32>),
}

/// What to keep, in the domain's terms (the command line resolves into it once, in
/// `config`): each field `None` or empty keeps everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selection {
    pub(crate) results: Results,
    /// Inclusive port ranges.
    pub(crate) ports: Vec<(u16, u16)>,
    /// An address family (`AF_*`).
    pub(crate) family: Option<u16>,
    /// A protocol (`IPPROTO_*`).
    pub(crate) protocol: Option<u16>,
    /// A task name (the kernel keeps 15 bytes of it).
    pub(crate) comm: Option<String>,
    pub(crate) pids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub(crate) struct EventFilter {
    pub kernel: FilterConfig,
    pub pids: Vec<u32>,
    pid_set: HashSet<u32>,
}

/// The running container a name or id names, and its cgroup v2 path (the container's own
/// group, above the processes' sub-groups); `None` when no runtime knows it now.
pub(crate) fn container_cgroup(
    identities: &mut Identities,
    name: &str,
) -> std::result::Result<Option<(crate::host::runtimes::Container, String)>, String> {
    let (container, pid) = match identities.container_pid(name) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        Err(why) => return Err(format!("the container runtimes could not be asked: {why}")),
    };
    let path = cgroup::ProcessCgroups::read(pid)
        .and_then(|groups| groups.v2)
        .filter(|path| path != "/")
        .map(|path| cgroup::container_root(&path).unwrap_or(path))
        .ok_or_else(|| {
            format!("its process {pid} has no cgroup v2 group of its own, so the kernel cannot select it")
        })?;
    Ok(Some((container, path)))
}

/// A cgroup `--container` or `--cgroup` selected, in the order of the probe's slots, as the
/// follower needs it (`crate::follow`).
#[derive(Clone, Debug)]
pub(crate) struct SelectedCgroup {
    /// The flag as given: `--container web4`.
    pub(crate) flag: String,
    /// As the start line says it: `docker container web4 (/system.slice/docker-1f0e....scope)`.
    pub(crate) described: String,
    /// The cgroup path (as given, or the container's).
    pub(crate) path: String,
    /// Its depth, fixed in the probe's read-only config.
    pub(crate) level: u32,
    /// The container's name or id as given: asked for again when its cgroup path goes away.
    pub(crate) container: Option<String>,
}

impl EventFilter {
    pub(crate) fn new(selection: &Selection) -> Result<Self> {
        let mut kernel = FilterConfig::accept_all();
        // bindtrace's own binds (the netlink sockets of its lookups) are not the host's. In a
        // PID namespace of its own its pid is not the one the kernel reports: nothing to exclude.
        if !crate::host::owners::in_own_pid_namespace() {
            kernel.exclude_tgid = std::process::id();
        }

        match &selection.results {
            Results::All => {}
            Results::Failed => {
                for bit in 1..bindtrace_common::ERRNO_BITS {
                    kernel.accept_result_bit(bit);
                }
            }
            Results::Errnos(errnos) => {
                for &errno in errnos {
                    kernel.accept_result_bit(errno as usize);
                }
            }
        }

        let ports = &selection.ports;
        if ports.len() > MAX_PORT_RANGES {
            bail!("at most {MAX_PORT_RANGES} ports or port ranges can be given, got {}", ports.len());
        }
        if !ports.is_empty() {
            for (slot, &(low, high)) in kernel.port_ranges.iter_mut().zip(ports) {
                *slot = [low, high];
            }
            kernel.port_range_count = ports.len() as u32;
            kernel.flags |= filter_flags::PORTS;
        }

        if let Some(family) = selection.family {
            kernel.family = family;
            kernel.flags |= filter_flags::FAMILY;
        }

        if let Some(protocol) = selection.protocol {
            kernel.protocol = protocol;
            kernel.flags |= filter_flags::PROTOCOL;
        }

        if let Some(comm) = &selection.comm {
            // The kernel keeps 15 bytes of a task name; match what it can hold.
            let bytes = comm.as_bytes();
            let len = bytes.len().min(COMM_LEN - 1);
            kernel.comm[..len].copy_from_slice(&bytes[..len]);
            kernel.flags |= filter_flags::COMM;
        }

        let mut pids = selection.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        if pids.len() > MAX_PIDS {
            bail!("at most {MAX_PIDS} process ids can be given, got {}", pids.len());
        }
        if !pids.is_empty() {
            kernel.flags |= filter_flags::PIDS;
        }
        let pid_set = pids.iter().copied().collect();
        Ok(Self { kernel, pids, pid_set })
    }

    /// Limits the trace to the cgroups of `--container` and `--cgroup` (and their
    /// descendants), in the kernel. Containers are found through their runtimes' APIs; a name
    /// no runtime knows, or a runtime that cannot be asked, is an error that says so.
    pub(crate) fn scope_to_cgroups(
        &mut self,
        containers: &[String],
        cgroups: &[String],
    ) -> Result<Vec<SelectedCgroup>> {
        let mut selected = Vec::new();
        let mut described = Vec::new();
        for path in cgroups {
            let (id, level) = cgroup::id_of_path(path).map_err(|e| anyhow!("--cgroup {path}: {e}"))?;
            // The same group named twice (or by two spellings) is selected, and said, once.
            if selected.contains(&(id, level)) {
                continue;
            }
            selected.push((id, level));
            described.push(SelectedCgroup {
                flag: format!("--cgroup {path}"),
                described: format!("cgroup {path}"),
                path: path.clone(),
                level,
                container: None,
            });
        }
        if !containers.is_empty() {
            let mut identities = Identities::default();
            for name in containers {
                let (container, path) = match container_cgroup(&mut identities, name) {
                    Ok(Some(found)) => found,
                    Ok(None) => bail!("--container {name}: no running container by that name or id (asked Docker, podman and containerd where their sockets exist)"),
                    Err(why) => bail!("--container {name}: {why}"),
                };
                let (id, level) = cgroup::id_of_path(&path).map_err(|e| anyhow!("--container {name}: {e}"))?;
                if selected.contains(&(id, level)) {
                    continue;
                }
                selected.push((id, level));
                described.push(SelectedCgroup {
                    flag: format!("--container {name}"),
                    described: format!("{} container {} ({path})", container.runtime.name(), container.label()),
                    path,
                    level,
                    container: Some(name.clone()),
                });
            }
        }
        if selected.len() > MAX_CGROUPS {
            bail!("at most {MAX_CGROUPS} containers and cgroups can be given together, got {}", selected.len());
        }
        if !selected.is_empty() {
            for (i, (id, level)) in selected.iter().enumerate() {
                self.kernel.cgroup_ids[i] = *id;
                self.kernel.cgroup_levels[i] = *level;
            }
            self.kernel.cgroup_count = selected.len() as u32;
            self.kernel.flags |= filter_flags::CGROUPS;
        }
        Ok(described)
    }

    /// The userspace mirror of the probe's decision (the cgroups are the kernel's alone).
    pub(crate) fn accepts(&self, event: &BindEvent) -> bool {
        (self.pid_set.is_empty() || self.pid_set.contains(&event.tgid)) && self.kernel.accepts_event(event)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    use super::*;
    use crate::decode::tests::sample_event;

    fn filter(args: &[&str]) -> EventFilter {
        let cli = Cli::try_parse_from(std::iter::once("bindtrace").chain(args.iter().copied())).expect("valid args");
        EventFilter::new(&crate::config::selection(&cli)).expect("valid filter")
    }

    #[test]
    fn no_flags_accept_everything() {
        let f = filter(&[]);
        assert_eq!(f.kernel.flags, 0);
        assert!(f.accepts(&sample_event()));
    }

    #[test]
    fn errno_failed_port_pid_family_proto_comm() {
        let event = sample_event(); // 127.0.0.1:8080 tcp EADDRINUSE pid 4242 python3
        let mut ok = event;
        ok.ret = 0;

        assert!(filter(&["--errno", "EADDRINUSE"]).accepts(&event));
        assert!(!filter(&["--errno", "EACCES"]).accepts(&event));
        assert!(!filter(&["--errno", "EADDRINUSE"]).accepts(&ok));
        assert!(filter(&["-x"]).accepts(&event));
        assert!(!filter(&["-x"]).accepts(&ok));
        assert!(filter(&["-P", "8000-8100"]).accepts(&event));
        assert!(!filter(&["-P", "80,443"]).accepts(&event));
        assert!(filter(&["-p", "4242"]).accepts(&event));
        assert!(!filter(&["-p", "1"]).accepts(&event));
        assert!(filter(&["--family", "4"]).accepts(&event));
        assert!(!filter(&["--family", "6"]).accepts(&event));
        assert!(filter(&["--proto", "tcp"]).accepts(&event));
        assert!(!filter(&["--proto", "udp"]).accepts(&event));
        assert!(filter(&["--comm", "python3"]).accepts(&event));
        assert!(!filter(&["--comm", "python"]).accepts(&event));
    }

    #[test]
    fn long_comm_is_cut_to_what_the_kernel_keeps() {
        let f = filter(&["--comm", "a-very-long-process-name"]);
        assert_eq!(&f.kernel.comm[..15], b"a-very-long-pro");
        assert_eq!(f.kernel.comm[15], 0);
    }

    #[test]
    fn too_many_ranges_is_an_error() {
        let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let joined = ports.join(",");
        let cli = Cli::try_parse_from(["bindtrace", "-P", joined.as_str()]).expect("parses");
        let err = EventFilter::new(&crate::config::selection(&cli)).expect_err("17 ranges");
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
