//! The failure-storm part of `cargo xtask bench`: does bindtrace keep its output prompt and
//! its memory bounded while thousands of binds fail per second against thousands of
//! holders? `fail-storm` (xtask/src/bin/fail-storm.rs) holds the ports and makes the
//! failures; bindtrace traces everything (no filter) to a pipe read here, and each line is
//! timestamped as it arrives.
//!
//! Reported per scenario: lines written by the end of the storm; the p50/p99/max delay from a
//! bind (the event's `time`) to its line; the same for one unrelated successful bind made
//! mid-storm by another process; peak RSS (VmHWM); the share of (port, second) pairs with a
//! failure that got a diagnosis naming a holder in that second; events lost (the summary's
//! `dropped`); diagnoses that followed their event or were shed.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// (label, holders, rounds): every round fails once on each held port.
pub const SCENARIOS: [(&str, usize, usize); 2] = [
    ("(i) 1,000 holders, 600 rounds x 1,000 ports", 1_000, 600),
    ("(ii) 10,000 listeners, 50 rounds x 10,000 ports", 10_000, 50),
];

/// Targets (issue 10), checked in the table.
const MAX_DELAY_MS: f64 = 250.0;
const MAX_RSS_MB: f64 = 32.0;

fn wall_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// The raw text of `"name":VALUE` in an NDJSON line (strings without their quotes). The
/// reader must keep up with bindtrace, so lines are searched, not parsed.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    if let Some(string) = rest.strip_prefix('"') {
        return string.split('"').next();
    }
    rest.split([',', '}']).next()
}

fn rfc3339_ns(text: &str) -> Option<i128> {
    let time = humantime::parse_rfc3339(text).ok()?;
    time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_nanos() as i128)
}

/// What the reader saw.
#[derive(Default)]
struct Seen {
    /// Bind lines of the storm: (arrival wall ns, delay µs).
    storm_lines: Vec<(i128, u32)>,
    unrelated_delay_ms: Option<f64>,
    failing: HashSet<(u16, i64)>,
    diagnosed: HashSet<(u16, i64)>,
    summary: Value,
}

fn read_output(stdout: impl std::io::Read) -> Seen {
    let mut seen = Seen::default();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let arrived = wall_ns();
        let kind = field(&line, "type");
        if kind == Some("summary") {
            seen.summary = serde_json::from_str(&line).unwrap_or(Value::Null);
            continue;
        }
        let Some(time) = field(&line, "time").and_then(rfc3339_ns) else { continue };
        let second = (time / 1_000_000_000) as i64;
        let port: Option<u16> = field(&line, "port").and_then(|p| p.parse().ok());
        let names_holder = line.contains("\"holders\":[{");
        match (kind, field(&line, "comm")) {
            (Some("bind"), Some("fail-storm")) => {
                let delay_us = ((arrived - time).max(0) / 1_000).min(u32::MAX as i128) as u32;
                seen.storm_lines.push((arrived, delay_us));
                if let (Some(port), Some("EADDRINUSE")) = (port, field(&line, "errno_name")) {
                    seen.failing.insert((port, second));
                    if names_holder {
                        seen.diagnosed.insert((port, second));
                    }
                }
            }
            (Some("bind"), Some("storm-unrelated")) => {
                seen.unrelated_delay_ms = Some((arrived - time) as f64 / 1e6);
            }
            (Some("diagnosis"), Some("fail-storm")) => {
                if let (Some(port), true) = (port, names_holder) {
                    seen.diagnosed.insert((port, second));
                }
            }
            _ => {}
        }
    }
    seen
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1e3
}

/// One scenario, start to end.
fn run_scenario(bindtrace: &Path, generator: &Path, holders: usize, rounds: usize) -> Result<Value> {
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

    let mut tracer = Command::new(bindtrace)
        .args(["-o", "ndjson"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bindtrace")?;
    let stderr = tracer.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut stderr_lines = BufReader::new(stderr).lines();
    loop {
        match stderr_lines.next() {
            Some(Ok(line)) if line.contains("attached") => break,
            Some(Ok(_)) => {}
            _ => bail!("bindtrace exited before attaching"),
        }
    }
    let messages = std::thread::spawn(move || stderr_lines.map_while(Result::ok).collect::<Vec<_>>());
    let stdout = tracer.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || read_output(stdout));

    let mut go = storm.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    writeln!(go, "GO")?;
    let result_line = storm_out.next().ok_or_else(|| anyhow!("fail-storm printed no result"))??;
    let status = storm.wait()?;
    if !status.success() {
        bail!("fail-storm failed: {status}");
    }
    let storm_end = wall_ns();
    let result: Value = serde_json::from_str(&result_line).with_context(|| format!("fail-storm: {result_line}"))?;
    // Lookups still under way finish; then the peak is read and the tracer stopped.
    std::thread::sleep(Duration::from_secs(2));
    let rss_kb = peak_rss_kb(tracer.id()).unwrap_or(0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let tracer_status = tracer.wait()?;
    let seen = reader.join().map_err(|_| anyhow!("the output reader panicked"))?;
    let messages = messages.join().map_err(|_| anyhow!("the stderr reader panicked"))?;
    if !tracer_status.success() || seen.summary["type"] != "summary" {
        bail!("bindtrace ended with {tracer_status} and no summary; stderr: {messages:?}");
    }

    let mut delays: Vec<u32> = seen.storm_lines.iter().map(|(_, d)| *d).collect();
    delays.sort_unstable();
    let by_end = seen.storm_lines.iter().filter(|(arrived, _)| *arrived <= storm_end).count();
    let covered = seen.failing.intersection(&seen.diagnosed).count();
    Ok(json!({
        "holders": holders,
        "rounds": rounds,
        "failures": result["failed"],
        "storm_s": result["seconds"],
        "lines": seen.storm_lines.len(),
        "lines_by_storm_end": by_end,
        "delay_ms": {
            "p50": percentile(&delays, 0.5),
            "p99": percentile(&delays, 0.99),
            "max": percentile(&delays, 1.0),
        },
        "unrelated_bind_delay_ms": seen.unrelated_delay_ms,
        "peak_rss_kb": rss_kb,
        "port_seconds_failing": seen.failing.len(),
        "port_seconds_diagnosed_with_holder": covered,
        "dropped": seen.summary["dropped"],
        "diagnoses": seen.summary["diagnoses"],
        "stderr": messages,
    }))
}

/// Runs every scenario; returns the markdown table and the JSON results.
pub fn failure_storms(bindtrace: &Path, generator: &Path) -> Result<(String, Value)> {
    let mut markdown = String::from(
        "\n### failure storms (release build, no filter, output to a pipe read as it comes)\n\n\
         | scenario | failures in | lines by storm end | bind→line p50 / p99 / max | unrelated bind→line | peak RSS | (port, second) diagnosed naming a holder | events lost | diagnoses followed / shed |\n\
         | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut results = Vec::new();
    for (label, holders, rounds) in SCENARIOS {
        eprintln!("xtask: bench failure storm {label}");
        let r = run_scenario(bindtrace, generator, holders, rounds)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_without_parsing() {
        let line = r#"{"type":"bind","seq":7,"time":"2026-11-26T00:26:52.260750107Z","pid":1,"comm":"fail-storm","port":41234,"errno_name":"EADDRINUSE","diagnosis":{"kind":"in_use","holders":[{"proto":"tcp"}]}}"#;
        assert_eq!(field(line, "type"), Some("bind"));
        assert_eq!(field(line, "port"), Some("41234"));
        assert_eq!(field(line, "comm"), Some("fail-storm"));
        assert_eq!(field(line, "missing"), None);
        let ns = rfc3339_ns(field(line, "time").expect("time")).expect("parses");
        assert_eq!(ns % 1_000_000_000, 260_750_107);
        let seen = read_output(format!("{line}\n{{\"type\":\"summary\",\"dropped\":0}}\n").as_bytes());
        assert_eq!(seen.storm_lines.len(), 1);
        assert_eq!(seen.failing.len(), 1);
        assert_eq!(seen.failing, seen.diagnosed);
        assert_eq!(seen.summary["dropped"], 0);
        assert_eq!(percentile(&[1000, 2000, 3000], 0.5), 2.0);
    }
}
