//! The kernel's address-conflict rules, and the order holders are named in: shared with
//! `bindtrace who`.

use std::net::IpAddr;

use crate::host::sockdiag::{DiagSocket, TCP_LISTEN, TCP_TIME_WAIT};

/// Does a socket on the requested port stand in the way, by the kernel's address rules?
/// Equal addresses and the wildcards 0.0.0.0 and :: conflict; an IPv6 socket without
/// IPV6_V6ONLY also covers IPv4 (:: all of it, ::ffff:a.b.c.d that one address).
pub(super) fn conflicts(requested: Option<IpAddr>, requested_v6only: bool, holder: &DiagSocket) -> bool {
    conflicts_with(requested, requested_v6only, holder.local.ip(), holder.v6only)
}

/// [`conflicts`] with a socket's local address and IPV6_V6ONLY.
pub(super) fn conflicts_with(
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
