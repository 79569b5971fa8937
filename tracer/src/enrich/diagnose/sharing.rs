//! A bind that *succeeded* by joining a port other sockets hold: SO_REUSEPORT (TCP or UDP),
//! or SO_REUSEADDR on UDP. The kernel lets any process of the same uid join a SO_REUSEPORT
//! group (and any process at all share a UDP port with SO_REUSEADDR), then splits the port's
//! traffic between them: a second copy of a server started by mistake silently takes half of
//! the connections ("requests processed twice").
//!
//! The rule for sharing on purpose, which is not reported: the sockets belong to one
//! container (or nspawn/LXC machine), to one systemd service, or, outside both, to one
//! process tree of one cgroup (the same cgroup and session id: workers forked by a server
//! keep its session; a copy started from another shell or by another supervisor does not).
//! Units and containers come first because a service's workers may well call `setsid`,
//! while two services never share a unit by accident.

use std::net::IpAddr;

use smallvec::smallvec;

use bindtrace_common::{op, sock_flags, BindEvent};

use super::{
    in_use::seen_for,
    report::holder_report,
    wording::{endpoint, who},
    NeededLookups,
};
use crate::{
    decode::{Bind, BindEventExt as _},
    enrich::{
        history::{effective_port, BindHistory},
        lookup::{Facts, Holder, LookupKey},
    },
    host::{
        cgroup,
        sockdiag::{Proto, TCP_LISTEN},
    },
    model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders, HoldersSummary},
};

/// The most sharing sockets a report lists; the rest are counted.
const SHARERS_SHOWN_MAX: usize = 8;

/// The option a successful bind may have joined others with, if any.
pub(crate) fn sharing_option(event: &BindEvent) -> Option<&'static str> {
    // A port the bind chose (port 0's pick joins no group: the kernel picks a free port).
    if event.ret != 0 || event.op != op::BIND || !event.has(sock_flags::SOCK_INFO) || event.port == 0 {
        return None;
    }
    let proto = Proto::from_ipproto(event.protocol)?;
    event.requested_ip()?;
    if event.has(sock_flags::REUSEPORT) {
        Some("SO_REUSEPORT")
    } else if proto == Proto::Udp && event.has(sock_flags::REUSEADDR) {
        Some("SO_REUSEADDR")
    } else {
        None
    }
}

/// The lookups that tell whom a successful bind shares its port with: the port's sockets,
/// and the binder's own cgroup and session.
pub(super) fn needed_lookups(event: &Bind) -> NeededLookups {
    match (sharing_option(event), Proto::from_ipproto(event.protocol)) {
        (Some(_), Some(proto)) => {
            smallvec![LookupKey::Sockets { netns: event.netns_ino, proto }, LookupKey::Process { pid: event.tgid }]
        }
        _ => NeededLookups::new(),
    }
}

/// What shares a port on purpose with what (see the module's header).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Group {
    /// A container's or machine's cgroup.
    Container(String),
    /// A systemd service: the cgroup path up to its unit.
    Service(String),
    /// Anything else: one cgroup's processes of one session.
    Session { cgroup: String, session: u32 },
}

fn group_of(cgroup_path: Option<&str>, session: Option<u32>) -> Option<Group> {
    let path = cgroup_path?;
    if let Some(root) = cgroup::container_root(path) {
        return Some(Group::Container(root));
    }
    let hints = cgroup::hints(path);
    if let Some((_, name)) = hints.machine {
        return Some(Group::Container(format!("machine {name}")));
    }
    if let Some(unit) = hints.unit.filter(|unit| unit.ends_with(".service")) {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if let Some(at) = parts.iter().rposition(|part| *part == unit) {
            return Some(Group::Service(format!("/{}", parts[..=at].join("/"))));
        }
    }
    Some(Group::Session { cgroup: path.to_owned(), session: session? })
}

/// The report on a successful bind that shares its port with another service, container or
/// process tree; `None` when it shares with none (or it could not be told: the binder is
/// gone, or the port's sockets could not be read).
pub(super) fn port_shared<'a>(
    event: &Bind,
    facts: &impl Fn(&LookupKey) -> Option<&'a Facts>,
    history: &BindHistory,
) -> Option<Diagnosis> {
    let option = sharing_option(event)?;
    let proto = Proto::from_ipproto(event.protocol)?;
    let keys = needed_lookups(event);
    let Some(Facts::Sockets(Ok(table))) = keys.first().and_then(facts) else { return None };
    let Some(Facts::Process(Ok(binder))) = keys.get(1).and_then(facts) else { return None };
    let own = group_of(binder.cgroup.as_deref(), binder.session)?;
    let port = effective_port(event);
    let requested: Option<IpAddr> = event.requested_ip();
    let v6only = event.has(sock_flags::V6ONLY);
    let holders = table.holders(port);
    let mut sharers: Vec<&Holder> = Vec::new();
    let mut unseen = 0usize;
    for holder in &holders {
        // A TCP port's group is its listeners; its connections were accepted from them (or
        // bound only, as the new socket itself is until it listens).
        if proto == Proto::Tcp && holder.socket.state != TCP_LISTEN {
            continue;
        }
        if !super::conflict::conflicts(requested, v6only, &holder.socket) {
            continue;
        }
        if holder.processes.iter().any(|p| p.pid == event.tgid) {
            continue;
        }
        if holder.processes.is_empty() {
            unseen += 1;
            continue;
        }
        let same =
            holder.processes.iter().any(|p| group_of(p.cgroup.as_deref(), Some(p.session)).as_ref() == Some(&own));
        if !same {
            sharers.push(holder);
        }
    }
    // Each socket's oldest process first: a server whose forked worker shares its socket is
    // named, not the worker.
    let sharers: Vec<Holder> = sharers
        .into_iter()
        .map(|holder| {
            let mut holder = holder.clone();
            holder.processes.sort_by_key(|p| p.start_time);
            holder
        })
        .collect();
    let first = sharers.first()?;
    let key = (event.netns_ino, event.protocol, port);
    let seen = seen_for(history, key, first);
    let since = match seen {
        Some(seen) => format!("since {}", crate::clock::local_time_of_day(seen.wall_ns)),
        None => "since before bindtrace saw it".to_owned(),
    };
    let more = sharers.len() - 1;
    // Sockets on different addresses (127.0.0.1 beside 0.0.0.0) split nothing: the more
    // specific one gets all the traffic to its address.
    let same_address = requested == Some(first.socket.local.ip());
    let effect = match (proto, option, same_address) {
        (_, _, false) => format!(
            "traffic to {} goes to the socket bound to that address, the rest to the other",
            if requested.is_some_and(|r| r.is_unspecified()) {
                first.socket.local.ip()
            } else {
                requested.unwrap_or(first.socket.local.ip())
            }
        ),
        (Proto::Tcp, _, true) => "once it listens, the kernel splits new connections between them".to_owned(),
        (Proto::Udp, "SO_REUSEPORT", true) => {
            "the kernel now splits datagrams between them (by a hash of the sender)".to_owned()
        }
        (Proto::Udp, _, true) => {
            "unicast datagrams now reach one of them only (on Linux the socket bound last: this one), multicast and \
             broadcast all of them"
                .to_owned()
        }
    };
    let joinable = if option == "SO_REUSEPORT" {
        format!("any process of uid {} may join this port", event.uid)
    } else {
        "any process that sets SO_REUSEADDR may join this port".to_owned()
    };
    let state = if proto == Proto::Tcp { "listening" } else { "bound" };
    let summary = format!(
        "port {port}/{} is now shared through {option} with {}, {state} on {} {since}{}: {effect}; if this is a second copy \
         started by mistake, stop one of them ({joinable})",
        proto.name(),
        who(first, seen),
        endpoint(first.socket.local),
        if more > 0 { format!(" (+{more} more sharing socket{})", if more == 1 { "" } else { "s" }) } else { String::new() },
    );
    let shown: Vec<&Holder> = sharers.iter().take(SHARERS_SHOWN_MAX).collect();
    let reports = shown.iter().map(|h| holder_report(h, seen_for(history, key, h))).collect();
    let holders_summary = (sharers.len() > shown.len()).then(|| HoldersSummary {
        total: sharers.len(),
        shown: shown.len(),
        truncated: true,
        ..HoldersSummary::default()
    });
    let mut unknown = Vec::new();
    if unseen > 0 {
        unknown.push(format!(
            "{unseen} other socket(s) on the port whose process bindtrace could not see may share it too"
        ));
    }
    Some(Diagnosis {
        kind: DiagnosisKind::PortShared,
        summary,
        holders: Holders::Inet(reports),
        holders_summary,
        facts: DiagnosisFacts { shared_through: Some(option), ..DiagnosisFacts::default() },
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_containers_services_and_sessions() {
        let docker = "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";
        assert_eq!(group_of(Some(docker), Some(1)), group_of(Some(docker), Some(2)));
        assert!(matches!(group_of(Some(docker), Some(1)), Some(Group::Container(_))));
        // Workers of one service that called setsid are still one service.
        let web = "/system.slice/web.service";
        assert_eq!(group_of(Some(web), Some(10)), group_of(Some(web), Some(11)));
        assert_ne!(group_of(Some(web), Some(10)), group_of(Some("/system.slice/api.service"), Some(10)));
        // The same unit name of two users is two services.
        let user = |uid: u32| format!("/user.slice/user-{uid}.slice/user@{uid}.service/app.slice/dev.service");
        assert_ne!(group_of(Some(&user(1000)), Some(1)), group_of(Some(&user(1001)), Some(1)));
        // A login session: one process tree (session) is one group, another shell is not.
        let session = "/user.slice/user-1000.slice/session-3.scope";
        assert_eq!(group_of(Some(session), Some(7)), group_of(Some(session), Some(7)));
        assert_ne!(group_of(Some(session), Some(7)), group_of(Some(session), Some(8)));
        // An nspawn machine is one container whatever unit inside it.
        let inside = |unit: &str| format!("/machine.slice/machine-web.scope/payload/system.slice/{unit}");
        assert_eq!(group_of(Some(&inside("a.service")), Some(1)), group_of(Some(&inside("b.service")), Some(2)));
        // Unknown: no group, so never "the same".
        assert_eq!(group_of(None, Some(1)), None);
        assert_eq!(group_of(Some(session), None), None);
    }
}
