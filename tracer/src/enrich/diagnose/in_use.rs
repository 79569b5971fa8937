//! EADDRINUSE (inet): the sockets in the way, ranked and counted, with the binds bindtrace saw
//! of them; the ephemeral range full; a runtime's publisher or a systemd manager that failed.

use crate::clock::local_time_of_day;
use std::net::SocketAddr;

use bindtrace_common::{sock_flags, BindEvent, AF_INET, AF_INET6};

use super::{
    conflict::{conflicts, conflicts_with, holder_rank},
    nat, needed_lookups,
};
use super::{
    report::holder_report,
    wording::{endpoint, holders_summary, stop_advice},
};
use crate::decode::{requested_endpoint, Bind, BindEventExt as _};
use crate::enrich::{
    history::{BindHistory, SeenBind},
    lookup::{is_connection, Facts, Holder, LookupKey, PortCensus, SocketTable},
};
use crate::host::sockdiag::{state_name, Proto, TCP_LISTEN, TCP_TIME_WAIT};
use crate::model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders, HoldersSummary};

/// Is `netns` bindtrace's own network namespace (the host's, where runtimes publish ports)?
pub(super) fn in_own_netns(netns: u32) -> bool {
    static OWN: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| crate::host::netns::Netns::Own.inode()).is_some_and(|own| own == u64::from(netns))
}

/// The processes that bind host ports for `docker run -p` (and podman's Docker-compatible
/// service).
pub(super) fn is_port_publisher(comm: &[u8]) -> bool {
    matches!(comm, b"docker-proxy" | b"dockerd")
}

/// The bind bindtrace saw for a holder: by its own process if it bound the port itself, else
/// the latest on the port (a socket handed to another process, as a supervisor does).
/// The bind of the holder's own socket (its address) first: a process holding 0.0.0.0:P
/// and [::]:P made two.
pub(super) fn seen_for<'a>(history: &'a BindHistory, key: (u32, u16, u16), holder: &Holder) -> Option<&'a SeenBind> {
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
pub(super) fn hedge_without_sock_diag(diagnosis: &mut Diagnosis, event: &BindEvent) {
    let tcp = Proto::from_ipproto(event.protocol) == Some(Proto::Tcp);
    if diagnosis.kind == DiagnosisKind::Released && tcp {
        diagnosis.kind = DiagnosisKind::Unknown;
        diagnosis.summary = format!(
            "no TCP socket bindtrace can see holds port {} now; without sock_diag (inet_diag) it cannot see sockets \
             that are only bound (neither listening nor connected), and one may hold it",
            event.port
        );
    }
    if diagnosis.kind == DiagnosisKind::InUseDualStack {
        diagnosis.unknown.push("IPV6_V6ONLY of the holder is not known without sock_diag (inet_diag)".to_owned());
    }
    diagnosis.unknown.push("the sockets were read from /proc/net: sock_diag (inet_diag) is not available".to_owned());
}

/// bind(port 0) failed: no port of the ephemeral range is free for this address. How many
/// are taken, by what, and what to change.
pub(super) fn ephemeral_exhausted(event: &BindEvent, table: &SocketTable) -> Diagnosis {
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
        kind: DiagnosisKind::EphemeralExhausted,
        summary,
        holders: Holders::default(),
        facts,
        unknown: Vec::new(),
        holders_summary: None,
    }
}

/// The holders a diagnosis lists: every socket in the way that is not a connection (up to
/// this many), and a few connections as examples; the rest are counted in `holders_summary`.
pub(super) const HOLDERS_SHOWN_MAX: usize = 16;
pub(super) const CONNECTIONS_SHOWN_MAX: usize = 2;

/// The sockets in the way, counted: from the lookup's census of the port (every socket,
/// kept or not), or from the holders themselves when there is none.
pub(super) fn count_blocking(
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

pub(super) fn in_use(
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
                kind: DiagnosisKind::InUseSelf,
                summary: format!(
                    "the failing process (pid {}) held port {port}/{} itself: it bound {} at {} on another socket; \
                     nothing holds the port now (that socket was closed, or the process exited): bind each address \
                     once (or set SO_REUSEPORT on both sockets)",
                    event.tgid,
                    proto.name(),
                    own.addr.map(|ip| endpoint(SocketAddr::new(ip, port))).unwrap_or_default(),
                    local_time_of_day(own.wall_ns)
                ),
                holders: Holders::Inet(reports),
                facts,
                unknown: Vec::new(),
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
            kind: DiagnosisKind::Released,
            summary,
            holders: Holders::Inet(reports),
            facts,
            unknown: Vec::new(),
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
            kind: DiagnosisKind::TimeWait,
            summary: format!("only TIME_WAIT sockets hold {port}/{}{expires_text}, no process: {advice}", proto.name()),
            holders: Holders::Inet(reports),
            facts,
            unknown: Vec::new(),
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
            DiagnosisKind::ListenInUse,
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
            DiagnosisKind::InUseDualStack,
            format!("{side} because IPV6_V6ONLY is off: set IPV6_V6ONLY on the IPv6 socket, or bind one family"),
        )
    } else if itself {
        (
            DiagnosisKind::InUseSelf,
            "the failing process holds it itself, on another socket: bind each address once (or set SO_REUSEPORT on both)"
                .to_owned(),
        )
    } else if let (true, Some((lo, hi))) = (connected, in_ephemeral_range) {
        (
            DiagnosisKind::InUseEphemeral,
            format!(
                "port {port} is inside net.ipv4.ip_local_port_range ({lo}-{hi}), so an outbound connection (to {}) took it as its \
                 source port; keep listening ports out of that range, or reserve it: sysctl net.ipv4.ip_local_reserved_ports={port}",
                endpoint(first.socket.peer)
            ),
        )
    } else if event.has(sock_flags::REUSEPORT) {
        match seen {
            Some(s) if !s.reuseport => {
                (DiagnosisKind::InUseReuseport, "the holder did not set SO_REUSEPORT: every socket sharing a port needs it".to_owned())
            }
            Some(s) if s.uid != event.uid => (
                DiagnosisKind::InUseReuseport,
                format!(
                    "both sockets set SO_REUSEPORT but belong to different users (uid {} vs {}): a SO_REUSEPORT group needs one effective uid",
                    s.uid, event.uid
                ),
            ),
            _ if first.socket.uid != event.uid => (
                DiagnosisKind::InUseReuseport,
                format!(
                    "SO_REUSEPORT sharing needs SO_REUSEPORT on the holder too and the same uid (holder {}, caller {})",
                    first.socket.uid, event.uid
                ),
            ),
            _ => (DiagnosisKind::InUseReuseport, "SO_REUSEPORT sharing needs SO_REUSEPORT on the holder too".to_owned()),
        }
    } else {
        (DiagnosisKind::InUse, stop_advice(first))
    };
    Diagnosis {
        kind,
        summary: format!("{base}; {advice}"),
        holders: Holders::Inet(reports),
        facts,
        unknown,
        holders_summary: counted,
    }
}

/// EADDRINUSE on an inet socket: who holds the address (or why the ephemeral range is
/// full), and, when the failing process is a runtime's port publisher or a systemd manager,
/// what it was starting; a NAT rule that also claims the port is said too.
pub(super) fn in_use_of<'a>(
    event: &Bind,
    facts: &impl Fn(&LookupKey) -> Option<&'a Facts>,
    history: &BindHistory,
    lookup_error: impl Fn(&LookupKey) -> Option<String>,
) -> Diagnosis {
    let keys = needed_lookups(event);
    match keys.first().map(|k| (k, facts(k))) {
        Some((_, Some(Facts::Sockets(Ok(table))))) if event.port == 0 && event.requested_ip().is_some() => {
            ephemeral_exhausted(event, table)
        }
        Some((_, Some(Facts::Sockets(Ok(table))))) => {
            let mut diagnosis =
                in_use(event, &table.holders(event.port), table.census(event.port), history, table.local_port_range);
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
                Some(Facts::UnitStarting(Err(why))) => {
                    diagnosis.unknown.push(format!("the socket unit systemd was starting could not be named: {why}"))
                }
                _ => {}
            }
            if let Some(Facts::Nat(rules)) = facts(&LookupKey::Nat { netns: event.netns_ino }) {
                nat::note_claims(&mut diagnosis, event, rules);
            }
            diagnosis
        }
        Some((key, _)) => Diagnosis {
            kind: DiagnosisKind::Unknown,
            summary: format!("port {} is in use, but its holders could not be looked up", event.port),
            holders: Holders::default(),
            facts: DiagnosisFacts::default(),
            unknown: vec![lookup_error(key).unwrap_or_else(|| "holder lookup did not finish".to_owned())],
            holders_summary: None,
        },
        None => Diagnosis {
            kind: DiagnosisKind::Unknown,
            summary: format!("port {} is in use; holders are looked up for TCP and UDP only", event.port),
            holders: Holders::default(),
            facts: DiagnosisFacts::default(),
            unknown: Vec::new(),
            holders_summary: None,
        },
    }
}
