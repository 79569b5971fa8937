//! bindtrace's kernel side: one probe with three interchangeable backends (the syscall
//! tracepoints, kprobes and fentry/fexit on inet_bind/inet6_bind), chosen by the tracer at
//! load time. Every backend ends in the same place: the requested sockaddr copied from the
//! caller (so it survives a failed bind), the socket's fields, the filters, and one
//! `BindEvent` in the ring buffer.
//!
//! Kernel struct offsets are not compiled in: the tracer resolves them from the running
//! kernel's BTF and writes them into `BINDTRACE_CONFIG` before the object is loaded; the
//! helpers a kernel lacks are branched around on read-only config bits.
//!
//! Modules, in the order an event passes them: `hooks` (the attached programs) → `entry`
//! (entry-to-exit state) → `sockaddr` (the requested address) → `sock` (the socket) → `emit`
//! (filters, record, ring buffer); `maps` holds the shared state, and `tree` follows the
//! process tree of `bindtrace -- CMD`.
#![no_std]
#![no_main]
// The atomic add of `maps::count` (see there).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod emit;
mod entry;
mod hooks;
mod maps;
mod sock;
mod sockaddr;
mod tree;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
