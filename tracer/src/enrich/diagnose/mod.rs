//! Failed bind + facts → explanation. Pure: no I/O, so every case is unit-tested with
//! constructed facts, and the live tests check that the facts are gathered right.
//!
//! This module classifies (which case a failure is, by the kernel's rules); `report` holds
//! the output types, `wording` the sentences shared with `bindtrace who`.

mod nat;
mod report;
mod sharing;
mod unix;
mod wording;

use crate::clock::local_time_of_day;
use smallvec::smallvec;
use std::net::{IpAddr, SocketAddr};

use bindtrace_common::{sock_flags, BindEvent, AF_INET, AF_INET6, AF_UNIX};

use self::report::comm_text;
pub(crate) use self::{
    report::holder_report,
    sharing::sharing_option,
    wording::{endpoint, holders_summary, stop_advice},
};
use super::{
    history::{BindHistory, SeenBind},
    lookup::{
        is_connection, unix_name_key, Facts, Holder, LookupKey, NetnsFacts, PortCensus, ProcessFacts, ProcessUnread,
        SocketTable, IFA_F_DADFAILED, IFA_F_OPTIMISTIC, IFA_F_TENTATIVE,
    },
};
use crate::host::{
    policy::BindPolicy,
    sockdiag::{state_name, DiagSocket, Proto, TCP_LISTEN, TCP_TIME_WAIT},
};
#[cfg(test)]
use crate::model::PROCESSES_SHOWN_MAX as PROCESSES_SHOWN;
use crate::model::{Diagnosis, DiagnosisFacts, HoldersSummary, DIAGNOSIS_BYTES_MAX};
use crate::{
    decode::{requested_endpoint, Bind, BindEventExt as _},
    errno,
};

const CAP_NET_BIND_SERVICE: u32 = 10;

/// What a failure's diagnosis needs looked up: two at most, kept inline (one allocation less
/// per failure in the enrich queue, which holds thousands under a storm).
pub(crate) type NeededLookups = smallvec::SmallVec<[LookupKey; 2]>;

/// The lookups a failed bind needs, if any.
pub(crate) fn needed_lookups(event: &Bind) -> NeededLookups {
    let netns = event.netns_ino;
    match event.errno() {
        Some(libc::EADDRINUSE) if event.family == AF_UNIX => match &event.unix_path {
            // Autobind picks a free abstract name: EADDRINUSE there has no holder to name.
            Some(path) if !path.is_autobind() => {
                // The mount namespace the probe recorded finds the path after a crash at start.
                let mnt_ns = if event.has(sock_flags::TASK_FACTS) { event.mnt_ns_ino } else { 0 };
                smallvec![LookupKey::UnixName { netns, pid: event.tgid, mnt_ns, name: unix_name_key(path) }]
            }
            _ => NeededLookups::new(),
        },
        Some(libc::EADDRINUSE) => match Proto::from_ipproto(event.protocol) {
            // A runtime's port publisher failed: which container it was starting, too.
            Some(proto) if is_port_publisher(event.comm_bytes()) && in_own_netns(netns) => {
                smallvec![
                    LookupKey::Sockets { netns, proto },
                    LookupKey::Publisher { port: event.port, proto },
                    LookupKey::Nat { netns }
                ]
            }
            // A systemd manager failed to bind for a socket unit: which one, too.
            Some(proto) if event.comm_bytes() == b"systemd" => {
                let addr = event.requested_ip().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                smallvec![
                    LookupKey::Sockets { netns, proto },
                    LookupKey::UnitStarting { pid: event.tgid, addr, port: event.port, proto },
                    LookupKey::Nat { netns }
                ]
            }
            // Whether a NAT rule also claims the port (the bind port 0 asked for has none).
            Some(proto) if event.port != 0 => {
                smallvec![LookupKey::Sockets { netns, proto }, LookupKey::Nat { netns }]
            }
            Some(proto) => smallvec![LookupKey::Sockets { netns, proto }],
            None => NeededLookups::new(),
        },
        Some(libc::EACCES | libc::EPERM) if event.family == AF_UNIX => NeededLookups::new(),
        Some(libc::EACCES | libc::EPERM) => {
            smallvec![LookupKey::Netns { netns }, LookupKey::Process { pid: event.tgid }]
        }
        Some(libc::EADDRNOTAVAIL) => smallvec![LookupKey::Netns { netns }],
        // A success: whom it shares its port with, when it may share it, and whether a NAT
        // rule takes its traffic.
        None => {
            let mut keys = sharing::needed_lookups(event);
            keys.extend(nat::needed_lookup(event));
            keys
        }
        _ => NeededLookups::new(),
    }
}

/// Is `netns` bindtrace's own network namespace (the host's, where runtimes publish ports)?
fn in_own_netns(netns: u32) -> bool {
    static OWN: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| crate::host::netns::Netns::Own.inode()).is_some_and(|own| own == u64::from(netns))
}

/// The processes that bind host ports for `docker run -p` (and podman's Docker-compatible
/// service).
fn is_port_publisher(comm: &[u8]) -> bool {
    matches!(comm, b"docker-proxy" | b"dockerd")
}

/// Does a socket on the requested port stand in the way, by the kernel's address rules?
/// Equal addresses and the wildcards 0.0.0.0 and :: conflict; an IPv6 socket without
/// IPV6_V6ONLY also covers IPv4 (:: all of it, ::ffff:a.b.c.d that one address).
pub(crate) fn conflicts(requested: Option<IpAddr>, requested_v6only: bool, holder: &DiagSocket) -> bool {
    conflicts_with(requested, requested_v6only, holder.local.ip(), holder.v6only)
}

/// [`conflicts`] with a socket's local address and IPV6_V6ONLY.
pub(crate) fn conflicts_with(
    requested: Option<IpAddr>,
    requested_v6only: bool,
    held: IpAddr,
    held_v6only: Option<bool>,
) -> bool {
    let Some(requested) = requested else {
        return true; // the address is unknown: every socket on the port may be in the way
    };
    let overlap_v4 = |a: std::net::Ipv4Addr, b: std::net::Ipv4Addr| a == b || a.is_unspecified() || b.is_unspecified();
    match (requested, held) {
        (IpAddr::V4(r), IpAddr::V4(h)) => overlap_v4(r, h),
        (IpAddr::V6(r), IpAddr::V6(h)) => r == h || r.is_unspecified() || h.is_unspecified(),
        (IpAddr::V4(r), IpAddr::V6(h)) => {
            !held_v6only.unwrap_or(false)
                && (h.is_unspecified() || h.to_ipv4_mapped().is_some_and(|mapped| overlap_v4(r, mapped)))
        }
        (IpAddr::V6(r), IpAddr::V4(h)) => {
            !requested_v6only && (r.is_unspecified() || r.to_ipv4_mapped().is_some_and(|mapped| overlap_v4(mapped, h)))
        }
    }
}

/// Order in which holders are named: listeners first, TIME_WAIT last.
pub(crate) fn holder_rank(socket: &DiagSocket) -> u8 {
    match socket.state {
        TCP_LISTEN => 0,
        TCP_TIME_WAIT => 3,
        s if s == crate::host::sockdiag::TCP_CLOSE || s == crate::host::sockdiag::TCP_BOUND => 1,
        _ => 2,
    }
}

/// The bind bindtrace saw for a holder: by its own process if it bound the port itself, else
/// the latest on the port (a socket handed to another process, as a supervisor does).
/// The bind of the holder's own socket (its address) first: a process holding 0.0.0.0:P
/// and [::]:P made two.
fn seen_for<'a>(history: &'a BindHistory, key: (u32, u16, u16), holder: &Holder) -> Option<&'a SeenBind> {
    let at = holder.socket.local.ip();
    holder
        .processes
        .iter()
        .find_map(|p| history.latest_at(key, Some(p.pid), at))
        .or_else(|| history.latest_at(key, None, at))
        .or_else(|| holder.processes.iter().find_map(|p| history.latest(key, Some(p.pid))))
        .or_else(|| history.latest(key, None))
}

/// A holder list read from /proc/net (sock_diag unavailable) lacks TCP sockets that are only
/// bound, and IPV6_V6ONLY: a diagnosis that nothing holds the port, or that rests on
/// IPV6_V6ONLY, says what it could not see.
fn hedge_without_sock_diag(diagnosis: &mut Diagnosis, event: &BindEvent) {
    let tcp = Proto::from_ipproto(event.protocol) == Some(Proto::Tcp);
    if diagnosis.kind == "released" && tcp {
        diagnosis.kind = "unknown";
        diagnosis.summary = format!(
            "no TCP socket bindtrace can see holds port {} now; without sock_diag (inet_diag) it cannot see sockets \
             that are only bound (neither listening nor connected), and one may hold it",
            event.port
        );
    }
    if diagnosis.kind == "in_use_dual_stack" {
        diagnosis.unknown.push("IPV6_V6ONLY of the holder is not known without sock_diag (inet_diag)".to_owned());
    }
    diagnosis.unknown.push("the sockets were read from /proc/net: sock_diag (inet_diag) is not available".to_owned());
}

/// bind(port 0) failed: no port of the ephemeral range is free for this address. How many
/// are taken, by what, and what to change.
fn ephemeral_exhausted(event: &BindEvent, table: &SocketTable) -> Diagnosis {
    let proto = Proto::from_ipproto(event.protocol).unwrap_or(Proto::Tcp);
    let requested = event.requested_ip();
    let v6only = event.has(sock_flags::V6ONLY);
    let mut facts = DiagnosisFacts::default();
    let remedies = "set IP_BIND_ADDRESS_NO_PORT before a bind that precedes connect(), widen \
                    net.ipv4.ip_local_port_range, or use fewer sockets at once";
    let summary = match table.local_port_range {
        Some((lo, hi)) => {
            let (taken, time_wait) =
                table.ports_taken(lo, hi, |local, held_v6only| conflicts_with(requested, v6only, local, held_v6only));
            let size = usize::from(hi.saturating_sub(lo)) + 1;
            facts.local_port_range = Some(format!("{lo}-{hi}"));
            facts.ports_taken = Some(taken);
            let mut waiting =
                if time_wait > 0 { format!(", {time_wait} of them only by TIME_WAIT sockets") } else { String::new() };
            if taken < size && proto == Proto::Tcp {
                // Before 6.8, sock_diag does not list TCP sockets that are bound but neither
                // listening nor connected: the rest of the range may be theirs.
                waiting.push_str(
                    " (sock_diag lists TCP sockets that are only bound from Linux 6.8 on: on older kernels they hold the rest)",
                );
            }
            format!(
                "no free port for {} on {}: {taken} of the {size} ports of net.ipv4.ip_local_port_range ({lo}-{hi}) are taken{waiting}; {remedies}",
                proto.name(),
                requested.map_or_else(|| "this address".to_owned(), |ip| ip.to_string()),
            )
        }
        None => format!("bind to port 0 found no free port in the ephemeral range for {}; {remedies}", proto.name()),
    };
    Diagnosis {
        kind: "ephemeral_exhausted",
        summary,
        holders: Vec::new(),
        facts,
        unknown: Vec::new(),
        unix_holders: Vec::new(),
        holders_summary: None,
    }
}

/// The holders a diagnosis lists: every socket in the way that is not a connection (up to
/// this many), and a few connections as examples; the rest are counted in `holders_summary`.
const HOLDERS_SHOWN_MAX: usize = 16;
const CONNECTIONS_SHOWN_MAX: usize = 2;

/// The sockets in the way, counted: from the lookup's census of the port (every socket,
/// kept or not), or from the holders themselves when there is none.
fn count_blocking(
    event: &BindEvent,
    holders: &[&Holder],
    census: Option<&PortCensus>,
    shown: usize,
) -> Option<HoldersSummary> {
    let requested = event.requested_ip();
    let v6only = event.has(sock_flags::V6ONLY);
    let proto = Proto::from_ipproto(event.protocol).unwrap_or(Proto::Tcp);
    let mut by_state = std::collections::BTreeMap::new();
    let mut distinct_peers = None;
    match census {
        Some(census) => {
            for group in census.groups.iter().filter(|g| {
                conflicts_with(requested, v6only, g.local, g.v6only) && (!event.is_listen() || g.state == TCP_LISTEN)
            }) {
                *by_state.entry(state_name(proto, group.state)).or_default() += group.count as usize;
            }
            distinct_peers = (census.distinct_peers > 0).then_some(census.distinct_peers);
        }
        None => {
            for holder in holders {
                *by_state.entry(state_name(proto, holder.socket.state)).or_default() += 1;
            }
        }
    }
    let total = by_state.values().sum::<usize>().max(holders.len());
    (total > 0).then_some(HoldersSummary { total, shown, by_state, distinct_peers, truncated: total > shown })
}

fn in_use(
    event: &BindEvent,
    holders: &[Holder],
    census: Option<&PortCensus>,
    history: &BindHistory,
    local_port_range: Option<(u16, u16)>,
) -> Diagnosis {
    let proto = Proto::from_ipproto(event.protocol).unwrap_or(Proto::Tcp);
    let port = event.port;
    let requested = event.requested_ip();
    let key = (event.netns_ino, event.protocol, port);
    // A failed listen() conflicts with listeners only: the failing socket is itself bound
    // there, as may be others with SO_REUSEADDR.
    let listen = event.is_listen();
    let mut blocking: Vec<&Holder> = holders
        .iter()
        .filter(|h| conflicts(requested, event.has(sock_flags::V6ONLY), &h.socket))
        .filter(|h| !listen || h.socket.state == TCP_LISTEN)
        .collect();
    // A holder of the request's own family first: when one blocks, the other family's
    // (a dual-stack overlap) is not the reason, and fixing IPV6_V6ONLY would not be enough.
    let other_family = |h: &Holder| {
        !matches!((event.family, h.socket.local), (AF_INET, SocketAddr::V4(_)) | (AF_INET6, SocketAddr::V6(_)))
    };
    blocking.sort_by_key(|h| (holder_rank(&h.socket), other_family(h)));
    let shown: Vec<&Holder> = blocking
        .iter()
        .filter(|h| !is_connection(h.socket.state))
        .take(HOLDERS_SHOWN_MAX)
        .chain(blocking.iter().filter(|h| is_connection(h.socket.state)).take(CONNECTIONS_SHOWN_MAX))
        .copied()
        .collect();
    let reports = shown.iter().map(|h| holder_report(h, seen_for(history, key, h))).collect();
    let counted = count_blocking(event, &blocking, census, shown.len());
    let blocking_total = counted.as_ref().map_or(0, |s| s.total);
    let on_port = census.map_or(holders.len(), PortCensus::total);
    let mut facts = DiagnosisFacts::default();
    // The failing process itself bound an overlapping address of this port before (a
    // listen-twice crash, a script binding twice): said as such, also once it has exited and
    // the port is free again.
    let own_earlier_bind = history.latest(key, Some(event.tgid)).filter(|seen| {
        seen.addr.is_some_and(|addr| conflicts_with(requested, event.has(sock_flags::V6ONLY), addr, None))
    });
    let Some(first) = blocking.first() else {
        if let Some(own) = own_earlier_bind {
            return Diagnosis {
                kind: "in_use_self",
                summary: format!(
                    "the failing process (pid {}) held port {port}/{} itself: it bound {} at {} on another socket; \
                     nothing holds the port now (that socket was closed, or the process exited): bind each address \
                     once (or set SO_REUSEPORT on both sockets)",
                    event.tgid,
                    proto.name(),
                    own.addr.map(|ip| endpoint(SocketAddr::new(ip, port))).unwrap_or_default(),
                    local_time_of_day(own.wall_ns)
                ),
                holders: reports,
                facts,
                unknown: Vec::new(),
                unix_holders: Vec::new(),
                holders_summary: None,
            };
        }
        let summary = if on_port == 0 {
            format!(
                "nothing holds port {port}/{} any more: it was released before bindtrace looked; retry the bind",
                proto.name()
            )
        } else {
            format!(
                "no socket on port {port}/{} overlaps {} by address now ({} other socket(s) use the port); retry the bind",
                proto.name(),
                requested_endpoint(event),
                on_port
            )
        };
        return Diagnosis {
            kind: "released",
            summary,
            holders: reports,
            facts,
            unknown: Vec::new(),
            unix_holders: Vec::new(),
            holders_summary: None,
        };
    };

    if blocking.iter().all(|h| h.socket.state == TCP_TIME_WAIT) {
        let expires = blocking.iter().filter_map(|h| h.socket.timer_ms).max();
        let new_has = event.has(sock_flags::REUSEADDR);
        // The socket that went into TIME_WAIT was accepted from a listener bindtrace may have
        // seen binding this port.
        let old_has = history.latest(key, None).map(|seen| seen.reuseaddr);
        facts.time_wait_expires_ms = expires;
        facts.new_socket_reuseaddr = Some(new_has);
        facts.old_socket_reuseaddr = old_has;
        let wait = expires.map(|ms| format!(", or wait {} s", ms.div_ceil(1000))).unwrap_or_default();
        let advice = match (new_has, old_has) {
            (false, Some(true)) => format!("set SO_REUSEADDR on the new socket (the old listener had it){wait}"),
            (false, _) => {
                format!("set SO_REUSEADDR on the new socket and on the listening socket that left them{wait}")
            }
            (true, Some(false)) => {
                format!("the old listening socket did not set SO_REUSEADDR: it must be set on both sides{wait}")
            }
            (true, _) => {
                format!("the new socket has SO_REUSEADDR; the listening socket that left them needs it too{wait}")
            }
        };
        let expires_text = expires.map(|ms| format!(" (expires in {} s)", ms.div_ceil(1000))).unwrap_or_default();
        return Diagnosis {
            kind: "time_wait",
            summary: format!("only TIME_WAIT sockets hold {port}/{}{expires_text}, no process: {advice}", proto.name()),
            holders: reports,
            facts,
            unknown: Vec::new(),
            unix_holders: Vec::new(),
            holders_summary: counted,
        };
    }

    let mut live: Vec<&&Holder> = blocking.iter().filter(|h| h.socket.state != TCP_TIME_WAIT).collect();
    // The own family leads whatever the states (a dual-stack listener does not outrank a
    // same-family bound socket as the reason).
    live.sort_by_key(|h| other_family(h));
    let first = live.first().copied().unwrap_or(first);
    let seen = seen_for(history, key, first);
    let mut unknown = Vec::new();
    if first.processes.is_empty() && first.socket.inode != 0 {
        unknown.push(match first.blind_reason() {
            Some(why) => format!("the process holding socket inode {} is not visible: {why}", first.socket.inode),
            None => format!(
                "no process with socket inode {} open was found (a socket the kernel holds, or its process exited just now)",
                first.socket.inode
            ),
        });
    }
    let base =
        holders_summary(proto, port, &live.iter().map(|h| (**h).clone()).collect::<Vec<_>>(), seen, blocking_total);
    let cross_family =
        matches!((event.family, first.socket.local), (AF_INET, SocketAddr::V6(_)) | (AF_INET6, SocketAddr::V4(_)));
    // Also when no process has the socket open any more but bindtrace saw the failing
    // process bind it (it exited, leaving the socket to close).
    let itself = first.processes.iter().any(|p| p.pid == event.tgid)
        || (first.processes.is_empty() && seen.is_some_and(|s| s.pid == event.tgid));
    let connected = !first.socket.peer.ip().is_unspecified() && first.socket.state != TCP_LISTEN;
    let in_ephemeral_range = local_port_range.filter(|(lo, hi)| (*lo..=*hi).contains(&port));
    if let Some((lo, hi)) = in_ephemeral_range {
        facts.local_port_range = Some(format!("{lo}-{hi}"));
    }
    let (kind, advice) = if listen {
        (
            "listen_in_use",
            format!(
                "SO_REUSEADDR lets sockets bind the same address, but only one may listen on it: {}, or set SO_REUSEPORT \
                 on both sockets to share it",
                if itself { "close the process's other listener" } else { "stop the other listener" }
            ),
        )
    } else if cross_family {
        let held_v6 = first.socket.local.is_ipv6();
        let side = match (itself, held_v6) {
            (true, true) => "the process's own [::] socket also covers IPv4",
            (true, false) => "the process's own IPv4 socket is covered by this [::] bind",
            (false, true) => "the holder's [::] also covers IPv4",
            (false, false) => "your [::] also covers IPv4",
        };
        (
            "in_use_dual_stack",
            format!("{side} because IPV6_V6ONLY is off: set IPV6_V6ONLY on the IPv6 socket, or bind one family"),
        )
    } else if itself {
        (
            "in_use_self",
            "the failing process holds it itself, on another socket: bind each address once (or set SO_REUSEPORT on both)"
                .to_owned(),
        )
    } else if let (true, Some((lo, hi))) = (connected, in_ephemeral_range) {
        (
            "in_use_ephemeral",
            format!(
                "port {port} is inside net.ipv4.ip_local_port_range ({lo}-{hi}), so an outbound connection (to {}) took it as its \
                 source port; keep listening ports out of that range, or reserve it: sysctl net.ipv4.ip_local_reserved_ports={port}",
                endpoint(first.socket.peer)
            ),
        )
    } else if event.has(sock_flags::REUSEPORT) {
        match seen {
            Some(s) if !s.reuseport => {
                ("in_use_reuseport", "the holder did not set SO_REUSEPORT: every socket sharing a port needs it".to_owned())
            }
            Some(s) if s.uid != event.uid => (
                "in_use_reuseport",
                format!(
                    "both sockets set SO_REUSEPORT but belong to different users (uid {} vs {}): a SO_REUSEPORT group needs one effective uid",
                    s.uid, event.uid
                ),
            ),
            _ if first.socket.uid != event.uid => (
                "in_use_reuseport",
                format!(
                    "SO_REUSEPORT sharing needs SO_REUSEPORT on the holder too and the same uid (holder {}, caller {})",
                    first.socket.uid, event.uid
                ),
            ),
            _ => ("in_use_reuseport", "SO_REUSEPORT sharing needs SO_REUSEPORT on the holder too".to_owned()),
        }
    } else {
        ("in_use", stop_advice(first))
    };
    Diagnosis {
        kind,
        summary: format!("{base}; {advice}"),
        holders: reports,
        facts,
        unknown,
        unix_holders: Vec::new(),
        holders_summary: counted,
    }
}

fn has_cap(effective: u64, cap: u32) -> bool {
    effective & (1u64 << cap) != 0
}

fn access(
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
            kind: "unknown",
            summary: format!("EACCES for port {port}: a privileged port, a cgroup BPF program or an LSM refused it"),
            holders: Vec::new(),
            facts,
            unknown,
            unix_holders: Vec::new(),
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
                    holders: Vec::new(),
                    facts,
                    unknown,
                    unix_holders: Vec::new(),
                    holders_summary: None,
                };
            }
        }
    }
    let (kind, summary) = match (privileged, facts.cap_net_bind_service) {
        (true, Some(false)) => (
            "privileged_port",
            format!(
                "port {port} is below net.ipv4.ip_unprivileged_port_start ({start}) and {who} lacks CAP_NET_BIND_SERVICE: \
                 grant it (setcap cap_net_bind_service=+ep, or AmbientCapabilities= in systemd), lower the sysctl, or use a port from {start} up"
            ),
        ),
        (true, None) => (
            "privileged_port",
            format!("port {port} is below net.ipv4.ip_unprivileged_port_start ({start}): {who} needs CAP_NET_BIND_SERVICE"),
        ),
        (true, Some(true)) => (
            "refused_by_policy",
            format!(
                "{who} has CAP_NET_BIND_SERVICE, so port {port} being privileged (below {start}) is not the reason: \
                 a cgroup BPF program or an LSM (SELinux, AppArmor) refused it, or the capability belongs to a user namespace that does not own this network namespace"
            ),
        ),
        (false, _) => (
            "refused_by_policy",
            format!(
                "port {port} is not privileged here (net.ipv4.ip_unprivileged_port_start = {start}): a cgroup BPF program or an LSM (SELinux, AppArmor) refused the bind"
            ),
        ),
    };
    Diagnosis { kind, summary, holders: Vec::new(), facts, unknown, unix_holders: Vec::new(), holders_summary: None }
}

/// A refusal that capabilities do not explain, named from what is in force: a cgroup BPF bind
/// program on the caller's cgroup, else an active LSM. `None` when neither can be named.
fn policy_refusal(
    event: &BindEvent,
    policy: &BindPolicy,
    facts: &mut DiagnosisFacts,
    unknown: &mut Vec<String>,
) -> Option<(&'static str, String)> {
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
                "refused_by_cgroup_bpf",
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
        "refused_by_lsm",
        format!(
            "no capability rule explains it{no_cgroup}, and {} {} active: it refused the bind (look for the denial: \
             journalctl -k | grep -i denied, or ausearch -m avc)",
            active.join(" and "),
            if active.len() == 1 { "is" } else { "are" }
        ),
    ))
}

/// Is `addr` local in a namespace with these interface addresses? 127.0.0.0/8 is local as a
/// whole when loopback is up; multicast addresses may always be bound.
pub(crate) fn is_local_address(addr: IpAddr, addresses: &[IpAddr]) -> bool {
    addr.is_unspecified()
        || addr.is_multicast()
        || addresses.contains(&addr)
        || (addr.is_loopback() && addr.is_ipv4() && addresses.iter().any(|a| a.is_loopback() && a.is_ipv4()))
}

fn not_available(event: &BindEvent, netns: Option<&NetnsFacts>) -> Diagnosis {
    let mut facts = DiagnosisFacts::default();
    let Some(addr) = event.requested_ip() else {
        return Diagnosis {
            kind: "unknown",
            summary: "the requested address could not be read, so the cause is unknown".to_owned(),
            holders: Vec::new(),
            facts,
            unknown: vec!["requested address".to_owned()],
            unix_holders: Vec::new(),
            holders_summary: None,
        };
    };
    let Some(netns) = netns else {
        return Diagnosis {
            kind: "unknown",
            summary: format!("{addr} could not be checked: the network namespace was not found"),
            holders: Vec::new(),
            facts,
            unknown: vec!["interface addresses of the namespace".to_owned()],
            unix_holders: Vec::new(),
            holders_summary: None,
        };
    };
    let assigned = is_local_address(addr, &netns.addresses);
    let (sysctl, nonlocal) = if addr.is_ipv4() {
        ("net.ipv4.ip_nonlocal_bind", netns.nonlocal_bind_v4)
    } else {
        ("net.ipv6.ip_nonlocal_bind", netns.nonlocal_bind_v6)
    };
    facts.address_assigned = Some(assigned);
    facts.ip_nonlocal_bind = nonlocal;
    let freebind = event.has(sock_flags::FREEBIND) || event.has(sock_flags::TRANSPARENT);
    // An IPv6 address can be there and still not bindable: duplicate address detection has
    // not finished (tentative), or found the address in use on the link (dadfailed).
    let v6_state = match addr {
        IpAddr::V6(v6) => netns.ipv6_states.iter().find(|s| s.addr == v6),
        IpAddr::V4(_) => None,
    };
    if let Some(state) = v6_state {
        facts.ipv6_flags = Some(format!("{:#04x}", state.flags));
        let interface = &state.interface;
        let found = if state.flags & IFA_F_DADFAILED != 0 {
            Some((
                "address_dad_failed",
                format!(
                    "{addr} on {interface} failed duplicate address detection: another host on the link uses it; \
                     use another address (the kernel will not let it be bound)"
                ),
            ))
        } else if state.flags & IFA_F_TENTATIVE != 0 && state.flags & IFA_F_OPTIMISTIC == 0 {
            Some((
                "address_tentative",
                format!(
                    "{addr} on {interface} is still tentative: duplicate address detection has not finished (it waits \
                     for the link to come up, then takes about a second); retry then, set IP_FREEBIND, or turn DAD off \
                     for the interface (net.ipv6.conf.{interface}.accept_dad=0) or make it optimistic"
                ),
            ))
        } else {
            None
        };
        if let Some((kind, summary)) = found {
            facts.address_assigned = Some(true);
            return Diagnosis {
                kind,
                summary,
                holders: Vec::new(),
                facts,
                unknown: Vec::new(),
                unix_holders: Vec::new(),
                holders_summary: None,
            };
        }
    }
    let summary = if assigned {
        format!("{addr} is assigned here now and usable: it was missing when bind() ran (added since); retry")
    } else {
        format!(
            "{addr} is not assigned to any interface in this network namespace, {sysctl} = {} and IP_FREEBIND is {}: \
             bind an address the host has (ip -br addr), the wildcard, or set IP_FREEBIND",
            nonlocal.map_or("?".to_owned(), |v| v.to_string()),
            if freebind { "on" } else { "off" }
        )
    };
    Diagnosis {
        kind: "address_not_available",
        summary,
        holders: Vec::new(),
        facts,
        unknown: Vec::new(),
        unix_holders: Vec::new(),
        holders_summary: None,
    }
}

/// A bind the caller got wrong, where nothing on the host is in the way.
fn caller_error(kind: &'static str, summary: &str) -> Diagnosis {
    Diagnosis {
        kind,
        summary: summary.to_owned(),
        holders: Vec::new(),
        facts: DiagnosisFacts::default(),
        unknown: Vec::new(),
        unix_holders: Vec::new(),
        holders_summary: None,
    }
}

fn invalid(event: &BindEvent) -> Diagnosis {
    let mut facts = DiagnosisFacts::default();
    let needed = match event.family {
        AF_INET => Some(16),
        AF_INET6 => Some(28),
        _ => None,
    };
    let (kind, summary) = if event.has(sock_flags::ADDR_SHORT) {
        let needs = needed.map(|n| format!(" (needs {n})")).unwrap_or_default();
        ("invalid_address", format!("addrlen {} is too short for this address family{needs}", event.addrlen))
    } else if event.bound_port != 0 {
        let bound = match event.bound_ip() {
            Some(ip) => format!("{ip}:{}", event.bound_port),
            None => format!("port {}", event.bound_port),
        };
        facts.already_bound_to = Some(bound.clone());
        (
            "already_bound",
            format!(
                "the socket is already bound to {bound} (by an earlier bind, connect or listen): a socket binds once; use a new socket"
            ),
        )
    } else if let Some(IpAddr::V6(v6)) = event.requested_ip() {
        if v6.to_ipv4_mapped().is_some() && event.has(sock_flags::V6ONLY) {
            ("invalid_address", "an IPV6_V6ONLY socket cannot bind an IPv4-mapped address".to_owned())
        } else if v6.is_unicast_link_local() && event.scope_id == 0 {
            ("invalid_address", format!("link-local {v6} needs a scope id (the interface, as in fe80::1%eth0)"))
        } else {
            ("invalid_address", "bind() rejected the address as invalid for this socket".to_owned())
        }
    } else {
        ("invalid_address", "bind() rejected the address as invalid for this socket".to_owned())
    };
    Diagnosis {
        kind,
        summary,
        holders: Vec::new(),
        facts,
        unknown: Vec::new(),
        unix_holders: Vec::new(),
        holders_summary: None,
    }
}

/// The diagnosis of a failed bind from the facts its lookups produced (`facts` answers
/// for each key of [`needed_lookups`]).
pub(crate) fn diagnose<'a>(
    event: &Bind,
    facts: impl Fn(&LookupKey) -> Option<&'a Facts>,
    history: &BindHistory,
) -> Option<Diagnosis> {
    let Some(errno) = event.errno() else {
        // A success: reported when a NAT rule takes its traffic, or it shares its port.
        let forwarded = nat::port_forwarded(event, &facts);
        let shared = sharing::port_shared(event, &facts, history);
        return match (forwarded, shared) {
            (Some(mut forwarded), Some(shared)) => {
                forwarded.summary = format!("{}; also, {}", forwarded.summary, shared.summary);
                forwarded.holders = shared.holders;
                forwarded.holders_summary = shared.holders_summary;
                forwarded.facts.shared_through = shared.facts.shared_through;
                forwarded.unknown.extend(shared.unknown);
                Some(forwarded)
            }
            (forwarded, shared) => forwarded.or(shared),
        };
    };
    let lookup_error = |key: &LookupKey| match facts(key) {
        Some(Facts::Sockets(Err(e))) | Some(Facts::Netns(Err(e))) => Some(e.clone()),
        _ => None,
    };
    let diagnosis = match errno {
        libc::EADDRINUSE if event.family == AF_UNIX => {
            let key = needed_lookups(event).into_iter().next();
            unix::unix_in_use(event, key.as_ref().and_then(&facts))
        }
        libc::EADDRINUSE => {
            let keys = needed_lookups(event);
            match keys.first().map(|k| (k, facts(k))) {
                Some((_, Some(Facts::Sockets(Ok(table))))) if event.port == 0 && event.requested_ip().is_some() => {
                    ephemeral_exhausted(event, table)
                }
                Some((_, Some(Facts::Sockets(Ok(table))))) => {
                    let mut diagnosis = in_use(
                        event,
                        &table.holders(event.port),
                        table.census(event.port),
                        history,
                        table.local_port_range,
                    );
                    if !table.from_sock_diag {
                        hedge_without_sock_diag(&mut diagnosis, event);
                    }
                    match keys.get(1).and_then(&facts) {
                        Some(Facts::Publisher(Ok(Some(publishing)))) => {
                            let mut publishing = publishing.clone();
                            // `-p PORT:...` without an address: the bind shows which one.
                            if publishing.publication.host_ip.is_none() {
                                publishing.publication.host_ip = event.requested_ip();
                                publishing.mapping = publishing.publication.mapping(&publishing.container.label());
                            }
                            diagnosis.summary = format!(
                                "{} could not publish {} for container {}: {}",
                                publishing.container.runtime.name(),
                                publishing.mapping,
                                publishing.container.label(),
                                diagnosis.summary
                            );
                            diagnosis.facts.publishing_for = Some(publishing);
                        }
                        Some(Facts::Publisher(Err(why))) => {
                            diagnosis.unknown.push(format!("the container being started could not be named: {why}"))
                        }
                        Some(Facts::UnitStarting(Ok(Some(unit)))) => {
                            diagnosis.summary = format!(
                                "systemd could not start {} ({}: the address is taken): {}",
                                unit.name, unit.listen, diagnosis.summary
                            );
                            diagnosis.facts.starting_unit = Some(unit.clone());
                        }
                        Some(Facts::UnitStarting(Err(why))) => diagnosis
                            .unknown
                            .push(format!("the socket unit systemd was starting could not be named: {why}")),
                        _ => {}
                    }
                    if let Some(Facts::Nat(rules)) = facts(&LookupKey::Nat { netns: event.netns_ino }) {
                        nat::note_claims(&mut diagnosis, event, rules);
                    }
                    diagnosis
                }
                Some((key, _)) => Diagnosis {
                    kind: "unknown",
                    summary: format!("port {} is in use, but its holders could not be looked up", event.port),
                    holders: Vec::new(),
                    facts: DiagnosisFacts::default(),
                    unknown: vec![lookup_error(key).unwrap_or_else(|| "holder lookup did not finish".to_owned())],
                    unix_holders: Vec::new(),
                    holders_summary: None,
                },
                None => Diagnosis {
                    kind: "unknown",
                    summary: format!("port {} is in use; holders are looked up for TCP and UDP only", event.port),
                    holders: Vec::new(),
                    facts: DiagnosisFacts::default(),
                    unknown: Vec::new(),
                    unix_holders: Vec::new(),
                    holders_summary: None,
                },
            }
        }
        libc::EACCES | libc::EPERM if event.family == AF_UNIX => caller_error(
            "unix_path_permission",
            &format!(
                "pid {} ({}) may not create {}: a directory on the way does not let it search or write there \
                 (EACCES), or a policy refused it; check the directory's owner and mode",
                event.tgid,
                comm_text(&event.comm),
                event.endpoint()
            ),
        ),
        libc::EACCES | libc::EPERM | libc::EADDRNOTAVAIL => {
            let netns_key = LookupKey::Netns { netns: event.netns_ino };
            let netns = match facts(&netns_key) {
                Some(Facts::Netns(Ok(n))) => Some(n),
                _ => None,
            };
            let mut diagnosis = if errno == libc::EACCES || errno == libc::EPERM {
                let process = match facts(&LookupKey::Process { pid: event.tgid }) {
                    Some(Facts::Process(p)) => Some(p.as_ref().map_err(|why| *why)),
                    _ => None,
                };
                access(event, netns, process)
            } else {
                not_available(event, netns)
            };
            if let Some(err) = lookup_error(&netns_key) {
                diagnosis.unknown.push(err);
            }
            diagnosis
        }
        libc::EINVAL if event.has(sock_flags::ADDR_NULL) => {
            caller_error("invalid_address", "the address passed to bind() is NULL")
        }
        libc::EINVAL => invalid(event),
        libc::EFAULT => caller_error(
            "bad_address",
            &if event.has(sock_flags::ADDR_NULL) {
                "the address passed to bind() is NULL".to_owned()
            } else {
                format!(
                    "the address passed to bind() ({} bytes) is not memory the process can read: a dangling or wrong pointer",
                    event.addrlen
                )
            },
        ),
        libc::EBADF => caller_error(
            "bad_fd",
            &format!("fd {} is not an open file descriptor of the process (closed already, or never opened)", event.fd),
        ),
        libc::ENOTSOCK => caller_error("not_a_socket", &format!("fd {} is open but is not a socket", event.fd)),
        _ => Diagnosis {
            kind: "other",
            summary: match (errno::name(errno), errno::message(errno)) {
                (Some(name), Some(message)) => format!("{name}: {message}"),
                _ => format!("errno {errno}"),
            },
            holders: Vec::new(),
            facts: DiagnosisFacts::default(),
            unknown: Vec::new(),
            unix_holders: Vec::new(),
            holders_summary: None,
        },
    };
    let mut diagnosis = diagnosis;
    diagnosis.fit(DIAGNOSIS_BYTES_MAX);
    Some(diagnosis)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::{
        decode::tests::sample_event,
        enrich::lookup::{OwnersSeen, ProcessFacts, SocketTable},
        host::owners::ProcessInfo,
    };

    fn socket(local: &str, state: u8, v6only: Option<bool>) -> DiagSocket {
        DiagSocket {
            proto: Proto::Tcp,
            local: local.parse().expect("addr"),
            peer: "0.0.0.0:0".parse().expect("addr"),
            state,
            uid: 0,
            inode: 99,
            timer_ms: None,
            v6only,
        }
    }

    fn nginx() -> ProcessInfo {
        ProcessInfo {
            pid: 977,
            comm: "nginx".into(),
            cmdline: "nginx: master process".into(),
            cgroup: Some("/system.slice/nginx.service".into()),
            uid: Some(0),
            identity: None,
            forwards: None,
            socket_unit: None,
            start_time: 0,
            session: 0,
        }
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().expect("ip"))
    }

    #[test]
    fn conflict_rules_follow_the_kernel() {
        let v4_any = socket("0.0.0.0:80", TCP_LISTEN, None);
        let v4_lo = socket("127.0.0.1:80", TCP_LISTEN, None);
        let v6_any_dual = socket("[::]:80", TCP_LISTEN, Some(false));
        let v6_any_only = socket("[::]:80", TCP_LISTEN, Some(true));
        let v6_mapped = socket("[::ffff:127.0.0.1]:80", TCP_LISTEN, Some(false));
        assert!(conflicts(ip("127.0.0.1"), false, &v4_any));
        assert!(conflicts(ip("0.0.0.0"), false, &v4_lo));
        assert!(conflicts(ip("127.0.0.1"), false, &v4_lo));
        assert!(!conflicts(ip("127.0.0.2"), false, &v4_lo));
        assert!(conflicts(ip("127.0.0.1"), false, &v6_any_dual), ":: without V6ONLY covers IPv4");
        assert!(!conflicts(ip("127.0.0.1"), false, &v6_any_only), ":: with V6ONLY does not");
        assert!(conflicts(ip("127.0.0.1"), false, &v6_mapped));
        assert!(!conflicts(ip("127.0.0.2"), false, &v6_mapped));
        assert!(conflicts(ip("::"), false, &v4_lo), "[::] without V6ONLY meets IPv4 holders");
        assert!(!conflicts(ip("::"), true, &v4_lo));
        assert!(conflicts(ip("::1"), false, &socket("[::]:80", TCP_LISTEN, Some(true))));
        assert!(!conflicts(ip("::1"), false, &socket("[::2]:80", TCP_LISTEN, Some(true))));
        assert!(conflicts(None, false, &v4_lo), "unknown request address");
    }

    fn holders_facts(holders: Vec<Holder>) -> Facts {
        Facts::Sockets(Ok(SocketTable::from_holders(holders)))
    }

    fn run(event: &BindEvent, facts: &[(LookupKey, Facts)], history: &BindHistory) -> Diagnosis {
        diagnose(&(*event).into(), |key| facts.iter().find(|(k, _)| k == key).map(|(_, f)| f), history)
            .expect("a failure")
    }

    /// Issue 19: every ESTABLISHED socket on a busy port was a "holder" (a 7.2 MB line).
    #[test]
    fn a_busy_port_names_its_listener_and_counts_the_connections() {
        let event = sample_event(); // 127.0.0.1:8080 tcp EADDRINUSE
        let listener = Holder {
            socket: socket("0.0.0.0:8080", TCP_LISTEN, None),
            processes: vec![nginx(); 40],
            owners: OwnersSeen::Complete,
        };
        let mut holders = vec![listener];
        for i in 0..18_000u32 {
            let mut accepted = socket("127.0.0.1:8080", 1, None);
            accepted.inode = 1_000 + i;
            accepted.peer = SocketAddr::new(IpAddr::from([127, 0, 0, 2 + (i % 3) as u8]), 10_000 + (i % 50_000) as u16);
            holders.push(Holder { socket: accepted, processes: vec![nginx()], owners: OwnersSeen::Complete });
        }
        let facts = vec![(needed_lookups(&event.into()).remove(0), holders_facts(holders))];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "in_use");
        assert_eq!(d.holders[0].state, "LISTEN");
        assert!(d.holders.len() <= HOLDERS_SHOWN_MAX + CONNECTIONS_SHOWN_MAX, "{}", d.holders.len());
        assert_eq!((d.holders[0].processes.len(), d.holders[0].processes_total), (PROCESSES_SHOWN, Some(40)));
        let summary = d.holders_summary.as_ref().expect("counted");
        assert_eq!((summary.total, summary.shown, summary.truncated), (18_001, d.holders.len(), true));
        assert_eq!(summary.by_state.get("ESTABLISHED"), Some(&18_000));
        assert_eq!(summary.by_state.get("LISTEN"), Some(&1));
        assert_eq!(summary.distinct_peers, Some(3));
        assert!(d.summary.contains("(+18000 more sockets)"), "{}", d.summary);
        let json = serde_json::to_string(&d).expect("json");
        assert!(json.len() <= DIAGNOSIS_BYTES_MAX, "{} bytes", json.len());
    }

    /// Sixteen SO_REUSEPORT listeners with long command lines do not fit: the list is cut,
    /// and says so.
    #[test]
    fn a_diagnosis_too_long_for_a_line_is_cut_to_fit() {
        let mut event = sample_event();
        event.sock_flags |= sock_flags::REUSEPORT;
        let worker = |pid: u32| ProcessInfo { pid, cmdline: format!("worker {}", "x".repeat(500)), ..nginx() };
        let holders: Vec<Holder> = (0..16u32)
            .map(|i| {
                let mut listener = socket("127.0.0.1:8080", TCP_LISTEN, None);
                listener.inode = 100 + i;
                Holder {
                    socket: listener,
                    processes: (0..8).map(|p| worker(1_000 + i * 8 + p)).collect(),
                    owners: OwnersSeen::Complete,
                }
            })
            .collect();
        let facts = vec![(needed_lookups(&event.into()).remove(0), holders_facts(holders))];
        let d = run(&event, &facts, &BindHistory::default());
        let json = serde_json::to_string(&d).expect("json");
        assert!(json.len() <= DIAGNOSIS_BYTES_MAX, "{} bytes", json.len());
        let summary = d.holders_summary.as_ref().expect("says it was cut");
        assert!(summary.truncated && summary.total == 16 && summary.shown == d.holders.len(), "{summary:?}");
        assert!(!d.holders.is_empty(), "the first holder is still named");
    }

    #[test]
    fn listener_holder_is_named_with_its_process_and_bind_time() {
        let event = sample_event(); // 127.0.0.1:8080 tcp EADDRINUSE
        let mut history = BindHistory::default();
        let mut holder_bind = sample_event();
        holder_bind.ret = 0;
        holder_bind.tgid = 977;
        history.record(&holder_bind, 1_795_600_931_000_000_000);
        let key = needed_lookups(&event.into()).remove(0);
        let facts = vec![(key, holders_facts(vec![nginx_listening("0.0.0.0:8080", None)]))];
        let d = run(&event, &facts, &history);
        assert_eq!(d.kind, "in_use");
        assert!(
            d.summary
                .starts_with("port 8080/tcp is held by pid 977 (nginx: master process), LISTEN on 0.0.0.0:8080 since "),
            "{}",
            d.summary
        );
        assert!(d.summary.ends_with("; stop it or bind another port"), "{}", d.summary);
        assert_eq!(d.holders.len(), 1);
        assert_eq!(d.holders[0].processes[0].pid, 977);
        assert!(d.holders[0].seen_bind.is_some());
    }

    #[test]
    fn time_wait_only_explains_the_reuseaddr_rule() {
        let mut event = sample_event();
        event.sock_flags &= !sock_flags::REUSEADDR;
        let mut tw = socket("127.0.0.1:8080", TCP_TIME_WAIT, None);
        tw.inode = 0;
        tw.timer_ms = Some(40_100);
        tw.peer = "127.0.0.1:50000".parse().expect("peer");
        let facts = vec![(
            needed_lookups(&event.into()).remove(0),
            holders_facts(vec![Holder { socket: tw, processes: vec![], owners: OwnersSeen::Complete }]),
        )];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "time_wait");
        assert!(
            d.summary.starts_with("only TIME_WAIT sockets hold 8080/tcp (expires in 41 s), no process"),
            "{}",
            d.summary
        );
        assert!(d.summary.contains("set SO_REUSEADDR on the new socket and on the listening socket"), "{}", d.summary);
        assert_eq!(d.facts.time_wait_expires_ms, Some(40_100));
        assert_eq!(d.facts.new_socket_reuseaddr, Some(false));
        assert_eq!(d.holders[0].peer, Some("127.0.0.1:50000".parse().expect("peer")));

        // The new socket has it, the old listener (seen by bindtrace) did not.
        event.sock_flags |= sock_flags::REUSEADDR;
        let mut history = BindHistory::default();
        let mut listener = sample_event();
        listener.ret = 0;
        listener.sock_flags &= !sock_flags::REUSEADDR;
        history.record(&listener, 1);
        let d = run(&event, &facts, &history);
        assert!(d.summary.contains("the old listening socket did not set SO_REUSEADDR"), "{}", d.summary);
        assert_eq!(d.facts.old_socket_reuseaddr, Some(false));
    }

    /// A listener of nginx's (pid 977) at `local`.
    fn nginx_listening(local: &str, v6only: Option<bool>) -> Holder {
        Holder { socket: socket(local, TCP_LISTEN, v6only), processes: vec![nginx()], owners: OwnersSeen::Complete }
    }

    /// dnsmasq holds 0.0.0.0:P and [::]:P (IPV6_V6ONLY); a [::] bind fails. The [::] holder
    /// is the reason: "set IPV6_V6ONLY" would not have been enough (it used to be the advice).
    #[test]
    fn a_holder_of_the_same_family_leads_over_a_dual_stack_overlap() {
        let mut event = sample_event();
        event.family = AF_INET6;
        event.addr = std::net::Ipv6Addr::UNSPECIFIED.octets();
        let facts = vec![(
            needed_lookups(&event.into()).remove(0),
            holders_facts(vec![nginx_listening("0.0.0.0:8080", None), nginx_listening("[::]:8080", Some(true))]),
        )];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "in_use", "{}", d.summary);
        assert!(!d.summary.contains("IPV6_V6ONLY"), "{}", d.summary);
        assert!(d.holders.first().is_some_and(|h| h.addr.is_ipv6()), "the [::] holder first: {:?}", d.holders);
        // Only the IPv4 holder: then dual-stack is the reason, and fixing it is enough.
        let facts =
            vec![(needed_lookups(&event.into()).remove(0), holders_facts(vec![nginx_listening("0.0.0.0:8080", None)]))];
        assert_eq!(run(&event, &facts, &BindHistory::default()).kind, "in_use_dual_stack");
    }

    /// A process that bound 0.0.0.0:P, then [::]:P (IPV6_V6ONLY): an IPv4 failure is blocked by
    /// the 0.0.0.0 socket, and its bind is the one reported (it was the later [::] one).
    #[test]
    fn the_seen_bind_is_the_blocking_sockets_own() {
        let event = sample_event(); // IPv4 127.0.0.1:8080
        let mut history = BindHistory::default();
        let mut v4 = sample_event();
        v4.ret = 0;
        v4.tgid = 977;
        v4.addr = [0; 16];
        history.record(&v4, 1_000_000_000);
        let mut v6 = v4;
        v6.family = AF_INET6;
        v6.sock_flags |= sock_flags::V6ONLY;
        history.record(&v6, 2_000_000_000);
        let facts = vec![(
            needed_lookups(&event.into()).remove(0),
            holders_facts(vec![nginx_listening("0.0.0.0:8080", None), nginx_listening("[::]:8080", Some(true))]),
        )];
        let d = run(&event, &facts, &history);
        let first = d.holders.first().expect("the blocking holder");
        assert!(first.addr.is_ipv4(), "{:?}", d.holders);
        let seen = serde_json::to_value(first).expect("json")["seen_bind"].clone();
        assert_eq!(seen["time"], "00:00:01.000", "the 0.0.0.0 bind's time, not the [::] one's: {seen}");
    }

    #[test]
    fn dual_stack_and_reuseport_cases() {
        let event = sample_event(); // IPv4 127.0.0.1:8080
        let facts = vec![(
            needed_lookups(&event.into()).remove(0),
            holders_facts(vec![Holder {
                socket: socket("[::]:8080", TCP_LISTEN, Some(false)),
                processes: vec![nginx()],
                owners: OwnersSeen::Complete,
            }]),
        )];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "in_use_dual_stack");
        assert!(d.summary.contains("IPV6_V6ONLY"), "{}", d.summary);

        let mut event = sample_event();
        event.sock_flags |= sock_flags::REUSEPORT;
        event.uid = 1000;
        let mut history = BindHistory::default();
        let mut holder_bind = sample_event();
        holder_bind.ret = 0;
        holder_bind.tgid = 977;
        holder_bind.uid = 0;
        holder_bind.sock_flags |= sock_flags::REUSEPORT;
        history.record(&holder_bind, 1);
        let facts = vec![(
            needed_lookups(&event.into()).remove(0),
            holders_facts(vec![Holder {
                socket: socket("127.0.0.1:8080", TCP_LISTEN, None),
                processes: vec![nginx()],
                owners: OwnersSeen::Complete,
            }]),
        )];
        let d = run(&event, &facts, &history);
        assert_eq!(d.kind, "in_use_reuseport");
        assert!(d.summary.contains("different users (uid 0 vs 1000)"), "{}", d.summary);
    }

    #[test]
    fn released_port_and_failed_lookup_say_so() {
        let event = sample_event();
        let key = needed_lookups(&event.into()).remove(0);
        let d = run(&event, &[(key, holders_facts(vec![]))], &BindHistory::default());
        assert_eq!(d.kind, "released");
        let d = run(&event, &[(key, Facts::Sockets(Err("namespace gone".into())))], &BindHistory::default());
        assert_eq!(d.kind, "unknown");
        assert_eq!(d.unknown, vec!["namespace gone".to_owned()]);
        // Read from /proc/net, an empty list does not prove the port free (only-bound TCP
        // sockets are not in it).
        let mut table = SocketTable::from_holders(vec![]);
        table.from_sock_diag = false;
        let d = run(&event, &[(key, Facts::Sockets(Ok(table)))], &BindHistory::default());
        assert_eq!(d.kind, "unknown");
        assert!(d.summary.contains("cannot see sockets that are only bound"), "{}", d.summary);
    }

    #[test]
    fn eacces_names_the_sysctl_and_the_capability() {
        let mut event = sample_event();
        event.ret = -libc::EACCES;
        event.port = 80;
        let netns = Facts::Netns(Ok(NetnsFacts { unprivileged_port_start: Some(1024), ..Default::default() }));
        let facts = vec![
            (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
            (
                LookupKey::Process { pid: event.tgid },
                Facts::Process(Ok(ProcessFacts { effective: 0, ..ProcessFacts::default() })),
            ),
        ];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "privileged_port");
        assert!(d.summary.contains("below net.ipv4.ip_unprivileged_port_start (1024)"), "{}", d.summary);
        assert!(d.summary.contains("lacks CAP_NET_BIND_SERVICE"), "{}", d.summary);
        assert_eq!(d.facts.cap_net_bind_service, Some(false));
        assert_eq!(d.facts.cap_eff.as_deref(), Some("0000000000000000"));

        let with_cap = vec![
            (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
            (
                LookupKey::Process { pid: event.tgid },
                Facts::Process(Ok(ProcessFacts { effective: 1 << 10, ..ProcessFacts::default() })),
            ),
        ];
        assert_eq!(run(&event, &with_cap, &BindHistory::default()).kind, "refused_by_policy");
        event.port = 8080;
        assert_eq!(run(&event, &facts, &BindHistory::default()).kind, "refused_by_policy");
        let exited = vec![
            (LookupKey::Netns { netns: event.netns_ino }, netns),
            (LookupKey::Process { pid: event.tgid }, Facts::Process(Err(ProcessUnread::Exited))),
        ];
        event.port = 80;
        let d = run(&event, &exited, &BindHistory::default());
        assert!(d.unknown[0].contains("exited"), "{:?}", d.unknown);
        // The capabilities the probe recorded at the failure serve after the exit.
        event.sock_flags |= sock_flags::TASK_FACTS;
        event.cap_effective = 0x3f;
        let d = run(&event, &exited, &BindHistory::default());
        assert_eq!(d.kind, "privileged_port", "{d:?}");
        assert_eq!(d.facts.cap_eff.as_deref(), Some("000000000000003f"));
        assert!(d.unknown.is_empty(), "{:?}", d.unknown);
    }

    #[test]
    fn eaddrnotavail_checks_the_namespace_addresses() {
        let mut event = sample_event();
        event.ret = -libc::EADDRNOTAVAIL;
        event.addr[..4].copy_from_slice(&[192, 0, 2, 1]);
        let netns = NetnsFacts {
            nonlocal_bind_v4: Some(0),
            addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
            ..Default::default()
        };
        let facts = vec![(LookupKey::Netns { netns: event.netns_ino }, Facts::Netns(Ok(netns)))];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, "address_not_available");
        assert!(d.summary.starts_with("192.0.2.1 is not assigned to any interface"), "{}", d.summary);
        assert!(d.summary.contains("net.ipv4.ip_nonlocal_bind = 0 and IP_FREEBIND is off"), "{}", d.summary);
        assert_eq!(d.facts.address_assigned, Some(false));
        assert!(is_local_address("127.0.0.53".parse().expect("ip"), &[IpAddr::V4(Ipv4Addr::LOCALHOST)]));
        assert!(!is_local_address("10.0.0.1".parse().expect("ip"), &[IpAddr::V4(Ipv4Addr::LOCALHOST)]));
    }

    /// Issue 12: EACCES/EPERM that capabilities do not explain: the cgroup program in force
    /// is named first, then an active LSM; with neither known, the generic wording stays.
    #[test]
    fn refusals_by_a_cgroup_program_or_an_lsm() {
        let mut event = sample_event();
        event.ret = -libc::EPERM;
        let netns = Facts::Netns(Ok(NetnsFacts { unprivileged_port_start: Some(1024), ..Default::default() }));
        let with = |policy: BindPolicy| {
            let facts = vec![
                (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
                (
                    LookupKey::Process { pid: event.tgid },
                    Facts::Process(Ok(ProcessFacts { effective: 0, policy, ..ProcessFacts::default() })),
                ),
            ];
            run(&event, &facts, &BindHistory::default())
        };
        let d = with(BindPolicy {
            cgroup_dir: Some("/sys/fs/cgroup/app.slice".into()),
            bind4_programs: Ok(vec![42]),
            ..BindPolicy::default()
        });
        assert_eq!(d.kind, "refused_by_cgroup_bpf");
        assert!(d.summary.contains("/sys/fs/cgroup/app.slice (program id 42)"), "{}", d.summary);
        assert_eq!(d.facts.cgroup_bind_programs, Some(vec![42]));
        // EACCES is not what a cgroup program returns: its presence is not named the cause.
        let mut eacces = event;
        eacces.ret = -libc::EACCES;
        let facts = vec![
            (LookupKey::Netns { netns: eacces.netns_ino }, netns.clone()),
            (
                LookupKey::Process { pid: eacces.tgid },
                Facts::Process(Ok(ProcessFacts {
                    effective: 0,
                    policy: BindPolicy { bind4_programs: Ok(vec![42]), ..BindPolicy::default() },
                    ..ProcessFacts::default()
                })),
            ),
        ];
        assert_ne!(run(&eacces, &facts, &BindHistory::default()).kind, "refused_by_cgroup_bpf");
        let d = with(BindPolicy { lsms: Some(vec!["capability".into(), "apparmor".into()]), ..BindPolicy::default() });
        assert_eq!(d.kind, "refused_by_lsm");
        assert!(d.summary.contains("no cgroup BPF bind program is in force, and apparmor is active"), "{}", d.summary);
        let d = with(BindPolicy::default());
        assert_eq!(d.kind, "refused_by_policy");
        assert!(d.unknown.iter().any(|u| u.contains("LSMs could not be read")), "{:?}", d.unknown);
    }

    /// Issue 12: a tentative IPv6 address got "missing (or, for IPv6, still tentative)".
    #[test]
    fn ipv6_addresses_still_in_or_failed_by_duplicate_address_detection() {
        let mut event = sample_event();
        event.ret = -libc::EADDRNOTAVAIL;
        event.family = AF_INET6;
        let v6: Ipv6Addr = "2001:db8::1".parse().expect("ip");
        event.addr = v6.octets();
        for (flags, kind, words) in [
            (0xc0, "address_tentative", "is still tentative"),
            (0x88, "address_dad_failed", "failed duplicate address detection"),
        ] {
            let netns = NetnsFacts {
                addresses: vec![IpAddr::V6(v6)],
                ipv6_states: vec![crate::enrich::lookup::Ipv6State { addr: v6, flags, interface: "eth0".into() }],
                ..Default::default()
            };
            let facts = vec![(LookupKey::Netns { netns: event.netns_ino }, Facts::Netns(Ok(netns)))];
            let d = run(&event, &facts, &BindHistory::default());
            assert_eq!(d.kind, kind);
            assert!(d.summary.starts_with(&format!("2001:db8::1 on eth0 {words}")), "{}", d.summary);
            assert_eq!(d.facts.ipv6_flags.as_deref(), Some(format!("{flags:#04x}").as_str()));
        }
    }

    #[test]
    fn einval_and_other_errnos() {
        let mut event = sample_event();
        event.ret = -libc::EINVAL;
        event.bound_port = 41000;
        event.bound_addr4 = [127, 0, 0, 1];
        let d = run(&event, &[], &BindHistory::default());
        assert_eq!(d.kind, "already_bound");
        assert!(d.summary.contains("already bound to 127.0.0.1:41000"), "{}", d.summary);
        event.bound_port = 0;
        event.sock_flags |= sock_flags::ADDR_SHORT;
        event.addrlen = 8;
        assert!(run(&event, &[], &BindHistory::default()).summary.contains("addrlen 8 is too short"));

        event.ret = -libc::ENOMEM;
        let d = run(&event, &[], &BindHistory::default());
        assert_eq!(d.kind, "other");
        assert_eq!(d.summary, "ENOMEM: Cannot allocate memory");
        let mut ok = sample_event();
        ok.ret = 0;
        assert!(diagnose(&ok.into(), |_| None, &BindHistory::default()).is_none());
    }
}
