//! The failure-storm part of `cargo xtask bench`: does bindtrace keep its output prompt and
//! its memory bounded while thousands of binds fail per second against thousands of
//! holders? `fail-storm` (fixtures/src/bin/fail-storm.rs) holds the ports and makes the
//! failures; bindtrace traces everything (no filter) to a pipe read here, and each line is
//! timestamped as it arrives.
//!
//! Reported per scenario: lines written by the end of the storm; the p50/p99/max delay from a
//! bind (the event's `time`) to its line; the same for one unrelated successful bind made
//! mid-storm by another process; peak RSS (VmHWM); the share of (port, second) pairs with a
//! failure that got a diagnosis naming a holder in that second; events lost (the summary's
//! `dropped`); diagnoses that followed their event or were shed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// (label, holders, rounds): every round fails once on each held port.
pub(crate) const SCENARIOS: [(&str, usize, usize); 2] = [
    ("(i) 1,000 holders, 600 rounds x 1,000 ports", 1_000, 600),
    ("(ii) 10,000 listeners, 50 rounds x 10,000 ports", 10_000, 50),
];

/// Targets, checked in the table: the delay (issue 10) and the peak RSS (28 MB since issue
/// 19, 32 MB before).
const MAX_DELAY_MS: f64 = 250.0;
const MAX_RSS_MB: f64 = 28.0;

/// One scenario, start to end: fail-storm holds the ports, bindtrace traces everything into
/// a pipe that ndjson-meter reads.
fn run_scenario(bindtrace: &Path, generator: &Path, meter: &Path, holders: usize, rounds: usize) -> Result<Value> {
    let mut storm = Command::new(generator)
        .args(["--holders", &holders.to_string(), "--rounds", &rounds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", generator.display()))?;
    let mut storm_out = BufReader::new(storm.stdout.take().ok_or_else(|| anyhow!("no stdout"))?).lines();
    match storm_out.next() {
        Some(Ok(line)) if line.starts_with("READY") => {}
        other => bail!("fail-storm did not get ready: {other:?}"),
    }

    let mut tracer = super::tracer::spawn_ndjson(bindtrace)?;
    let stdout = tracer.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    // A deeper pipe than the default 64 KiB absorbs the meter's scheduling jitter.
    // SAFETY: fcntl on a pipe fd this process owns.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&stdout), libc::F_SETPIPE_SZ, 1 << 20) };
    let meter = Command::new(meter)
        .stdin(Stdio::from(stdout))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", meter.display()))?;
    let stderr = tracer.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let stderr_lines = super::tracer::wait_attached(stderr)?;
    let messages = std::thread::spawn(move || stderr_lines.map_while(Result::ok).collect::<Vec<_>>());

    let mut go = storm.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    writeln!(go, "GO")?;
    let result_line = storm_out.next().ok_or_else(|| anyhow!("fail-storm printed no result"))??;
    let status = storm.wait()?;
    // SAFETY: signalling our own child: the storm is over.
    unsafe { libc::kill(meter.id() as i32, libc::SIGUSR1) };
    if !status.success() {
        bail!("fail-storm failed: {status}");
    }
    let result: Value = serde_json::from_str(&result_line).with_context(|| format!("fail-storm: {result_line}"))?;
    // Lookups still under way finish; then the peak is read and the tracer stopped.
    std::thread::sleep(Duration::from_secs(2));
    let rss_kb = super::tracer::peak_rss_kb(tracer.id()).unwrap_or(0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let tracer_status = tracer.wait()?;
    let measured = meter.wait_with_output().context("waiting for ndjson-meter")?;
    let messages = messages.join().map_err(|_| anyhow!("the stderr reader panicked"))?;
    let measured: Value = serde_json::from_slice(&measured.stdout).context("ndjson-meter's report")?;
    let summary = &measured["summary"];
    if !tracer_status.success() || summary["type"] != "summary" {
        bail!("bindtrace ended with {tracer_status} and no summary; stderr: {messages:?}");
    }
    Ok(json!({
        "holders": holders,
        "rounds": rounds,
        "failures": result["failed"],
        "storm_s": result["seconds"],
        "lines": measured["lines"],
        "lines_by_storm_end": measured["lines_by_storm_end"],
        "delay_ms": measured["delay_ms"],
        "unrelated_bind_delay_ms": measured["unrelated_bind_delay_ms"],
        "peak_rss_kb": rss_kb,
        "port_seconds_failing": measured["port_seconds_failing"],
        "port_seconds_diagnosed_with_holder": measured["port_seconds_diagnosed_with_holder"],
        "dropped": summary["dropped"],
        "diagnoses": summary["diagnoses"],
        "stderr": messages,
    }))
}

/// Runs every scenario; returns the markdown table and the JSON results.
pub(super) fn failure_storms(bindtrace: &Path, generator: &Path, meter: &Path) -> Result<(String, Value)> {
    let mut markdown = String::from(
        "\n### failure storms (release build, no filter, output to a pipe read as it comes)\n\n\
         | scenario | failures in | lines by storm end | bind→line p50 / p99 / max | unrelated bind→line | peak RSS | (port, second) diagnosed naming a holder | events lost | diagnoses followed / shed |\n\
         | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut results = Vec::new();
    for (label, holders, rounds) in SCENARIOS {
        eprintln!("xtask: bench failure storm {label}");
        let r = run_scenario(bindtrace, generator, meter, holders, rounds)?;
        let delay = &r["delay_ms"];
        let max = delay["max"].as_f64().unwrap_or(f64::MAX);
        let rss_mb = r["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0;
        let failing = r["port_seconds_failing"].as_u64().unwrap_or(0);
        let covered = r["port_seconds_diagnosed_with_holder"].as_u64().unwrap_or(0);
        let mark = |ok: bool| if ok { "" } else { " **(over target)**" };
        markdown.push_str(&format!(
            "| {label} | {} in {:.1} s | {} of {} | {:.1} / {:.1} / {:.1} ms{} | {} | {:.1} MB{} | {covered} of {failing} ({:.1}%) | {} | {} / {} |\n",
            r["failures"],
            r["storm_s"].as_f64().unwrap_or(0.0),
            r["lines_by_storm_end"],
            r["lines"],
            delay["p50"].as_f64().unwrap_or(0.0),
            delay["p99"].as_f64().unwrap_or(0.0),
            max,
            mark(max <= MAX_DELAY_MS),
            r["unrelated_bind_delay_ms"].as_f64().map_or("not seen".to_owned(), |ms| format!("{ms:.1} ms")),
            rss_mb,
            mark(rss_mb <= MAX_RSS_MB),
            if failing > 0 { covered as f64 * 100.0 / failing as f64 } else { 0.0 },
            r["dropped"],
            r["diagnoses"]["followed"],
            r["diagnoses"]["shed"],
        ));
        results.push(json!({ "scenario": label, "result": r }));
    }
    Ok((markdown, Value::Array(results)))
}
