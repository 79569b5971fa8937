//! `cargo xtask vm`: boots Debian's own kernels under QEMU (TCG: KVM fails on these machines)
//! with an initramfs holding bindtrace, `bind-scenarios` and a busybox init. bindtrace traces
//! the scenarios inside the guest, and the serial console output is checked here, scenario by
//! scenario, the same way `--host` checks a run on this machine.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{
    describe, run,
    setup::{apt_install, output},
    workspace_root,
};

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel series to boot (Debian cloud kernels): 6.1, 6.12, or both.
    #[arg(long, value_delimiter = ',', default_values = DEFAULT_KERNELS)]
    kernels: Vec<String>,
    /// Run the scenarios on this machine instead of in VMs.
    #[arg(long)]
    host: bool,
}

const DEFAULT_KERNELS: [&str; 2] = ["6.1", "6.12"];

impl Default for VmArgs {
    fn default() -> Self {
        Self { kernels: DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect(), host: false }
    }
}

const APT_PACKAGES: [&str; 3] = ["qemu-system-x86", "busybox-static", "cpio"];
/// Every bindtrace backend, each forced with --attach in the guest.
const BACKENDS: [&str; 3] = ["fexit", "kprobe", "tracepoint"];

/// Where downloaded kernels are kept between runs, outside the repository.
fn cache_dir() -> PathBuf {
    let system = PathBuf::from("/var/cache/bindtrace-vm");
    if std::fs::create_dir_all(&system).is_ok() {
        system
    } else {
        workspace_root().join("target/vm/cache")
    }
}

/// Numeric components of a package name, for "newest" comparisons (6.12.117 > 6.12.99).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// The newest `linux-image-<series>...-cloud-amd64-unsigned` package apt knows.
fn newest_kernel_package(series: &str) -> Result<String> {
    let pattern = match series {
        "6.1" => r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        "6.12" => r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        other => bail!("unknown kernel series {other}: use 6.1 or 6.12"),
    };
    let search = || output(Command::new("apt-cache").args(["search", "--names-only", pattern]));
    let mut listing = search()?;
    if listing.trim().is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        listing = search()?;
    }
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|name| version_key(name))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("apt knows no package matching {pattern}"))
}

/// Downloads (once) and unpacks a kernel package; returns its vmlinuz.
fn kernel_image(series: &str) -> Result<PathBuf> {
    let package = newest_kernel_package(series)?;
    let cache = cache_dir();
    let unpacked = cache.join(&package);
    if !unpacked.join("boot").exists() {
        let has_deb = |dir: &Path| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
        };
        let deb = match has_deb(&cache) {
            Some(deb) => deb,
            None => {
                run(Command::new("apt-get").args(["download", &package]).current_dir(&cache))?;
                has_deb(&cache).ok_or_else(|| anyhow!("apt-get download left no {package} .deb"))?
            }
        };
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    std::fs::read_dir(unpacked.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("{package} has no boot/vmlinuz-*"))
}

fn ensure_packages() -> Result<()> {
    apt_install(&APT_PACKAGES.map(str::to_owned))
}

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ip link set lo up
echo "@@BEGIN $(uname -r)"
for backend in $BACKENDS; do
  rm -f /tmp/events.ndjson /tmp/stderr.txt
  /bindtrace --attach "$backend" -o ndjson --file /tmp/events.ndjson 2>/tmp/stderr.txt &
  tracer=$!
  i=0
  while ! grep -q attached /tmp/stderr.txt 2>/dev/null; do
    sleep 0.2; i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $tracer 2>/dev/null; then break; fi
  done
  /bind-scenarios > /tmp/scenarios.ndjson
  # The port of a running `nc -l`, asked for again: EADDRINUSE, seen with the requested port.
  nc -l -p 41100 >/dev/null 2>&1 &
  holder=$!
  sleep 0.5
  nc -l -p 41100 >/dev/null 2>&1
  kill $holder 2>/dev/null
  sleep 1
  kill -INT $tracer 2>/dev/null
  wait $tracer
  echo "@@BACKEND $backend exit=$?"
  echo "@@STDERR"; cat /tmp/stderr.txt
  echo "@@EVENTS"; cat /tmp/events.ndjson
  echo "@@SCENARIOS"; cat /tmp/scenarios.ndjson
done
echo "@@END"
poweroff -f
"#;

/// Copies a dynamically linked binary and the libraries `ldd` names into `root`.
fn install_binary(binary: &Path, root: &Path, name: &str) -> Result<()> {
    std::fs::copy(binary, root.join(name)).with_context(|| format!("copying {}", binary.display()))?;
    let ldd = output(Command::new("ldd").arg(binary)).unwrap_or_default();
    for path in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let target = root.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(path, &target).with_context(|| format!("copying {path}"))?;
    }
    Ok(())
}

fn build_initramfs(bindtrace: &Path, scenarios: &Path) -> Result<PathBuf> {
    let dir = workspace_root().join("target/vm");
    let root = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;
    for applet in ["sh", "mount", "ip", "cat", "sleep", "kill", "grep", "rm", "poweroff", "echo", "uname", "nc"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    install_binary(bindtrace, &root, "bindtrace")?;
    install_binary(scenarios, &root, "bind-scenarios")?;
    let init = INIT.replace("$BACKENDS", &BACKENDS.join(" "));
    std::fs::write(root.join("init"), init)?;
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        image.display()
    )))?;
    Ok(image)
}

fn boot(kernel: &Path, initramfs: &Path) -> Result<String> {
    let mut command = Command::new("timeout");
    command
        .args(["600", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null());
    eprintln!("xtask: $ {}", describe(&command));
    let out = command.output().context("starting qemu-system-x86_64")?;
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

/// One backend's run, cut out of the console output.
struct GuestRun {
    backend: String,
    exit: String,
    stderr: Vec<String>,
    events: Vec<Value>,
    scenarios: Vec<Value>,
}

fn parse_console(console: &str) -> Vec<GuestRun> {
    let mut runs = Vec::new();
    let mut section = "";
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("@@BACKEND ") {
            let mut words = rest.split_whitespace();
            runs.push(GuestRun {
                backend: words.next().unwrap_or("?").to_owned(),
                exit: words.next().unwrap_or("").to_owned(),
                stderr: Vec::new(),
                events: Vec::new(),
                scenarios: Vec::new(),
            });
            section = "";
        } else if let Some(marker) = line.strip_prefix("@@") {
            section = match marker {
                "STDERR" => "stderr",
                "EVENTS" => "events",
                "SCENARIOS" => "scenarios",
                _ => "",
            };
        } else if let Some(current) = runs.last_mut() {
            match section {
                "stderr" => current.stderr.push(line.to_owned()),
                "events" => current.events.extend(serde_json::from_str::<Value>(line).ok()),
                "scenarios" => current.scenarios.extend(serde_json::from_str::<Value>(line).ok()),
                _ => {}
            }
        }
    }
    runs
}

/// Checks every scenario against the last bind event of its pid, port and address.
/// Returns the failures, in words.
pub fn check(scenarios: &[Value], events: &[Value], backend: &str) -> Vec<String> {
    let mut failures = Vec::new();
    if scenarios.is_empty() {
        failures.push("bind-scenarios printed nothing".to_owned());
    }
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap_or("?");
        let Some(event) = events
            .iter()
            .rev()
            .find(|e| e["type"] == "bind" && e["pid"] == s["pid"] && e["port"] == s["port"] && e["addr"] == s["addr"])
        else {
            failures.push(format!("{name}: no event for pid {} {}:{}", s["pid"], s["addr"], s["port"]));
            continue;
        };
        let options: Vec<&str> =
            s["options"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let has = |opt: (i32, i32)| options.contains(&format!("{}:{}", opt.0, opt.1).as_str());
        let mut expect: HashMap<&str, Value> = HashMap::from([
            ("backend", Value::from(backend)),
            ("errno", s["errno"].clone()),
            ("family", s["family"].clone()),
            ("proto", s["proto"].clone()),
            ("reuseaddr", Value::Bool(has((libc::SOL_SOCKET, libc::SO_REUSEADDR)))),
            ("reuseport", Value::Bool(has((libc::SOL_SOCKET, libc::SO_REUSEPORT)))),
            ("freebind", Value::Bool(has((libc::IPPROTO_IP, libc::IP_FREEBIND)))),
            ("transparent", Value::Bool(has((libc::IPPROTO_IP, libc::IP_TRANSPARENT)))),
            ("bind_address_no_port", Value::Bool(has((libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)))),
        ]);
        if s["family"] == "AF_INET6" {
            // The kernel turns IPV6_V6ONLY on when a bind of a specific (not ::, not
            // v4-mapped) IPv6 address succeeds; bindtrace reads the socket after bind().
            let specific = s["addr"].as_str().is_some_and(|a| a != "::" && !a.starts_with("::ffff:"));
            let forced = specific && s["errno"] == 0;
            expect.insert("v6only", Value::Bool(forced || has((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY))));
        }
        let mut fields: Vec<_> = expect.into_iter().collect();
        fields.sort_by_key(|(k, _)| *k);
        for (field, wanted) in fields {
            if event[field] != wanted {
                failures.push(format!("{name}: {field} is {} in the event, expected {wanted}", event[field]));
            }
        }
    }
    failures
}

/// Scenario checks that passed, and what failed, in words.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
}

fn report(label: &str, runs: &[GuestRun], backends: &[&str], tally: &mut Tally) {
    let failures = &mut tally.failures;
    for backend in backends {
        match runs.iter().find(|r| r.backend == *backend) {
            None => {
                tally.failed += 1;
                failures.push(format!("{label} {backend}: the guest printed no result"));
            }
            Some(run) => {
                let mut problems = check(&run.scenarios, &run.events, backend);
                // `nc -l -p 41100` twice: the second one's failure, with its requested port.
                let nc_failure = run.events.iter().any(|e| {
                    e["comm"] == "nc"
                        && e["port"] == 41100
                        && e["errno_name"] == "EADDRINUSE"
                        && e["backend"] == *backend
                });
                if !nc_failure {
                    problems.push("nc_eaddrinuse: no EADDRINUSE event from the second `nc -l -p 41100`".to_owned());
                } else {
                    tally.passed += 1;
                }
                let failing: std::collections::HashSet<&str> =
                    problems.iter().filter_map(|p| p.split(':').next()).collect();
                tally.failed += failing.len();
                tally.passed += run.scenarios.len().saturating_sub(failing.len());
                if run.exit != "exit=0" {
                    problems.push(format!("bindtrace ended with {}; stderr: {:?}", run.exit, run.stderr));
                }
                let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
                eprintln!(
                    "xtask: vm {label} {backend}: {verdict} ({} scenarios, {} events)",
                    run.scenarios.len(),
                    run.events.len()
                );
                failures.extend(problems.into_iter().map(|p| format!("{label} {backend}: {p}")));
            }
        }
    }
}

/// Fields every backend must fill the same way for the same scenario (pids, times and the
/// fd differ between runs or backends by design).
const COMPARED_FIELDS: [&str; 17] = [
    "comm",
    "uid",
    "gid",
    "family",
    "addr",
    "port",
    "proto",
    "ret",
    "errno_name",
    "reuseaddr",
    "reuseport",
    "v6only",
    "freebind",
    "transparent",
    "bind_address_no_port",
    "bound_port",
    "netns",
];

/// The event each scenario produced, per backend, compared field by field across backends.
fn compare_backends(label: &str, runs: &[GuestRun], tally: &mut Tally) {
    let Some(reference) = runs.first() else { return };
    let event_of = |run: &GuestRun, scenario: &Value| -> Option<Value> {
        let name = &scenario["scenario"];
        let mine = run.scenarios.iter().find(|s| s["scenario"] == *name)?;
        run.events
            .iter()
            .rev()
            .find(|e| e["pid"] == mine["pid"] && e["port"] == mine["port"] && e["addr"] == mine["addr"])
            .cloned()
    };
    for scenario in &reference.scenarios {
        let Some(expected) = event_of(reference, scenario) else { continue };
        let mut agree = true;
        for run in &runs[1..] {
            let Some(other) = event_of(run, scenario) else { continue };
            for field in COMPARED_FIELDS {
                if other[field] != expected[field] {
                    agree = false;
                    tally.failures.push(format!(
                        "{label}: {} differs between {} ({}) and {} ({}) on {field}",
                        scenario["scenario"], reference.backend, expected[field], run.backend, other[field]
                    ));
                }
            }
        }
        if agree {
            tally.passed += 1;
        } else {
            tally.failed += 1;
        }
    }
}

pub fn vm(args: &VmArgs, bindtrace: &Path, scenarios: &Path) -> Result<()> {
    let mut tally = Tally::default();
    if args.host {
        run_on_host(bindtrace, scenarios, &mut tally)?;
    } else {
        ensure_packages()?;
        let initramfs = build_initramfs(bindtrace, scenarios)?;
        for series in &args.kernels {
            let kernel = kernel_image(series)?;
            let console = boot(&kernel, &initramfs)?;
            let log = workspace_root().join(format!("target/vm/console-{series}.txt"));
            std::fs::write(&log, &console)?;
            eprintln!("xtask: vm {series}: console in {}", log.display());
            let release = console
                .lines()
                // The firmware's terminal escapes may precede the first line.
                .find_map(|l| l.find("@@BEGIN ").map(|at| l[at + 8..].trim().to_owned()))
                .unwrap_or_else(|| format!("{series} (did not boot)"));
            if !console.contains("@@END") {
                let tail: Vec<&str> = console.lines().rev().take(30).collect();
                tally.failed += 1;
                tally.failures.push(format!("{series}: the guest did not finish; console tail: {:?}", tail));
            }
            let runs = parse_console(&console);
            report(&release, &runs, &BACKENDS, &mut tally);
            compare_backends(&release, &runs, &mut tally);
        }
    }
    for failure in &tally.failures {
        eprintln!("xtask: vm: {failure}");
    }
    // The closing line CI reads: scenario checks across kernels and backends.
    println!("vm: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 && tally.failures.is_empty() {
        Ok(())
    } else {
        bail!("{} scenario check(s) failed", tally.failed.max(1))
    }
}

/// The same scenarios and checks on this machine (tracepoint backend).
fn run_on_host(bindtrace: &Path, scenarios: &Path, tally: &mut Tally) -> Result<()> {
    let dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&dir)?;
    let events_file = dir.join("host-events.ndjson");
    let mut tracer = Command::new(bindtrace)
        .args(["--attach", "tracepoint", "-o", "ndjson", "--file"])
        .arg(&events_file)
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = tracer.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    if !lines.by_ref().map_while(Result::ok).any(|l| l.contains("attached")) {
        bail!("bindtrace did not attach");
    }
    let printed = output(&mut Command::new(scenarios))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let status = tracer.wait()?;
    let events: Vec<Value> =
        std::fs::read_to_string(&events_file)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let scenario_lines: Vec<Value> = printed.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let runs = vec![GuestRun {
        backend: "tracepoint".into(),
        exit: if status.success() { "exit=0".into() } else { format!("exit={status}") },
        stderr: Vec::new(),
        events,
        scenarios: scenario_lines,
    }];
    report("host", &runs, &["tracepoint"], tally);
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scenario() -> Value {
        json!({"scenario":"tcp4_ok","pid":7,"family":"AF_INET","proto":"tcp","addr":"127.0.0.1","port":41001,"errno":0,
               "options":[format!("{}:{}", libc::SOL_SOCKET, libc::SO_REUSEADDR)]})
    }

    fn event(reuseaddr: bool, errno: i32) -> Value {
        json!({"type":"bind","backend":"tracepoint","pid":7,"family":"AF_INET","proto":"tcp","addr":"127.0.0.1","port":41001,"errno":errno,
               "reuseaddr":reuseaddr,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false})
    }

    #[test]
    fn a_matching_event_passes_and_every_difference_is_named() {
        assert!(check(&[scenario()], &[event(true, 0)], "tracepoint").is_empty());
        assert!(check(&[scenario()], &[event(true, 0)], "fexit")[0].contains("backend"));
        let failures = check(&[scenario()], &[event(false, 98)], "tracepoint");
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures.iter().any(|f| f.starts_with("tcp4_ok: errno is 98")));
        assert!(failures.iter().any(|f| f.starts_with("tcp4_ok: reuseaddr is false")));
        assert!(check(&[scenario()], &[], "tracepoint")[0].contains("no event"));
        assert!(!check(&[], &[], "tracepoint").is_empty(), "no scenarios is a failure");
    }

    #[test]
    fn console_sections_are_cut_per_backend() {
        let console = "\x1b[2J@@BEGIN 6.1.0\n@@BACKEND tracepoint exit=0\n@@STDERR\nattached\n@@EVENTS\n{\"type\":\"bind\"}\n@@SCENARIOS\n{\"scenario\":\"x\"}\n@@END\n";
        let runs = parse_console(console);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].backend.as_str(), runs[0].exit.as_str()), ("tracepoint", "exit=0"));
        assert_eq!((runs[0].events.len(), runs[0].scenarios.len(), runs[0].stderr.len()), (1, 1, 1));
        assert_eq!(version_key("linux-image-6.12.117+deb12"), vec![6, 12, 117, 12]);
        assert!(version_key("6.12.117") > version_key("6.12.99"));
    }
}
