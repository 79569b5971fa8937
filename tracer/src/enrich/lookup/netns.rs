//! What a network namespace says about its addresses: the interface addresses, IPv6 duplicate
//! address detection states, and the sysctls a bind depends on.

use std::net::IpAddr;

use nix::ifaddrs::getifaddrs;

use crate::host::netns::read_sysctl;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NetnsFacts {
    pub unprivileged_port_start: Option<i64>,
    pub nonlocal_bind_v4: Option<i64>,
    pub nonlocal_bind_v6: Option<i64>,
    /// Addresses on the namespace's interfaces.
    pub addresses: Vec<IpAddr>,
    /// IPv6 addresses with their state flags (IFA_F_*) and interface, from if_inet6.
    pub ipv6_states: Vec<Ipv6State>,
}

/// An IPv6 address's state, as /proc/net/if_inet6 lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ipv6State {
    pub addr: std::net::Ipv6Addr,
    /// IFA_F_* bits: 0x04 optimistic, 0x08 dadfailed, 0x20 deprecated, 0x40 tentative.
    pub flags: u32,
    pub interface: String,
}

pub(crate) const IFA_F_OPTIMISTIC: u32 = 0x04;
pub(crate) const IFA_F_DADFAILED: u32 = 0x08;
pub(crate) const IFA_F_TENTATIVE: u32 = 0x40;

/// The calling thread's namespace's IPv6 addresses and their flags (`/proc/thread-self/net`
/// is the thread's namespace; `/proc/self/net` would be the process's).
pub(super) fn ipv6_states() -> Vec<Ipv6State> {
    let text = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = fields.first().filter(|h| h.len() == 32)?;
            let addr = u128::from_str_radix(hex, 16).ok()?;
            Some(Ipv6State {
                addr: std::net::Ipv6Addr::from(addr),
                flags: u32::from_str_radix(fields.get(4)?, 16).ok()?,
                interface: (*fields.get(5)?).to_owned(),
            })
        })
        .collect()
}

pub(super) fn netns_facts() -> NetnsFacts {
    let addresses = getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    NetnsFacts {
        unprivileged_port_start: read_sysctl("net/ipv4/ip_unprivileged_port_start"),
        nonlocal_bind_v4: read_sysctl("net/ipv4/ip_nonlocal_bind"),
        nonlocal_bind_v6: read_sysctl("net/ipv6/ip_nonlocal_bind"),
        addresses,
        ipv6_states: ipv6_states(),
    }
}
