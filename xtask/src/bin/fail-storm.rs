//! fail-storm: a storm of failed binds against ports this process holds, the load for the
//! failure-storm part of `cargo xtask bench`.
//!
//! It opens `--holders` listeners on 127.0.0.1 (ephemeral ports), prints `READY`, and waits
//! for a line on stdin, so that the tracer can start while the holders already exist, as on a
//! real host. Then it makes `--rounds` rounds of one failing bind (EADDRINUSE) per held port.
//! Halfway through, a forked child named `storm-unrelated` makes one successful bind and
//! reports its wall-clock time: the delay of an unrelated event in the middle of the storm.
//! At the end it prints one JSON line. Raw libc calls: the loop is what is measured.

use std::{
    io::BufRead as _,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

mod storm_common;
use storm_common::{listener, sockaddr, SOCKADDR_LEN};

#[derive(Parser)]
#[command(name = "fail-storm", about = "Hold N ports, then fail to bind each of them R times")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    holders: usize,
    #[arg(long, default_value_t = 600)]
    rounds: usize,
}

fn wall_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Forks a child named `storm-unrelated` that binds 127.0.0.1:0 once and exits; returns the
/// wall-clock time of the bind, as the parent saw it just before.
fn unrelated_bind() -> Result<u128> {
    let before = wall_ns();
    // SAFETY: the child only makes raw syscalls until _exit.
    unsafe {
        match libc::fork() {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                libc::prctl(libc::PR_SET_NAME, c"storm-unrelated".as_ptr());
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let addr = sockaddr(0);
                let ok = libc::bind(fd, (&raw const addr).cast(), SOCKADDR_LEN) == 0;
                libc::_exit(if ok { 0 } else { 1 });
            }
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                    bail!("the unrelated bind failed");
                }
            }
        }
    }
    Ok(before)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut ports = Vec::with_capacity(args.holders);
    let mut fds = Vec::with_capacity(args.holders);
    for _ in 0..args.holders {
        let (fd, port) = listener().context("opening the holders (is RLIMIT_NOFILE high enough?)")?;
        fds.push(fd);
        ports.push(port);
    }
    println!("READY {}", args.holders);
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go).context("waiting for GO on stdin")?;

    let begin = Instant::now();
    let mut failed = 0u64;
    let mut unrelated_ns = 0;
    for round in 0..args.rounds {
        if round == args.rounds / 2 {
            unrelated_ns = unrelated_bind()?;
        }
        for &port in &ports {
            let target = sockaddr(port);
            // SAFETY: plain socket calls on memory we own.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    continue;
                }
                if libc::bind(fd, (&raw const target).cast(), SOCKADDR_LEN) != 0 {
                    failed += 1;
                }
                libc::close(fd);
            }
        }
    }
    let seconds = begin.elapsed().as_secs_f64();
    println!(
        "{{\"holders\":{},\"rounds\":{},\"failed\":{failed},\"seconds\":{seconds:.6},\"unrelated_bind_wall_ns\":{unrelated_ns},\"end_wall_ns\":{}}}",
        args.holders,
        args.rounds,
        wall_ns()
    );
    for fd in fds {
        // SAFETY: our own fds.
        unsafe { libc::close(fd) };
    }
    Ok(())
}
