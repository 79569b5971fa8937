//! Failed bind + facts → explanation. Pure: no I/O, so every case is unit-tested with
//! constructed facts, and the live tests check that the facts are gathered right.
//!
//! This module dispatches by errno to the module of its family (`in_use`, `access`,
//! `not_available`, `invalid`; AF_UNIX's in `unix`; successes in `sharing` and `nat`);
//! `conflict` holds the kernel's address rules, `report` the output types, `wording` the
//! sentences shared with `bindtrace who`.

mod access;
mod conflict;
mod in_use;
mod invalid;
mod nat;
mod not_available;
mod report;
mod sharing;
#[cfg(test)]
mod tests;
mod unix;
mod wording;

use smallvec::smallvec;
use std::net::IpAddr;

use bindtrace_common::{sock_flags, AF_UNIX};

pub(crate) use self::conflict::holder_rank;
use self::report::comm_text;
use self::{
    access::access,
    in_use::{in_own_netns, is_port_publisher},
    invalid::{caller_error, invalid},
    not_available::not_available,
};
pub(crate) use self::{
    report::holder_report,
    sharing::sharing_option,
    wording::{endpoint, holders_summary},
};
use super::{
    history::BindHistory,
    lookup::{unix_name_key, Facts, LookupKey},
};
use crate::host::sockdiag::Proto;
#[cfg(test)]
use crate::model::PROCESSES_SHOWN_MAX as PROCESSES_SHOWN;
use crate::model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders, DIAGNOSIS_BYTES_MAX};
use crate::{
    decode::{Bind, BindEventExt as _},
    errno,
};

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
        libc::EADDRINUSE => in_use::in_use_of(event, &facts, history, lookup_error),
        libc::EACCES | libc::EPERM if event.family == AF_UNIX => caller_error(
            DiagnosisKind::UnixPathPermission,
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
            caller_error(DiagnosisKind::InvalidAddress, "the address passed to bind() is NULL")
        }
        libc::EINVAL => invalid(event),
        libc::EFAULT => caller_error(
            DiagnosisKind::BadAddress,
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
            DiagnosisKind::BadFd,
            &format!("fd {} is not an open file descriptor of the process (closed already, or never opened)", event.fd),
        ),
        libc::ENOTSOCK => {
            caller_error(DiagnosisKind::NotASocket, &format!("fd {} is open but is not a socket", event.fd))
        }
        _ => Diagnosis {
            kind: DiagnosisKind::Other,
            summary: match (errno::name(errno), errno::message(errno)) {
                (Some(name), Some(message)) => format!("{name}: {message}"),
                _ => format!("errno {errno}"),
            },
            holders: Holders::default(),
            facts: DiagnosisFacts::default(),
            unknown: Vec::new(),
            holders_summary: None,
        },
    };
    let mut diagnosis = diagnosis;
    diagnosis.fit(DIAGNOSIS_BYTES_MAX);
    Some(diagnosis)
}
