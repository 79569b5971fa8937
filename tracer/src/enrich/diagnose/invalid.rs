//! The caller's mistakes, where nothing on the host is in the way: EINVAL, EFAULT, EBADF,
//! ENOTSOCK.

use std::net::IpAddr;

use bindtrace_common::{sock_flags, BindEvent, AF_INET, AF_INET6};

use crate::decode::BindEventExt as _;
use crate::model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders};

/// A bind the caller got wrong, where nothing on the host is in the way.
pub(super) fn caller_error(kind: DiagnosisKind, summary: &str) -> Diagnosis {
    Diagnosis {
        kind,
        summary: summary.to_owned(),
        holders: Holders::default(),
        facts: DiagnosisFacts::default(),
        unknown: Vec::new(),
        holders_summary: None,
    }
}

pub(super) fn invalid(event: &BindEvent) -> Diagnosis {
    let mut facts = DiagnosisFacts::default();
    let needed = match event.family {
        AF_INET => Some(16),
        AF_INET6 => Some(28),
        _ => None,
    };
    let (kind, summary) = if event.has(sock_flags::ADDR_SHORT) {
        let needs = needed.map(|n| format!(" (needs {n})")).unwrap_or_default();
        (
            DiagnosisKind::InvalidAddress,
            format!("addrlen {} is too short for this address family{needs}", event.addrlen),
        )
    } else if event.bound_port != 0 {
        let bound = match event.bound_ip() {
            Some(ip) => format!("{ip}:{}", event.bound_port),
            None => format!("port {}", event.bound_port),
        };
        facts.already_bound_to = Some(bound.clone());
        (
            DiagnosisKind::AlreadyBound,
            format!(
                "the socket is already bound to {bound} (by an earlier bind, connect or listen): a socket binds once; use a new socket"
            ),
        )
    } else if let Some(IpAddr::V6(v6)) = event.requested_ip() {
        if v6.to_ipv4_mapped().is_some() && event.has(sock_flags::V6ONLY) {
            (DiagnosisKind::InvalidAddress, "an IPV6_V6ONLY socket cannot bind an IPv4-mapped address".to_owned())
        } else if v6.is_unicast_link_local() && event.scope_id == 0 {
            (
                DiagnosisKind::InvalidAddress,
                format!("link-local {v6} needs a scope id (the interface, as in fe80::1%eth0)"),
            )
        } else {
            (DiagnosisKind::InvalidAddress, "bind() rejected the address as invalid for this socket".to_owned())
        }
    } else {
        (DiagnosisKind::InvalidAddress, "bind() rejected the address as invalid for this socket".to_owned())
    };
    Diagnosis { kind, summary, holders: Holders::default(), facts, unknown: Vec::new(), holders_summary: None }
}
