//! The collateral loads for `cargo xtask bench`: a loop of one cheap syscall that has nothing
//! to do with binds (getppid), to measure what an attached tracer costs every other process;
//! with `--forks`, a loop of fork, exit and wait (a fork storm: what following a process tree
//! costs). Prints `{"calls":N,"seconds":S,"calls_per_second":R}` (calls: forks with `--forks`).

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let forks = args.iter().any(|a| a == "--forks");
    let calls: u64 = args.iter().skip(1).find_map(|n| n.parse().ok()).unwrap_or(if forks { 20_000 } else { 5_000_000 });
    let start = Instant::now();
    for _ in 0..calls {
        if forks {
            // SAFETY: the child only calls _exit; the parent reaps it.
            unsafe {
                match libc::fork() {
                    0 => libc::_exit(0),
                    -1 => {
                        eprintln!("fork failed: {}", std::io::Error::last_os_error());
                        std::process::exit(1);
                    }
                    child => {
                        libc::waitpid(child, std::ptr::null_mut(), 0);
                    }
                }
            }
        } else {
            // SAFETY: getppid takes no arguments and cannot fail. Through syscall(2), so that
            // no libc cache can answer without entering the kernel.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"calls\":{calls},\"seconds\":{seconds},\"calls_per_second\":{}}}", calls as f64 / seconds);
}
