//! The collateral load for `cargo xtask bench`: a loop of one cheap syscall that has nothing
//! to do with binds (getppid), to measure what an attached tracer costs every other process.
//! Prints `{"calls":N,"seconds":S,"calls_per_second":R}`.

use std::time::Instant;

fn main() {
    let calls: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(5_000_000);
    let start = Instant::now();
    for _ in 0..calls {
        // SAFETY: getppid takes no arguments and cannot fail. Through syscall(2), so that no
        // libc cache can answer without entering the kernel.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"calls\":{calls},\"seconds\":{seconds},\"calls_per_second\":{}}}", calls as f64 / seconds);
}
