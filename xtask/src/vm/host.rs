//! `cargo xtask vm --host`: the same scenarios and checks on this machine.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use super::{
    console::GuestRun,
    initramfs::PER_THREAD_TRACER_ARGS,
    report::{finish, report, Tally},
};
use crate::{setup::output, workspace_root};

/// The same scenarios and checks on this machine (tracepoint backend).
pub(super) fn run_on_host(bindtrace: &Path, scenarios: &Path, tally: &mut Tally) -> Result<()> {
    let dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&dir)?;
    let events_file = dir.join("host-events.ndjson");
    let mut tracer = start_attached(bindtrace, &["-o", "ndjson"], &events_file)?;
    let printed = output(&mut Command::new(scenarios))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let status = tracer.wait()?;
    let events: Vec<Value> =
        std::fs::read_to_string(&events_file)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let scenario_lines: Vec<Value> = printed.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let counted = traced_on_host(bindtrace, scenarios, &dir, "--collide")?;
    let sleepers = traced_on_host(bindtrace, scenarios, &dir, "--sleepers")?;
    let runs = vec![GuestRun {
        backend: "tracepoint".into(),
        exit: if status.success() { "exit=0".into() } else { format!("exit={status}") },
        events,
        scenarios: scenario_lines,
        collision: serde_json::from_str(counted.trim()).ok(),
        sleepers: serde_json::from_str(sleepers.trim()).ok(),
        ..GuestRun::default()
    }];
    report("host", &runs, &["tracepoint"], false, &[], tally);
    Ok(())
}

/// Starts `bindtrace --attach tracepoint ARGS --file FILE` and waits until it says it is
/// attached.
pub(super) fn start_attached(bindtrace: &Path, args: &[&str], file: &Path) -> Result<std::process::Child> {
    let mut tracer = Command::new(bindtrace)
        .args(["--attach", "tracepoint"])
        .args(args)
        .arg("--file")
        .arg(file)
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = tracer.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    if !lines.by_ref().map_while(Result::ok).any(|l| l.contains("attached")) {
        bail!("bindtrace {args:?} did not attach");
    }
    Ok(tracer)
}

/// `bind-scenarios MODE` (`--collide`, `--sleepers`) under a bindtrace of its own, as in the
/// guests (a ring that holds all its events: the check is of per-thread state, not of the
/// ring's size); returns what `--count` printed.
pub(super) fn traced_on_host(bindtrace: &Path, scenarios: &Path, dir: &Path, mode: &str) -> Result<String> {
    let name = mode.trim_start_matches('-');
    let events = dir.join(format!("host-{name}.ndjson"));
    let mut tracer = start_attached(bindtrace, &PER_THREAD_TRACER_ARGS, &events)?;
    let plan = dir.join(format!("host-{name}-plan.json"));
    std::fs::write(&plan, output(Command::new(scenarios).arg(mode))?)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    tracer.wait()?;
    output(Command::new(scenarios).arg("--count").arg(&plan).arg(&events))
}

/// `cargo xtask vm --host`: the scenarios traced on this machine (tracepoint backend).
pub(crate) fn vm_on_host(bindtrace: &Path, scenarios: &Path) -> Result<()> {
    let mut tally = Tally::default();
    run_on_host(bindtrace, scenarios, &mut tally)?;
    for failure in &tally.failures {
        eprintln!("xtask: vm: {failure}");
    }
    finish(&tally)
}
