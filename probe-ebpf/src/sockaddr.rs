//! The sockaddr the caller asked for, copied out of its memory at return (so a failed bind
//! keeps it) and decoded.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::generated;
use bindtrace_common::{
    sock_flags,
    sockaddr::{copy_len, decode, Requested, COPY_WORDS},
};

/// Copies the sockaddr the caller passed, all of it in one read (at most 28 bytes), and
/// decodes it with `bindtrace_common::sockaddr` (host-tested there).
#[inline(always)]
pub(crate) fn read_requested_address(addr: *const u8, in_kernel: bool, addrlen: u32) -> Requested {
    if let Some(nothing) = Requested::precheck(addr.is_null(), addrlen) {
        return nothing;
    }
    // Zeroed with four word stores: the 5.11-5.15 verifiers refuse an uninitialised buffer
    // handed to a probe-read helper with a variable length ("invalid indirect read from
    // stack"), and a zero-filled array (`[0u8; 32]`, even `[0u64; 4]`) becomes a call to a
    // byte-at-a-time `memset`. Volatile stores stay four instructions.
    let mut buf = MaybeUninit::<[u64; COPY_WORDS]>::uninit();
    for i in 0..COPY_WORDS {
        // SAFETY: within the 32-byte buffer.
        unsafe { core::ptr::write_volatile(buf.as_mut_ptr().cast::<u64>().add(i), 0) };
    }
    let len = copy_len(addrlen);
    // SAFETY: both helpers cope with any pointer; `len` is at most 28 of the 32 bytes.
    let ret = unsafe {
        if in_kernel {
            generated::bpf_probe_read_kernel(buf.as_mut_ptr().cast(), len, addr.cast())
        } else {
            generated::bpf_probe_read_user(buf.as_mut_ptr().cast(), len, addr.cast())
        }
    };
    if ret != 0 {
        return Requested::none(sock_flags::ADDR_FAULT);
    }
    // SAFETY: every word was written above (zeroed, then partly overwritten by the copy).
    decode(unsafe { buf.assume_init_ref() }, addrlen)
}
