//! bind-storm: N threads, each looping socket + bind + close, as fast as the kernel allows.
//! The load for `cargo xtask bench`; prints one JSON line with the exact number of binds made.
//!
//! Modes: `ok` binds 127.0.0.1:0 (every bind succeeds on an ephemeral port); `inuse` binds a
//! port the generator itself holds with a listener (every bind fails with EADDRINUSE); `mix`
//! alternates the two. Raw libc calls: the loop is the thing being measured.

use std::{
    sync::{Arc, Barrier},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ok,
    Inuse,
    Mix,
}

#[derive(Parser)]
#[command(name = "bind-storm", about = "Loop socket + bind + close on N threads and report binds/s")]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Ok)]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Binds in total, split evenly across threads.
    #[arg(long, default_value_t = 1_000_000)]
    binds: u64,
}

fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    }
}

/// Holds 127.0.0.1:P with a listener and returns P (the `inuse` target).
fn hold_a_port() -> Result<(i32, u16)> {
    // SAFETY: plain socket calls on memory we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let addr = sockaddr(0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::bind(fd, (&raw const addr).cast(), len) != 0 || libc::listen(fd, 1) != 0 {
            bail!("bind/listen: {}", std::io::Error::last_os_error());
        }
        let mut bound = sockaddr(0);
        let mut bound_len = len;
        if libc::getsockname(fd, (&raw mut bound).cast(), &mut bound_len) != 0 {
            bail!("getsockname: {}", std::io::Error::last_os_error());
        }
        Ok((fd, u16::from_be(bound.sin_port)))
    }
}

/// One thread's loop; returns (binds made, binds that failed).
fn storm(mode: Mode, binds: u64, held_port: u16) -> (u64, u64) {
    let ephemeral = sockaddr(0);
    let taken = sockaddr(held_port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    let mut failed = 0;
    for i in 0..binds {
        let target = match mode {
            Mode::Ok => &ephemeral,
            Mode::Inuse => &taken,
            Mode::Mix => {
                if i % 2 == 0 {
                    &ephemeral
                } else {
                    &taken
                }
            }
        };
        // SAFETY: plain socket calls on memory we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                continue;
            }
            if libc::bind(fd, (target as *const libc::sockaddr_in).cast(), len) != 0 {
                failed += 1;
            }
            libc::close(fd);
        }
    }
    (binds, failed)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let (_holder, held_port) = hold_a_port().context("holding the EADDRINUSE target port")?;
    let per_thread = args.binds / args.threads as u64;
    let remainder = args.binds % args.threads as u64;
    let start_line = Arc::new(Barrier::new(args.threads + 1));
    let handles: Vec<_> = (0..args.threads)
        .map(|i| {
            let count = per_thread + u64::from((i as u64) < remainder);
            let start_line = start_line.clone();
            let mode = args.mode;
            std::thread::spawn(move || {
                start_line.wait();
                storm(mode, count, held_port)
            })
        })
        .collect();
    start_line.wait();
    let begin = Instant::now();
    let mut made = 0;
    let mut failed = 0;
    for handle in handles {
        let (m, f) = handle.join().map_err(|_| anyhow::anyhow!("a storm thread panicked"))?;
        made += m;
        failed += f;
    }
    let seconds = begin.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"{}\",\"threads\":{},\"binds\":{made},\"failed\":{failed},\"seconds\":{seconds:.6},\"binds_per_second\":{:.0},\"held_port\":{held_port},\"extra_binds\":1}}",
        match args.mode {
            Mode::Ok => "ok",
            Mode::Inuse => "inuse",
            Mode::Mix => "mix",
        },
        args.threads,
        made as f64 / seconds
    );
    Ok(())
}
