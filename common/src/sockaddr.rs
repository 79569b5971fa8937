//! Decoding the sockaddr a caller passed to bind(), from the bytes the probe copied. Here, not
//! in the probe, so that the host tests exactly what the probe runs; written for the BPF
//! verifier (no loops, no byte-array fills, every read within the 32-byte copy).

use crate::{sock_flags, AF_INET, AF_INET6};

pub const SOCKADDR_IN_LEN: u32 = 16;
pub const SOCKADDR_IN6_LEN: u32 = 28;
/// The shortest sockaddr_in6 the kernel takes (`SIN6_LEN_RFC2133`: without sin6_scope_id).
pub const SOCKADDR_IN6_MIN_LEN: u32 = 24;
/// The probe's copy buffer: four words, the longest inet sockaddr and some.
pub const COPY_WORDS: usize = 4;

/// The requested sockaddr, decoded. The address is kept as two words so that no byte array
/// is ever zero-filled: LLVM turns such fills into calls to a byte-at-a-time `memset`, which
/// cost more than everything else the probe does (seen in `llvm-objdump -d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requested {
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// The address bytes in network order, as `BindEvent::addr` (IPv4 in the first 4 bytes).
    pub addr: [u64; 2],
    pub scope_id: u32,
    /// `ADDR_READ`; or why nothing was decoded: `ADDR_NULL`, `ADDR_SHORT`, `ADDR_FAULT`.
    pub flags: u32,
}

impl Requested {
    /// Nothing decoded, for the reason in `flags`.
    #[inline(always)]
    pub const fn none(flags: u32) -> Self {
        Self { family: 0, port: 0, addr: [0; 2], scope_id: 0, flags }
    }

    /// Before any copy: a NULL pointer, or a length too short to hold a family.
    #[inline(always)]
    pub const fn precheck(addr_is_null: bool, addrlen: u32) -> Option<Self> {
        if addr_is_null {
            Some(Self::none(sock_flags::ADDR_NULL))
        } else if addrlen < 2 {
            Some(Self::none(sock_flags::ADDR_SHORT))
        } else {
            None
        }
    }
}

/// How many bytes of a sockaddr of `addrlen` bytes the probe copies: all of an inet
/// sockaddr, and no more than the buffer.
#[inline(always)]
pub const fn copy_len(addrlen: u32) -> u32 {
    if addrlen > SOCKADDR_IN6_LEN {
        SOCKADDR_IN6_LEN
    } else {
        addrlen
    }
}

/// Decodes a sockaddr of `addrlen` bytes (at least 2) whose first [`copy_len`] bytes are in
/// `words`, little-endian, the rest zero. The family and the port sit at the same offsets in
/// sockaddr_in and sockaddr_in6; address and port stay 0 when the length is too short for
/// the family (bind() then fails with EINVAL, and `ADDR_SHORT` says why).
#[inline(always)]
pub fn decode(words: &[u64; COPY_WORDS], addrlen: u32) -> Requested {
    // Bytes 0-1 family, 2-3 port (network order), 4-7 sin_addr; sin6_addr is bytes 8-23 and
    // sin6_scope_id bytes 24-27.
    let head = words[0];
    let family = head as u16;
    let needed = match family {
        AF_INET => SOCKADDR_IN_LEN,
        AF_INET6 => SOCKADDR_IN6_MIN_LEN,
        _ => 2,
    };
    if addrlen < needed {
        let mut short = Requested::none(sock_flags::ADDR_SHORT);
        short.family = family;
        return short;
    }
    let mut req = Requested::none(sock_flags::ADDR_READ);
    req.family = family;
    // Only inet families have a port there: for AF_UNIX those bytes begin the path.
    if family == AF_INET6 {
        req.port = u16::from_be((head >> 16) as u16);
        req.addr = [words[1], words[2]];
        // 0 when addrlen is 24 and the copy stopped before it.
        req.scope_id = words[3] as u32;
    } else if family == AF_INET {
        req.port = u16::from_be((head >> 16) as u16);
        req.addr = [head >> 32, 0];
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's copy of `bytes`: the first `copy_len` bytes in four zeroed words.
    fn copied(bytes: &[u8], addrlen: u32) -> [u64; COPY_WORDS] {
        let mut buf = [0u8; COPY_WORDS * 8];
        let len = (copy_len(addrlen) as usize).min(bytes.len());
        buf[..len].copy_from_slice(&bytes[..len]);
        core::array::from_fn(|i| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes")))
    }

    fn sockaddr_in(port: u16, ip: [u8; 4]) -> [u8; 16] {
        let mut sa = [0u8; 16];
        sa[..2].copy_from_slice(&AF_INET.to_ne_bytes());
        sa[2..4].copy_from_slice(&port.to_be_bytes());
        sa[4..8].copy_from_slice(&ip);
        sa
    }

    fn sockaddr_in6(port: u16, ip: [u8; 16], scope: u32) -> [u8; 28] {
        let mut sa = [0u8; 28];
        sa[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        sa[2..4].copy_from_slice(&port.to_be_bytes());
        sa[8..24].copy_from_slice(&ip);
        sa[24..28].copy_from_slice(&scope.to_ne_bytes());
        sa
    }

    fn addr_bytes(req: &Requested) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&req.addr[0].to_le_bytes());
        out[8..].copy_from_slice(&req.addr[1].to_le_bytes());
        out
    }

    #[test]
    fn ipv4_port_and_address() {
        let sa = sockaddr_in(8080, [127, 0, 0, 1]);
        let req = decode(&copied(&sa, 16), 16);
        assert_eq!((req.family, req.port, req.flags), (AF_INET, 8080, sock_flags::ADDR_READ));
        assert_eq!(addr_bytes(&req)[..4], [127, 0, 0, 1]);
        assert_eq!(addr_bytes(&req)[4..], [0; 12]);
    }

    #[test]
    fn ipv6_with_and_without_scope_id() {
        let ip = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let sa = sockaddr_in6(443, ip, 7);
        let full = decode(&copied(&sa, 28), 28);
        assert_eq!((full.family, full.port, full.scope_id), (AF_INET6, 443, 7));
        assert_eq!(addr_bytes(&full), ip);
        // RFC 2133's 24-byte sockaddr_in6 has no scope id: the kernel accepts it.
        let short = decode(&copied(&sa, 24), 24);
        assert_eq!((short.port, short.scope_id, short.flags), (443, 0, sock_flags::ADDR_READ));
    }

    #[test]
    fn lengths_too_short_for_the_family_are_flagged_with_nothing_decoded() {
        let sa = sockaddr_in(80, [10, 0, 0, 1]);
        let req = decode(&copied(&sa, 15), 15);
        assert_eq!((req.family, req.port, req.flags), (AF_INET, 0, sock_flags::ADDR_SHORT));
        let sa6 = sockaddr_in6(80, [1; 16], 0);
        assert_eq!(decode(&copied(&sa6, 23), 23).flags, sock_flags::ADDR_SHORT);
    }

    #[test]
    fn other_families_keep_their_family_and_no_address() {
        let mut sa = [0u8; 16];
        sa[..2].copy_from_slice(&1u16.to_ne_bytes()); // AF_UNIX
        sa[2..4].copy_from_slice(b"/t");
        let req = decode(&copied(&sa, 16), 16);
        assert_eq!((req.family, req.port, req.addr), (1, 0, [0, 0]), "a unix path is not a port");
    }

    #[test]
    fn null_and_lengthless_pointers_are_told_apart() {
        assert_eq!(Requested::precheck(true, 16).map(|r| r.flags), Some(sock_flags::ADDR_NULL));
        assert_eq!(Requested::precheck(false, 1).map(|r| r.flags), Some(sock_flags::ADDR_SHORT));
        assert_eq!(Requested::precheck(false, 2), None);
    }

    #[test]
    fn the_copy_never_exceeds_the_buffer() {
        assert_eq!(copy_len(110), SOCKADDR_IN6_LEN);
        assert_eq!(copy_len(16), 16);
        assert!(copy_len(u32::MAX) as usize <= COPY_WORDS * 8);
    }
}
