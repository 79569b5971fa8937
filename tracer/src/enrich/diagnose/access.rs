//! EACCES and EPERM (inet): a privileged port without CAP_NET_BIND_SERVICE, or a policy (a
//! cgroup BPF program, an LSM) that refused the bind.

use bindtrace_common::{sock_flags, BindEvent, AF_INET, AF_INET6};

use super::super::lookup::{NetnsFacts, ProcessFacts, ProcessUnread};
use super::report::comm_text;
use crate::decode::BindEventExt as _;
use crate::host::policy::BindPolicy;
use crate::model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders};

pub(super) const CAP_NET_BIND_SERVICE: u32 = 10;

pub(super) fn has_cap(effective: u64, cap: u32) -> bool {
    effective & (1u64 << cap) != 0
}

pub(super) fn access(
    event: &BindEvent,
    netns: Option<&NetnsFacts>,
    process: Option<Result<&ProcessFacts, ProcessUnread>>,
) -> Diagnosis {
    // What the kernel checked, as the probe recorded it when bind() returned; /proc only on
    // kernels where it could not (a process that exited at once is then not known).
    let recorded = event.has(sock_flags::TASK_FACTS);
    let caps = if recorded { Some(Ok(event.cap_effective)) } else { process.map(|p| p.map(|c| c.effective)) };
    let mut facts = DiagnosisFacts::default();
    let mut unknown = Vec::new();
    let port = event.port;
    let start = netns.and_then(|n| n.unprivileged_port_start);
    facts.ip_unprivileged_port_start = start;
    let who = format!("pid {} ({})", event.tgid, comm_text(&event.comm));
    match caps {
        Some(Ok(effective)) => {
            facts.cap_eff = Some(format!("{effective:016x}"));
            facts.cap_net_bind_service = Some(has_cap(effective, CAP_NET_BIND_SERVICE));
        }
        Some(Err(ProcessUnread::Exited)) => unknown.push(format!("{who} exited before its capabilities could be read")),
        Some(Err(ProcessUnread::OutsidePidNamespace)) => unknown.push(format!(
            "the capabilities of {who} cannot be read: bindtrace runs in its own PID namespace, and the pid is the host's"
        )),
        None => {}
    }
    let Some(start) = start else {
        unknown.push("net.ipv4.ip_unprivileged_port_start of the namespace could not be read".to_owned());
        return Diagnosis {
            kind: DiagnosisKind::Unknown,
            summary: format!("EACCES for port {port}: a privileged port, a cgroup BPF program or an LSM refused it"),
            holders: Holders::default(),
            facts,
            unknown,
            holders_summary: None,
        };
    };
    // EPERM never comes from the privileged-port rule (that is EACCES).
    let privileged = port != 0 && i64::from(port) < start && event.errno() == Some(libc::EACCES);
    let explained_by_caps = privileged && facts.cap_net_bind_service != Some(true);
    if !explained_by_caps {
        if recorded && matches!(process, Some(Err(ProcessUnread::Exited))) {
            unknown.push(format!("{who} exited before the bind programs of its cgroup could be read"));
        }
        if let Some(Ok(process)) = process {
            if let Some(policy) = policy_refusal(event, &process.policy, &mut facts, &mut unknown) {
                return Diagnosis {
                    kind: policy.0,
                    summary: policy.1,
                    holders: Holders::default(),
                    facts,
                    unknown,
                    holders_summary: None,
                };
            }
        }
    }
    let (kind, summary) = match (privileged, facts.cap_net_bind_service) {
        (true, Some(false)) => (
            DiagnosisKind::PrivilegedPort,
            format!(
                "port {port} is below net.ipv4.ip_unprivileged_port_start ({start}) and {who} lacks CAP_NET_BIND_SERVICE: \
                 grant it (setcap cap_net_bind_service=+ep, or AmbientCapabilities= in systemd), lower the sysctl, or use a port from {start} up"
            ),
        ),
        (true, None) => (
            DiagnosisKind::PrivilegedPort,
            format!("port {port} is below net.ipv4.ip_unprivileged_port_start ({start}): {who} needs CAP_NET_BIND_SERVICE"),
        ),
        (true, Some(true)) => (
            DiagnosisKind::RefusedByPolicy,
            format!(
                "{who} has CAP_NET_BIND_SERVICE, so port {port} being privileged (below {start}) is not the reason: \
                 a cgroup BPF program or an LSM (SELinux, AppArmor) refused it, or the capability belongs to a user namespace that does not own this network namespace"
            ),
        ),
        (false, _) => (
            DiagnosisKind::RefusedByPolicy,
            format!(
                "port {port} is not privileged here (net.ipv4.ip_unprivileged_port_start = {start}): a cgroup BPF program or an LSM (SELinux, AppArmor) refused the bind"
            ),
        ),
    };
    Diagnosis { kind, summary, holders: Holders::default(), facts, unknown, holders_summary: None }
}

/// A refusal that capabilities do not explain, named from what is in force: a cgroup BPF bind
/// program on the caller's cgroup, else an active LSM. `None` when neither can be named.
pub(super) fn policy_refusal(
    event: &BindEvent,
    policy: &BindPolicy,
    facts: &mut DiagnosisFacts,
    unknown: &mut Vec<String>,
) -> Option<(DiagnosisKind, String)> {
    let programs = match event.family {
        AF_INET => &policy.bind4_programs,
        AF_INET6 => &policy.bind6_programs,
        _ => return None,
    };
    let cgroup = policy.cgroup_dir.as_ref().map_or_else(|| "its cgroup".to_owned(), |d| d.display().to_string());
    // A cgroup program refuses with EPERM (unless it sets another error itself): for EACCES,
    // one in force is a fact, not the cause.
    let eperm = event.errno() == Some(libc::EPERM);
    match programs {
        Ok(ids) if !ids.is_empty() && eperm => {
            facts.cgroup_bind_programs = Some(ids.clone());
            let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            return Some((
                DiagnosisKind::RefusedByCgroupBpf,
                format!(
                    "a cgroup BPF bind program is in force on {cgroup} (program id {list}) and refused the bind: \
                     see bpftool cgroup show {cgroup} --effective, and bpftool prog show id {}",
                    ids[0]
                ),
            ));
        }
        Ok(_) => facts.cgroup_bind_programs = Some(Vec::new()),
        Err(why) => unknown.push(format!("cgroup BPF programs could not be listed: {why}")),
    }
    const ENFORCING: [&str; 5] = ["selinux", "apparmor", "smack", "tomoyo", "landlock"];
    let active: Vec<&str> =
        policy.lsms.iter().flatten().map(String::as_str).filter(|lsm| ENFORCING.contains(lsm)).collect();
    facts.lsms = policy.lsms.clone();
    if active.is_empty() {
        if policy.lsms.is_none() {
            unknown.push("the active LSMs could not be read (/sys/kernel/security is not mounted)".to_owned());
        }
        return None;
    }
    let no_cgroup =
        if programs.as_ref().is_ok_and(Vec::is_empty) { ", no cgroup BPF bind program is in force" } else { "" };
    Some((
        DiagnosisKind::RefusedByLsm,
        format!(
            "no capability rule explains it{no_cgroup}, and {} {} active: it refused the bind (look for the denial: \
             journalctl -k | grep -i denied, or ausearch -m avc)",
            active.join(" and "),
            if active.len() == 1 { "is" } else { "are" }
        ),
    ))
}
