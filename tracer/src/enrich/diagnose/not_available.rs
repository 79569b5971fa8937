//! EADDRNOTAVAIL: the address is not this namespace's (or not yet: IPv6 duplicate address
//! detection).

use std::net::IpAddr;

use bindtrace_common::{sock_flags, BindEvent};

use super::super::lookup::{NetnsFacts, IFA_F_DADFAILED, IFA_F_OPTIMISTIC, IFA_F_TENTATIVE};
use crate::decode::BindEventExt as _;
use crate::model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders};

/// Is `addr` local in a namespace with these interface addresses? 127.0.0.0/8 is local as a
/// whole when loopback is up; multicast addresses may always be bound.
pub(super) fn is_local_address(addr: IpAddr, addresses: &[IpAddr]) -> bool {
    addr.is_unspecified()
        || addr.is_multicast()
        || addresses.contains(&addr)
        || (addr.is_loopback() && addr.is_ipv4() && addresses.iter().any(|a| a.is_loopback() && a.is_ipv4()))
}

pub(super) fn not_available(event: &BindEvent, netns: Option<&NetnsFacts>) -> Diagnosis {
    let mut facts = DiagnosisFacts::default();
    let Some(addr) = event.requested_ip() else {
        return Diagnosis {
            kind: DiagnosisKind::Unknown,
            summary: "the requested address could not be read, so the cause is unknown".to_owned(),
            holders: Holders::default(),
            facts,
            unknown: vec!["requested address".to_owned()],
            holders_summary: None,
        };
    };
    let Some(netns) = netns else {
        return Diagnosis {
            kind: DiagnosisKind::Unknown,
            summary: format!("{addr} could not be checked: the network namespace was not found"),
            holders: Holders::default(),
            facts,
            unknown: vec!["interface addresses of the namespace".to_owned()],
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
                DiagnosisKind::AddressDadFailed,
                format!(
                    "{addr} on {interface} failed duplicate address detection: another host on the link uses it; \
                     use another address (the kernel will not let it be bound)"
                ),
            ))
        } else if state.flags & IFA_F_TENTATIVE != 0 && state.flags & IFA_F_OPTIMISTIC == 0 {
            Some((
                DiagnosisKind::AddressTentative,
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
                holders: Holders::default(),
                facts,
                unknown: Vec::new(),
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
        kind: DiagnosisKind::AddressNotAvailable,
        summary,
        holders: Holders::default(),
        facts,
        unknown: Vec::new(),
        holders_summary: None,
    }
}
