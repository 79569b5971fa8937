//! `cargo xtask bench`: what tracing binds costs the traced program, measured against the
//! alternatives a user would reach for. Every round runs each configuration once, in turn,
//! so machine drift spreads over all of them; medians are reported.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod collateral;
mod host;
mod soak;
mod storm;
mod tracer;
mod tree;

use self::tracer::{peak_rss_kb, wait_attached, wait_with_usage};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Binds per run for the untraced and bindtrace configurations.
    #[arg(long, default_value_t = 1_000_000)]
    binds: u64,
    /// Binds per run under strace and bpftrace (they are much slower).
    #[arg(long, default_value_t = 100_000)]
    slow_binds: u64,
    /// Rounds; each round runs every configuration once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Storm modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "ok,inuse")]
    modes: Vec<String>,
    /// Storm threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Which parts to run: `rate` (what tracing costs a bind storm), `storms` (failure
    /// storms: output delay, memory and diagnosis coverage), `collateral` (what staying
    /// attached costs processes that never bind) and `hosts` (a port with 18,000
    /// connections, hosts with 100k/500k/1M open fds: time to each diagnosis, peak RSS,
    /// longest line); `tree` (what following a process tree costs a fork storm); `soak` (not by default: `--soak-seconds` of churn, RSS sampled every
    /// 10 s).
    #[arg(long, value_delimiter = ',', default_value = "rate,storms,collateral,hosts,tree")]
    parts: Vec<String>,
    /// How long the soak part runs.
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// How long the soak's reader stalls, in the middle (0: never; then a rise in RSS cannot
    /// hide in the memory the stall freed).
    #[arg(long, default_value_t = 60)]
    soak_stall_seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Untraced,
    Bindtrace,
    BindtraceFiltered,
    Bpftrace,
    Strace,
    /// The same two tracepoints with programs that do nothing: the price of the hook itself.
    HookFloor,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Self::Untraced => "(a) untraced",
            Self::Bindtrace => "(b) bindtrace -o ndjson --file, attribution on",
            Self::BindtraceFiltered => "(c) bindtrace --errno filter dropping all in kernel",
            Self::Bpftrace => "(d) bpftrace printing each bind",
            Self::Strace => "(e) strace -f -e trace=bind -o /dev/null",
            Self::HookFloor => "(f) floor: bpftrace, empty programs on the same tracepoints",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Bindtrace => "bindtrace",
            Self::BindtraceFiltered => "bindtrace_filtered",
            Self::Bpftrace => "bpftrace",
            Self::Strace => "strace",
            Self::HookFloor => "hook_floor",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    binds: u64,
    binds_per_second: f64,
    /// bindtrace only: bind events written, events the tracer says it dropped, what the probe
    /// filtered, tracer CPU seconds, peak RSS, exec→attached.
    events_written: Option<u64>,
    dropped: Option<u64>,
    filtered: Option<u64>,
    tracer_cpu_s: Option<f64>,
    tracer_peak_rss_kb: Option<u64>,
    attach_ms: Option<f64>,
}

const BPFTRACE_EMPTY: &str = "tracepoint:syscalls:sys_enter_bind {} tracepoint:syscalls:sys_exit_bind {}";

const BPFTRACE_SCRIPT: &str = "tracepoint:syscalls:sys_enter_bind { @addr[tid] = args->umyaddr; } \
     tracepoint:syscalls:sys_exit_bind /@addr[tid]/ { printf(\"%d %s %d\\n\", pid, comm, args->ret); delete(@addr[tid]); }";

fn storm(storm_bin: &Path, mode: &str, threads: usize, binds: u64, wrapper: &[&str]) -> Result<Value> {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(storm_bin);
            c
        }
        None => Command::new(storm_bin),
    };
    command.args(["--mode", mode, "--threads", &threads.to_string(), "--binds", &binds.to_string()]);
    let out = command.stderr(Stdio::inherit()).output().with_context(|| format!("running {}", storm_bin.display()))?;
    if !out.status.success() {
        bail!("bind-storm failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().ok_or_else(|| anyhow!("bind-storm printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("bind-storm output: {line}"))
}

fn run_bindtrace(
    bindtrace: &Path,
    storm_bin: &Path,
    mode: &str,
    threads: usize,
    binds: u64,
    filtered: bool,
) -> Result<Run> {
    let dir = Path::new("target/bench");
    std::fs::create_dir_all(dir)?;
    let file = dir.join("events.ndjson");
    let mut command = Command::new(bindtrace);
    command.args(["--comm", "bind-storm", "-o", "ndjson", "--file"]).arg(&file);
    if filtered {
        // Nothing in the storm fails with EPERM: every event is dropped in the kernel.
        command.args(["--errno", "EPERM"]);
    }
    let exec = Instant::now();
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let lines = wait_attached(stderr)?;
    let attach_ms = exec.elapsed().as_secs_f64() * 1e3;
    // Keep draining stderr so a drop report can never block the tracer.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let result = storm(storm_bin, mode, threads, binds, &[]);
    // Let the tracer catch up before reading its peak and stopping it.
    std::thread::sleep(Duration::from_millis(300));
    let rss = peak_rss_kb(child.id()).unwrap_or(0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let cpu = wait_with_usage(child.id())?;
    let messages = drain.join().map_err(|_| anyhow!("stderr reader panicked"))?;
    let storm_result = result?;

    // Streamed: the file holds ~450 bytes per event.
    let reader = BufReader::new(std::fs::File::open(&file).context("reading the events file")?);
    let mut events = 0u64;
    let mut summary = Value::Null;
    for line in reader.lines() {
        let line = line?;
        if line.starts_with("{\"type\":\"bind\"") {
            events += 1;
        } else {
            summary = serde_json::from_str(&line).unwrap_or(Value::Null);
        }
    }
    let _ = std::fs::remove_file(&file);
    if summary["type"] != "summary" {
        bail!("bindtrace wrote no summary record; stderr: {messages:?}");
    }
    Ok(Run {
        binds: storm_result["binds"].as_u64().unwrap_or(0) + storm_result["extra_binds"].as_u64().unwrap_or(0),
        binds_per_second: storm_result["binds_per_second"].as_f64().unwrap_or(0.0),
        events_written: Some(events),
        dropped: summary["dropped"].as_u64(),
        filtered: summary["kernel"]["filtered"].as_u64(),
        tracer_cpu_s: Some(cpu),
        tracer_peak_rss_kb: Some(rss),
        attach_ms: Some(attach_ms),
    })
}

fn run_bpftrace(script: &str, storm_bin: &Path, mode: &str, threads: usize, binds: u64) -> Result<Run> {
    let mut child = Command::new("bpftrace")
        .args(["-e", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    // bpftrace prints "Attaching N probes..." once ready.
    for line in lines.by_ref() {
        if line?.contains("Attaching") {
            break;
        }
    }
    let printed = std::thread::spawn(move || lines.map_while(Result::ok).count());
    std::thread::sleep(Duration::from_millis(500));
    let result = storm(storm_bin, mode, threads, binds, &[]);
    // SAFETY: kill has no memory preconditions; the pid is a process this code started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let _ = printed.join();
    let result = result?;
    Ok(Run {
        binds: result["binds"].as_u64().unwrap_or(0),
        binds_per_second: result["binds_per_second"].as_f64().unwrap_or(0.0),
        ..Run::default()
    })
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn bench(args: &BenchArgs, bindtrace: &Path, storm_bin: &Path, release_dir: &Path) -> Result<()> {
    for part in &args.parts {
        if !["rate", "storms", "collateral", "hosts", "tree", "soak"].contains(&part.as_str()) {
            bail!("unknown bench part {part}: use rate, storms, collateral, hosts, tree, soak");
        }
    }
    let run_rate = args.parts.iter().any(|p| p == "rate");
    let modes: &[String] = if run_rate { &args.modes } else { &[] };
    let mut configs = vec![Config::Untraced, Config::Bindtrace, Config::BindtraceFiltered];
    let mut skipped = Vec::new();
    if available("bpftrace") {
        configs.push(Config::Bpftrace);
    } else {
        skipped.push("(d) and (f) bpftrace: not installed (apt-get install bpftrace)");
    }
    if available("strace") {
        configs.push(Config::Strace);
    } else {
        skipped.push("(e) strace: not installed (apt-get install strace)");
    }
    if available("bpftrace") {
        configs.push(Config::HookFloor);
    }
    let mut results = serde_json::Map::new();
    let mut markdown = String::new();
    for mode in modes {
        let mut runs: Vec<(Config, Run)> = Vec::new();
        for round in 0..args.rounds {
            for &config in &configs {
                eprintln!("xtask: bench mode={mode} round {}/{} {}", round + 1, args.rounds, config.label());
                let run = match config {
                    Config::Untraced => {
                        let r = storm(storm_bin, mode, args.threads, args.binds, &[])?;
                        Run {
                            binds: r["binds"].as_u64().unwrap_or(0),
                            binds_per_second: r["binds_per_second"].as_f64().unwrap_or(0.0),
                            ..Run::default()
                        }
                    }
                    Config::Bindtrace => run_bindtrace(bindtrace, storm_bin, mode, args.threads, args.binds, false)?,
                    Config::BindtraceFiltered => {
                        run_bindtrace(bindtrace, storm_bin, mode, args.threads, args.binds, true)?
                    }
                    Config::Bpftrace => run_bpftrace(BPFTRACE_SCRIPT, storm_bin, mode, args.threads, args.slow_binds)?,
                    Config::HookFloor => run_bpftrace(BPFTRACE_EMPTY, storm_bin, mode, args.threads, args.binds)?,
                    Config::Strace => {
                        let r = storm(
                            storm_bin,
                            mode,
                            args.threads,
                            args.slow_binds,
                            &["strace", "-f", "-e", "trace=bind", "-o", "/dev/null"],
                        )?;
                        Run {
                            binds: r["binds"].as_u64().unwrap_or(0),
                            binds_per_second: r["binds_per_second"].as_f64().unwrap_or(0.0),
                            ..Run::default()
                        }
                    }
                };
                runs.push((config, run));
            }
        }
        let of = |config: Config| runs.iter().filter(move |(c, _)| *c == config).map(|(_, r)| r);
        let untraced = median(of(Config::Untraced).map(|r| r.binds_per_second).collect()).unwrap_or(0.0);
        markdown.push_str(&format!(
            "\n### mode `{mode}`, {} thread(s), {} binds per run ({} under strace/bpftrace), median of {} rounds\n\n",
            args.threads, args.binds, args.slow_binds, args.rounds
        ));
        markdown.push_str("| configuration | binds/s | ratio to untraced | events written / binds made | dropped (tracer's count) | tracer CPU s | tracer peak RSS | exec→attached |\n");
        markdown.push_str("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n");
        let mut mode_json = serde_json::Map::new();
        for &config in &configs {
            let rate = median(of(config).map(|r| r.binds_per_second).collect()).unwrap_or(0.0);
            let ratio = if untraced > 0.0 { rate / untraced } else { 0.0 };
            let runs_of: Vec<&Run> = of(config).collect();
            let balanced = runs_of.iter().all(|r| match (r.events_written, r.dropped, r.filtered) {
                (Some(written), Some(dropped), Some(filtered)) => {
                    written + dropped == r.binds || (written == 0 && filtered >= r.binds)
                }
                _ => true,
            });
            let written = runs_of
                .iter()
                .filter_map(|r| r.events_written.map(|w| format!("{w} / {}", r.binds)))
                .collect::<Vec<_>>()
                .join(", ");
            let dropped: Vec<String> = runs_of.iter().filter_map(|r| r.dropped.map(|d| d.to_string())).collect();
            let cpu = median(runs_of.iter().filter_map(|r| r.tracer_cpu_s).collect());
            let rss = runs_of.iter().filter_map(|r| r.tracer_peak_rss_kb).max();
            let attach = median(runs_of.iter().filter_map(|r| r.attach_ms).collect());
            markdown.push_str(&format!(
                "| {} | {:.0} | {:.2} | {}{} | {} | {} | {} | {} |\n",
                config.label(),
                rate,
                ratio,
                if written.is_empty() { "-".to_owned() } else { written },
                if balanced { "" } else { " **(does not balance)**" },
                if dropped.is_empty() { "-".to_owned() } else { dropped.join(", ") },
                cpu.map_or("-".to_owned(), |c| format!("{c:.2}")),
                rss.map_or("-".to_owned(), |kb| format!("{:.1} MB", kb as f64 / 1024.0)),
                attach.map_or("-".to_owned(), |ms| format!("{ms:.0} ms")),
            ));
            mode_json.insert(
                config.key().to_owned(),
                json!({
                    "label": config.label(),
                    "median_binds_per_second": rate,
                    "ratio_to_untraced": ratio,
                    "runs": runs_of.iter().map(|r| json!({
                        "binds": r.binds,
                        "binds_per_second": r.binds_per_second,
                        "events_written": r.events_written,
                        "dropped": r.dropped,
                        "kernel_filtered": r.filtered,
                        "tracer_cpu_s": r.tracer_cpu_s,
                        "tracer_peak_rss_kb": r.tracer_peak_rss_kb,
                        "attach_ms": r.attach_ms,
                    })).collect::<Vec<_>>(),
                    "events_balance_drop_counter": balanced,
                }),
            );
        }
        results.insert(mode.clone(), Value::Object(mode_json));
    }
    for line in &skipped {
        markdown.push_str(&format!("\nskipped {line}\n"));
    }
    let mut collateral = Value::Null;
    if args.parts.iter().any(|p| p == "collateral") {
        let (table, json) = collateral::collateral(bindtrace, &release_dir.join("syscall-loop"), args.rounds)?;
        markdown.push_str(&table);
        collateral = json;
    }
    let mut tree = Value::Null;
    if args.parts.iter().any(|p| p == "tree") {
        let (table, json) = tree::tree(bindtrace, &release_dir.join("syscall-loop"), args.rounds)?;
        markdown.push_str(&table);
        tree = json;
    }
    let mut storms = Value::Null;
    if args.parts.iter().any(|p| p == "storms") {
        let (table, json) =
            storm::failure_storms(bindtrace, &release_dir.join("fail-storm"), &release_dir.join("ndjson-meter"))?;
        markdown.push_str(&table);
        storms = json;
    }
    let mut hosts = Value::Null;
    if args.parts.iter().any(|p| p == "hosts") {
        let (table, json) = host::hosts(bindtrace)?;
        markdown.push_str(&table);
        hosts = json;
    }
    let mut soak = Value::Null;
    if args.parts.iter().any(|p| p == "soak") {
        let (table, json) = soak::soak(bindtrace, args.soak_seconds, args.soak_stall_seconds)?;
        markdown.push_str(&table);
        soak = json;
    }
    println!("{markdown}");
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let machine = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&json!({
            "machine": machine,
            "skipped": skipped,
            "modes": results,
            "failure_storms": storms,
            "collateral": collateral,
            "tree": tree,
            "hosts": hosts,
            "soak": soak,
        }))?,
    )?;
    eprintln!("xtask: results in {}", args.json.display());
    Ok(())
}
