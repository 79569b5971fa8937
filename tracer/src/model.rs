//! What bindtrace reports, in the shape both sinks and `bindtrace who` print: a diagnosis,
//! its holders and facts, and the rule that keeps each of them on one short line. The enrich
//! stage builds these from the host's facts; the sinks only read them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use std::sync::Arc;

use crate::{
    decode::Bind,
    host::{identity::Identity, owners::ProcessInfo, sockdiag::Proto},
};

/// The case a diagnosis is, as the NDJSON schema's `diagnosis.kind` names it (snake case):
/// a stable label a script can match on; docs/ndjson-schema.md says what each means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DiagnosisKind {
    InUse,
    InUseDualStack,
    InUseReuseport,
    InUseSelf,
    InUseEphemeral,
    EphemeralExhausted,
    StaleSocketFile,
    PathExists,
    UnixPathPermission,
    ListenInUse,
    RefusedByCgroupBpf,
    RefusedByLsm,
    AddressTentative,
    AddressDadFailed,
    TimeWait,
    Released,
    PrivilegedPort,
    RefusedByPolicy,
    AddressNotAvailable,
    AlreadyBound,
    InvalidAddress,
    /// EFAULT.
    BadAddress,
    /// EBADF.
    BadFd,
    /// ENOTSOCK.
    NotASocket,
    /// On a successful bind: it joined a port others hold.
    PortShared,
    /// On a successful bind: a NAT rule takes its port's traffic.
    PortForwarded,
    /// Any other errno.
    Other,
    /// The facts could not be gathered.
    Unknown,
}

impl DiagnosisKind {
    /// Every kind, for the test that the schema documents each.
    #[cfg(test)]
    pub(crate) const ALL: [DiagnosisKind; 28] = [
        Self::InUse,
        Self::InUseDualStack,
        Self::InUseReuseport,
        Self::InUseSelf,
        Self::InUseEphemeral,
        Self::EphemeralExhausted,
        Self::StaleSocketFile,
        Self::PathExists,
        Self::UnixPathPermission,
        Self::ListenInUse,
        Self::RefusedByCgroupBpf,
        Self::RefusedByLsm,
        Self::AddressTentative,
        Self::AddressDadFailed,
        Self::TimeWait,
        Self::Released,
        Self::PrivilegedPort,
        Self::RefusedByPolicy,
        Self::AddressNotAvailable,
        Self::AlreadyBound,
        Self::InvalidAddress,
        Self::BadAddress,
        Self::BadFd,
        Self::NotASocket,
        Self::PortShared,
        Self::PortForwarded,
        Self::Other,
        Self::Unknown,
    ];
}

/// What holds the address a bind asked for: inet sockets or AF_UNIX ones, never both (a
/// diagnosis is about one address family). Written as the list alone, `holders`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum Holders {
    Inet(Vec<HolderReport>),
    /// The AF_UNIX sockets bound to the path or name asked for.
    Unix(Vec<UnixHolderReport>),
}

impl Default for Holders {
    fn default() -> Self {
        Self::Inet(Vec::new())
    }
}

impl Holders {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Inet(holders) => holders.len(),
            Self::Unix(holders) => holders.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inet holders (none for AF_UNIX).
    pub(crate) fn inet(&self) -> &[HolderReport] {
        match self {
            Self::Inet(holders) => holders,
            Self::Unix(_) => &[],
        }
    }

    /// Each holder's processes.
    fn processes(&self) -> impl Iterator<Item = &ProcessInfo> {
        let inet = self.inet().iter().flat_map(|h| &h.processes);
        let unix = match self {
            Self::Unix(holders) => &holders[..],
            Self::Inet(_) => &[],
        };
        inet.chain(unix.iter().flat_map(|h| &h.processes))
    }

    /// Makes the list shorter (fewer processes of a holder, fewer holders, shorter command
    /// lines); false when there is nothing left to cut but the list itself.
    fn shrink(&mut self) -> bool {
        match self {
            Self::Inet(holders) => shrink_holders(holders),
            Self::Unix(holders) => {
                if let Some(holder) =
                    holders.iter_mut().filter(|h| h.processes.len() > 1).max_by_key(|h| h.processes.len())
                {
                    let keep = (holder.processes.len() / 2).max(1);
                    cut_processes(&mut holder.processes, &mut holder.processes_total, keep);
                    return true;
                }
                if holders.len() > 1 {
                    holders.pop();
                    return true;
                }
                holders.iter_mut().flat_map(|h| h.processes.iter_mut()).any(|p| cut_cmdline(&mut p.cmdline))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Diagnosis {
    /// A stable label of the case.
    pub kind: DiagnosisKind,
    /// One sentence for a person: who is in the way and what to do.
    pub summary: String,
    #[serde(skip_serializing_if = "Holders::is_empty")]
    pub holders: Holders,
    /// Every socket in the way, counted, when `holders` lists only some of them (a busy
    /// port's connections, or a list cut to fit the line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holders_summary: Option<HoldersSummary>,
    #[serde(skip_serializing_if = "DiagnosisFacts::is_empty")]
    pub facts: DiagnosisFacts,
    /// What could not be found out (a process that exited, a namespace that is gone, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
}

/// The sockets in the way, all of them, when a diagnosis lists some.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct HoldersSummary {
    /// Sockets in the way.
    pub total: usize,
    /// How many of them `holders` lists (in rank order: listeners, bound and UDP sockets,
    /// connections, TIME_WAIT).
    pub shown: usize,
    /// All of them by state, as `ss` names states.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_state: BTreeMap<&'static str, usize>,
    /// Distinct peer addresses among the port's connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distinct_peers: Option<usize>,
    /// `holders` leaves some out.
    pub truncated: bool,
}

/// The most processes listed per holder; `processes_total` counts them all.
pub(crate) const PROCESSES_SHOWN_MAX: usize = 8;
/// The most bytes a diagnosis takes in an NDJSON line: the rest of the line's 16 KiB is the
/// event's own fields, which are bounded (see docs/ndjson-schema.md).
pub(crate) const DIAGNOSIS_BYTES_MAX: usize = 12 * 1024;
/// The longest command line a holder shows once a diagnosis had to be cut to fit.
const CMDLINE_CUT: usize = 120;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct HolderReport {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub state: &'static str,
    pub uid: u32,
    pub inode: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
    pub processes: Vec<ProcessInfo>,
    /// How many processes have the socket open, when `processes` lists only some of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes_total: Option<usize>,
    /// Why `processes` may miss some (bindtrace in its own PID namespace, other users'
    /// processes it may not inspect, a search cut at its deadline): an empty list is then
    /// "not visible", not "none".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes_hidden: Option<String>,
    /// The holder's own bind, when bindtrace saw it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_bind: Option<SeenBindReport>,
}

/// An AF_UNIX socket bound to the path or abstract name a failed bind asked for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct UnixHolderReport {
    /// `stream`, `dgram`, `seqpacket`.
    #[serde(rename = "type")]
    pub sock_type: &'static str,
    pub state: &'static str,
    pub inode: u32,
    /// The name it was bound with (a path as the binder gave it, or `@name`).
    pub name: String,
    pub processes: Vec<ProcessInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes_total: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes_hidden: Option<String>,
}

/// The file at an AF_UNIX path, for EADDRINUSE.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct UnixFileReport {
    /// `socket`, `missing`, `regular file`, `directory`, ...
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// Last modification, RFC 3339 (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified: Option<String>,
    /// Where bindtrace looked (the failing process's view: /proc/PID/root/... or cwd/...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub looked_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct SeenBindReport {
    /// Local time of day, as in the table.
    pub time: String,
    pub pid: u32,
    pub comm: String,
    pub reuseaddr: bool,
    pub reuseport: bool,
}

/// Facts behind the verdict, each present only where it was relevant and known.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct DiagnosisFacts {
    /// The container a runtime was starting when its port publisher's bind failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) publishing_for: Option<crate::host::identity::Publishing>,
    /// The socket unit a systemd manager was starting when its bind failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) starting_unit: Option<crate::host::systemd::SocketUnit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_unprivileged_port_start: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap_net_bind_service: Option<bool>,
    /// CapEff of the failing process, hex as in /proc/PID/status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap_eff: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_nonlocal_bind: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_assigned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub already_bound_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_wait_expires_ms: Option<u32>,
    /// SO_REUSEADDR on the failing socket (TIME_WAIT case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_socket_reuseaddr: Option<bool>,
    /// SO_REUSEADDR on the socket that went into TIME_WAIT, when bindtrace saw its bind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_socket_reuseaddr: Option<bool>,
    /// Ids of the cgroup BPF bind programs in force on the caller's cgroup (EACCES, EPERM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_bind_programs: Option<Vec<u32>>,
    /// The kernel's active LSMs, when they could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsms: Option<Vec<String>>,
    /// The requested IPv6 address's IFA_F_* flags (0x40 tentative, 0x08 dadfailed), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_flags: Option<String>,
    /// net.ipv4.ip_local_port_range ("32768-60999"), when it explains the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port_range: Option<String>,
    /// Ports of that range taken for the requested address (bind to port 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports_taken: Option<usize>,
    /// A successful bind that shares its port (`port_shared`): `SO_REUSEPORT` or
    /// `SO_REUSEADDR` (UDP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_through: Option<&'static str>,
    /// NAT rules (DNAT, REDIRECT) that take the port's traffic before any socket sees it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) forwarded_by: Vec<crate::host::nat::NatClaim>,
    /// AF_UNIX EADDRINUSE: what is at the path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_file: Option<UnixFileReport>,
}

/// Said of a diagnosis made before every lookup it needed had answered.
const UNFINISHED: &str = "a lookup did not finish in time; this diagnosis may be incomplete";

impl Diagnosis {
    /// Marks a diagnosis made without every answer it needed.
    pub(crate) fn note_unfinished(&mut self) {
        if !self.unknown.iter().any(|u| u.contains("did not finish")) {
            self.unknown.push(UNFINISHED.to_owned());
        }
    }
}

impl DiagnosisFacts {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A list of processes cut to `keep`, its full count noted once.
fn cut_processes(processes: &mut Vec<ProcessInfo>, total: &mut Option<usize>, keep: usize) {
    if processes.len() > keep {
        total.get_or_insert(processes.len());
        processes.truncate(keep);
    }
}

/// A command line cut at [`CMDLINE_CUT`] bytes, with an ellipsis.
fn cut_cmdline(cmdline: &mut String) -> bool {
    if cmdline.len() <= CMDLINE_CUT {
        return false;
    }
    let mut end = CMDLINE_CUT;
    while !cmdline.is_char_boundary(end) {
        end -= 1;
    }
    cmdline.truncate(end);
    cmdline.push('…');
    true
}

/// One step that makes a holder list smaller, the cheapest loss first: processes beyond the
/// first of a socket, then the last holder, then long command lines. `false`: nothing left
/// to take but the holders themselves.
pub(crate) fn shrink_holders(holders: &mut Vec<HolderReport>) -> bool {
    if let Some(holder) = holders.iter_mut().filter(|h| h.processes.len() > 1).max_by_key(|h| h.processes.len()) {
        let keep = holder.processes.len() / 2;
        cut_processes(&mut holder.processes, &mut holder.processes_total, keep.max(1));
        return true;
    }
    if holders.len() > 1 {
        holders.pop();
        return true;
    }
    holders.iter_mut().flat_map(|h| h.processes.iter_mut()).any(|p| cut_cmdline(&mut p.cmdline))
}

impl Diagnosis {
    /// Cuts the holder lists until the diagnosis takes at most `max` bytes of JSON, and says
    /// so in `holders_summary`. Every NDJSON line of bindtrace stays under 16 KiB: container
    /// runtimes split longer lines, and a log pipeline then gets broken JSON.
    pub(crate) fn fit(&mut self, max: usize) {
        let listed = self.holders.len();
        // Most diagnoses are far under the limit: an upper bound of their size (every
        // string escaped at 6 bytes a byte, each holder and process with its field names)
        // spares encoding them here; only a large one is measured.
        let strings: usize = self.summary.len()
            + self.unknown.iter().map(String::len).sum::<usize>()
            + self.holders.processes().map(|p| p.cmdline.len() + p.comm.len()).sum::<usize>();
        let processes = self.holders.processes().count();
        if strings * 6 + (listed + processes) * 1_024 + 4_096 <= max {
            return;
        }
        let size = |d: &Self| serde_json::to_vec(d).map_or(0, |json| json.len());
        let mut cut = false;
        while size(self) > max {
            cut = true;
            if self.holders.shrink() {
                continue;
            }
            if !self.holders.is_empty() {
                self.holders = Holders::default();
                continue;
            }
            // What is left is the summary, the facts and the unknowns, each bounded.
            break;
        }
        if cut {
            let summary = self
                .holders_summary
                .get_or_insert_with(|| HoldersSummary { total: listed, ..HoldersSummary::default() });
            summary.shown = self.holders.len();
            summary.truncated = true;
        }
    }
}

/// What an event carries about its diagnosis when it is written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Explained {
    /// A success, or diagnoses are off.
    Nothing,
    Now(Arc<Diagnosis>),
    /// The lookups were not done in time: a [`FollowUp`] with the same `seq` comes later.
    Follows,
    /// No diagnosis will come, and why (counted in the summary).
    Shed(&'static str),
}

/// An event ready for the sinks.
pub(crate) struct Enriched {
    /// 1 for the first event of the run, then one more for each.
    pub seq: u64,
    pub event: Bind,
    pub wall_ns: i128,
    pub explained: Explained,
    /// Who ran the bind (container, pod, unit); `None` when lookups are off.
    pub identity: Option<Arc<Identity>>,
}

/// The diagnosis of an event written earlier with [`Explained::Follows`].
pub(crate) struct FollowUp {
    pub seq: u64,
    pub event: Bind,
    pub wall_ns: i128,
    pub diagnosis: Arc<Diagnosis>,
}

/// Counters for the live report and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct EnrichCounters {
    pub lookups: u64,
    pub lookup_timeouts: u64,
    pub worker_restarts: u64,
    /// Diagnoses written after their event.
    pub followed: u64,
    /// Failures that got no diagnosis.
    pub shed: u64,
    /// Successful binds reported as sharing their port with another service or container.
    pub ports_shared: u64,
    /// Successful binds with SO_REUSEPORT (or UDP SO_REUSEADDR) whose sharing could not be
    /// checked (overload).
    pub sharing_unchecked: u64,
    /// Successful binds to a port a NAT rule takes (`port_forwarded`).
    pub ports_forwarded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema is the type: every kind serialises to the snake-case label that
    /// docs/ndjson-schema.md explains, and no two share one.
    #[test]
    fn every_diagnosis_kind_is_documented_in_the_schema() {
        let schema = include_str!("../../docs/ndjson-schema.md");
        let mut labels = Vec::new();
        for kind in DiagnosisKind::ALL {
            let label = serde_json::to_value(kind).expect("serialises");
            let label = label.as_str().expect("a string").to_owned();
            assert!(schema.contains(&format!("`{label}`")), "{label} is not in docs/ndjson-schema.md");
            labels.push(label);
        }
        assert_eq!(serde_json::to_value(DiagnosisKind::NotASocket).expect("serialises"), "not_a_socket");
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DiagnosisKind::ALL.len());
    }
}
