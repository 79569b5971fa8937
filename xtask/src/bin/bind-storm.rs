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

mod storm_common;
use storm_common::{listener, sockaddr, SOCKADDR_LEN};

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

/// One thread's loop; returns (binds made, binds that failed).
fn storm(mode: Mode, binds: u64, held_port: u16) -> (u64, u64) {
    let ephemeral = sockaddr(0);
    let taken = sockaddr(held_port);
    let len = SOCKADDR_LEN;
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
    let (_holder, held_port) = listener().context("holding the EADDRINUSE target port")?;
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
