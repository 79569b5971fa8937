//! Socket helpers shared by the storm generators (bind-storm, fail-storm). Raw libc calls:
//! the storms' loops are what the benchmark measures.

use anyhow::{bail, Result};

pub(crate) fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    }
}

pub(crate) const SOCKADDR_LEN: u32 = std::mem::size_of::<libc::sockaddr_in>() as u32;

/// A listener on an ephemeral port of 127.0.0.1: (fd, port).
pub(crate) fn listener() -> Result<(i32, u16)> {
    // SAFETY: plain socket calls on memory we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let addr = sockaddr(0);
        if libc::bind(fd, (&raw const addr).cast(), SOCKADDR_LEN) != 0 || libc::listen(fd, 1) != 0 {
            bail!("bind/listen: {}", std::io::Error::last_os_error());
        }
        let mut bound = sockaddr(0);
        let mut len = SOCKADDR_LEN;
        if libc::getsockname(fd, (&raw mut bound).cast(), &mut len) != 0 {
            bail!("getsockname: {}", std::io::Error::last_os_error());
        }
        Ok((fd, u16::from_be(bound.sin_port)))
    }
}
