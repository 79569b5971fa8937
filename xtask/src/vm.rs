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
    describe,
    dist::{Arch, AARCH64, X86_64},
    run,
    setup::{apt_install, output},
    workspace_root,
};

#[derive(clap::Args, Default)]
pub struct VmArgs {
    /// Kernel series to boot (Debian cloud kernels): 5.10, 6.1, 6.12 [default: every one in
    /// the matrix].
    #[arg(long, value_delimiter = ',')]
    kernels: Vec<String>,
    /// Guest architectures: x86_64, aarch64 [default: both].
    #[arg(long, value_delimiter = ',')]
    arch: Vec<String>,
    /// Run the scenarios on this machine instead of in VMs.
    #[arg(long)]
    host: bool,
    /// Also measure what tracing costs in the newest guest of each architecture (emulated:
    /// indicative only; about a minute a guest, so not part of `cargo xtask test`).
    #[arg(long)]
    costs: bool,
}

impl VmArgs {
    /// The guests of [`MATRIX`] these arguments select.
    fn guests(&self) -> Result<Vec<&'static GuestKernel>> {
        for series in &self.kernels {
            if !MATRIX.iter().any(|g| g.series == *series) {
                bail!("unknown kernel series {series}: the matrix has 5.10, 6.1, 6.1-rt, 6.12 and 6.12-16k");
            }
        }
        let arches = self.arch.iter().map(|a| Arch::by_name(a)).collect::<Result<Vec<_>>>()?;
        Ok(MATRIX
            .iter()
            .filter(|g| self.kernels.is_empty() || self.kernels.iter().any(|k| *k == g.series))
            .filter(|g| arches.is_empty() || arches.contains(&g.arch))
            .collect())
    }

    /// The architectures whose static binaries the selected guests need.
    pub fn arches(&self) -> Result<Vec<Arch>> {
        let mut arches: Vec<Arch> = Vec::new();
        for guest in self.guests()? {
            if !arches.contains(&guest.arch) {
                arches.push(guest.arch);
            }
        }
        Ok(arches)
    }

    pub fn host(&self) -> bool {
        self.host
    }
}

/// One guest of the matrix: a Debian cloud kernel series on one architecture, and the
/// backends that kernel is known not to offer, with the reason. The guest still tries those
/// backends: each must be refused with a one-line error, and `--check` must say no.
pub struct GuestKernel {
    pub arch: Arch,
    pub series: &'static str,
    pub lacks: &'static [(&'static str, &'static str)],
    /// The kernel's page size in KiB: a ring buffer smaller than a page must be refused.
    pub page_kib: u32,
    /// PREEMPT_RT: BPF programs are preemptible, and the fexit and kprobe backends lose binds
    /// under load (each counted as dropped). There their per-thread checks ask "reported or
    /// counted", not "reported", and `--attach auto` takes the tracepoints first.
    pub preempt_rt: bool,
}

/// The series whose guests also measure the emulated costs with `--costs` (one per
/// architecture).
const NEWEST_SERIES: &str = "6.12";

/// The kernels × architectures the matrix boots: README's requirements table is this one.
pub const MATRIX: [GuestKernel; 7] = [
    GuestKernel { arch: X86_64, series: "5.10", lacks: &[], page_kib: 4, preempt_rt: false },
    GuestKernel { arch: X86_64, series: "6.1", lacks: &[], page_kib: 4, preempt_rt: false },
    // PREEMPT_RT: programs are preemptible there, where per-CPU counters and recursion
    // guards break.
    GuestKernel { arch: X86_64, series: "6.1-rt", lacks: &[], page_kib: 4, preempt_rt: true },
    GuestKernel { arch: X86_64, series: "6.12", lacks: &[], page_kib: 4, preempt_rt: false },
    GuestKernel {
        arch: AARCH64,
        series: "6.1",
        lacks: &[("fexit", "Debian's arm64 6.1 has no BPF trampolines (attaching fails with ENOTSUPP, 524)")],
        page_kib: 4,
        preempt_rt: false,
    },
    GuestKernel { arch: AARCH64, series: "6.12", lacks: &[], page_kib: 4, preempt_rt: false },
    // 16K pages: the ring buffer's size is checked against the page size.
    GuestKernel { arch: AARCH64, series: "6.12-16k", lacks: &[], page_kib: 16, preempt_rt: false },
];

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

/// The package-name pattern of a Debian cloud kernel series for one architecture.
fn kernel_package_pattern(series: &str, arch: Arch) -> Result<String> {
    let deb = arch.deb;
    Ok(match series {
        "5.10" => format!(r"^linux-image-5\.10\.0-[0-9]+-cloud-{deb}-unsigned$"),
        "6.1" => format!(r"^linux-image-6\.1\.0-[0-9]+-cloud-{deb}-unsigned$"),
        "6.12" => format!(r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-{deb}-unsigned$"),
        "6.1-rt" => format!(r"^linux-image-6\.1\.0-[0-9]+-rt-{deb}-unsigned$"),
        "6.12-16k" => format!(r"^linux-image-6\.12\.[0-9]+\+deb12-{deb}-16k-unsigned$"),
        other => bail!("unknown kernel series {other}: use 5.10, 6.1, 6.1-rt, 6.12 or 6.12-16k"),
    })
}

/// An apt configuration of bindtrace's own, beside the host's and never touching it: its own
/// state, cache, package list and architecture, with the suites the matrix needs (bookworm
/// for 6.1 and 6.12, bullseye for 5.10) on the mirrors the host's sources already use.
struct PrivateApt {
    dir: PathBuf,
    arch: Arch,
}

/// Debian's archive signing keys, as the debian-archive-keyring package installs them.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

impl PrivateApt {
    fn new(arch: Arch) -> Result<Self> {
        let dir = cache_dir().join(format!("apt-{}", arch.deb));
        for sub in ["state/lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/apt.conf.d"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let (main, security) = host_debian_mirrors()?;
        let line = |uri: &str, suite: &str| format!("deb [signed-by={DEBIAN_KEYRING}] {uri} {suite} main\n");
        let sources = [
            line(&main, "bookworm"),
            line(&main, "bookworm-updates"),
            line(&security, "bookworm-security"),
            line(&main, "bullseye"),
            line(&security, "bullseye-security"),
        ]
        .concat();
        std::fs::write(dir.join("etc/sources.list"), sources)?;
        let apt = Self { dir, arch };
        // Lists fetched within the hour serve (xtask test fetches them ahead of the matrix).
        let fresh = std::fs::metadata(apt.dir.join("state/lists"))
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < std::time::Duration::from_secs(3600)));
        if !fresh {
            run(apt.command("apt-get").args(["update", "-qq"]))?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let dir = self.dir.display();
        for option in [
            format!("Dir::State={dir}/state"),
            format!("Dir::State::status={dir}/state/status"),
            format!("Dir::Cache={dir}/cache"),
            format!("Dir::Etc::SourceList={dir}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={dir}/etc/sources.list.d"),
            format!("Dir::Etc::Parts={dir}/etc/apt.conf.d"),
            format!("APT::Architecture={}", self.arch.deb),
            format!("APT::Architectures={}", self.arch.deb),
        ] {
            command.arg("-o").arg(option);
        }
        command
    }

    /// Packages matching `pattern`, newest first.
    fn packages(&self, pattern: &str) -> Result<Vec<String>> {
        let listing = output(self.command("apt-cache").args(["search", "--names-only", pattern]))?;
        let mut names: Vec<String> =
            listing.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
        names.sort_by_key(|name| std::cmp::Reverse(version_key(name)));
        if names.is_empty() {
            bail!("apt knows no {} package matching {pattern}", self.arch.deb);
        }
        Ok(names)
    }

    /// Downloads (once) and unpacks the newest of `candidates` that the archive serves: the
    /// index may list versions the archive no longer has.
    fn unpack_newest(&self, candidates: &[String]) -> Result<PathBuf> {
        let cache = cache_dir().join(self.arch.deb);
        std::fs::create_dir_all(&cache)?;
        let mut refusals = Vec::new();
        for package in candidates {
            let unpacked = cache.join(package);
            if unpacked.join(".unpacked").exists() {
                return Ok(unpacked);
            }
            let _ = std::fs::remove_dir_all(&unpacked);
            if let Err(err) = run(self.command("apt-get").args(["download", "-qq", package]).current_dir(&cache)) {
                eprintln!("xtask: vm: {package} is listed but did not download; trying the next");
                refusals.push(format!("{package}: {err:#}"));
                continue;
            }
            let deb = std::fs::read_dir(&cache)?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.extension().is_some_and(|e| e == "deb")
                        && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                })
                .ok_or_else(|| anyhow!("apt-get download left no {package} .deb"))?;
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
            std::fs::remove_file(&deb)?;
            std::fs::write(unpacked.join(".unpacked"), "")?;
            return Ok(unpacked);
        }
        bail!("none of the candidate packages downloaded: {}", refusals.join("; "))
    }
}

/// The URIs the host's apt sources use for Debian's main archive and its security archive:
/// the matrix fetches from the same mirrors (and names none itself).
pub(crate) fn host_debian_mirrors() -> Result<(String, String)> {
    let mut pairs = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    files.extend(std::fs::read_dir("/etc/apt/sources.list.d").into_iter().flatten().flatten().map(|e| e.path()));
    for file in files {
        let name = file.to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        if name.ends_with(".sources") {
            pairs.extend(deb822_uri_suites(&text));
        } else if name.ends_with(".list") {
            pairs.extend(one_line_uri_suites(&text));
        }
    }
    mirrors_of(&pairs).ok_or_else(|| {
        anyhow!("the host's apt sources name no Debian archive with a bookworm and a bookworm-security suite")
    })
}

/// (URI, suite) pairs of a deb822 `.sources` file.
fn deb822_uri_suites(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let enabled = !stanza.lines().any(|l| l.trim().eq_ignore_ascii_case("enabled: no"));
        if enabled && field("Types").iter().any(|t| t == "deb") {
            for uri in field("URIs") {
                pairs.extend(field("Suites").into_iter().map(|suite| (uri.clone(), suite)));
            }
        }
    }
    pairs
}

/// (URI, suite) pairs of a one-line-style `.list` file.
fn one_line_uri_suites(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().filter(|w| !w.starts_with('[') && !w.ends_with(']'));
            (words.next()? == "deb").then_some(())?;
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// The main and security archive URIs among the host's (URI, suite) pairs.
fn mirrors_of(pairs: &[(String, String)]) -> Option<(String, String)> {
    let main = pairs.iter().find(|(_, suite)| suite == "bookworm")?.0.clone();
    let security = pairs.iter().find(|(_, suite)| suite == "bookworm-security")?.0.clone();
    Some((main, security))
}

/// What one guest boots: its kernel and its initramfs.
fn guest_kernel(apt: &PrivateApt, guest: &GuestKernel) -> Result<PathBuf> {
    let candidates = apt.packages(&kernel_package_pattern(guest.series, guest.arch)?)?;
    let unpacked = apt.unpack_newest(&candidates)?;
    std::fs::read_dir(unpacked.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("{} has no boot/vmlinuz-*", unpacked.display()))
}

/// A static busybox for the guest's architecture, from Debian's busybox-static.
fn guest_busybox(apt: &PrivateApt) -> Result<PathBuf> {
    let unpacked = apt.unpack_newest(&["busybox-static".to_owned()])?;
    let busybox = unpacked.join("bin/busybox");
    busybox.exists().then_some(busybox).ok_or_else(|| anyhow!("busybox-static has no bin/busybox"))
}

/// The QEMU packages for the guests, and cpio for the initramfs.
pub const APT_PACKAGES: [&str; 3] = ["qemu-system-x86", "qemu-system-arm", "cpio"];

fn ensure_packages() -> Result<()> {
    apt_install(&APT_PACKAGES.map(str::to_owned))
}

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
echo "@@BEGIN $(uname -r) $(uname -m)"
echo "@@CHECK"
/bindtrace --check --verbose
echo "@@CHECK_EXIT $?"
/bindtrace --attach auto --no-diagnosis -d 1s -o ndjson --file /tmp/auto.ndjson 2>/tmp/auto.txt
echo "@@AUTO exit=$?"
cat /tmp/auto.ndjson /tmp/auto.txt
# A ring of 4K: one page on most kernels, less than one on 16K/64K-page kernels, where it
# must be refused with one line and status 2.
/bindtrace --ring-buffer-size 4K --no-diagnosis -d 1s -o none --no-summary 2>/tmp/ring.txt
echo "@@RING4K exit=$?"
cat /tmp/ring.txt
# attach LOG ARGS...: starts bindtrace ARGS in the background with its stderr in LOG, as
# $tracer, and waits until it says it is attached (fails if it ends first, or after 2 min).
attach() {
  log=$1; shift
  rm -f "$log"
  /bindtrace "$@" 2>"$log" &
  tracer=$!
  i=0
  while ! grep -q attached "$log" 2>/dev/null; do
    sleep 0.2; i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $tracer 2>/dev/null; then return 1; fi
  done
}
# counted MARKER MODE: `bind-scenarios MODE` under its own bindtrace ($backend), then what
# `bind-scenarios --count` makes of its events, after @@MARKER.
counted() {
  rm -f /tmp/counted.ndjson
  echo "@@$1"
  if attach /tmp/counted.txt --attach "$backend" $PER_THREAD_TRACER_ARGS --file /tmp/counted.ndjson; then
    /bind-scenarios "$2" > /tmp/counted-plan.json
    sleep 1
    kill -INT $tracer 2>/dev/null
    wait $tracer
    /bind-scenarios --count /tmp/counted-plan.json /tmp/counted.ndjson
    # bindtrace's own words on that run (its warnings), for a failure's console.
    sed 's/^/tracer-stderr: /' /tmp/counted.txt
  else
    kill $tracer 2>/dev/null
    wait $tracer
  fi
}
for backend in $BACKENDS; do
  rm -f /tmp/events.ndjson
  if attach /tmp/stderr.txt --attach "$backend" -o ndjson --file /tmp/events.ndjson; then
    /bind-scenarios > /tmp/scenarios.ndjson
    if [ -x /bind-scenarios-i386 ]; then /bind-scenarios-i386 --compat >> /tmp/scenarios.ndjson; fi
    # The port of a running `nc -l`, asked for again: EADDRINUSE, seen with the requested port.
    nc -l -p 41100 >/dev/null 2>&1 &
    holder=$!
    sleep 0.5
    nc -l -p 41100 >/dev/null 2>&1
    kill $holder 2>/dev/null
    sleep 1
    kill -INT $tracer 2>/dev/null
  else
    # Refused (ended), or not attached after 2 min: nothing to run against it.
    kill $tracer 2>/dev/null
    : > /tmp/scenarios.ndjson
  fi
  wait $tracer
  echo "@@BACKEND $backend exit=$?"
  echo "@@STDERR"; cat /tmp/stderr.txt
  echo "@@EVENTS"; cat /tmp/events.ndjson
  echo "@@SCENARIOS"; cat /tmp/scenarios.ndjson
  # --cgroup in the kernel: a listener inside /bt-scope is reported, one outside is not.
  rm -f /tmp/scope.ndjson
  mkdir -p /sys/fs/cgroup/bt-scope
  attach /tmp/scope.txt --attach "$backend" --no-diagnosis --cgroup /bt-scope -o ndjson --file /tmp/scope.ndjson
  sh -c 'echo $$ > /sys/fs/cgroup/bt-scope/cgroup.procs; exec nc -l -p 41201' >/dev/null 2>&1 &
  inside=$!
  nc -l -p 41202 >/dev/null 2>&1 &
  outside=$!
  sleep 1
  kill $inside $outside 2>/dev/null
  kill -INT $tracer 2>/dev/null
  wait $tracer
  echo "@@SCOPE exit=$?"; cat /tmp/scope.txt /tmp/scope.ndjson
  # -- CMD: the tree's binds (a child, a grandchild, a daemon left behind, an exec chain),
  # and its exit status (3); a bind outside the tree while CMD runs (once CMD says it has
  # started) is not reported. Every wait is bounded.
  rm -f /tmp/tree.ndjson /tmp/daemon-done /tmp/tree-started /tmp/outside-done
  (i=0; while [ ! -e /tmp/tree-started ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
   /bind-scenarios --bind 41301; echo > /tmp/outside-done) &
  /bindtrace --attach "$backend" --no-diagnosis -o ndjson --file /tmp/tree.ndjson -- /bin/sh -c '
    echo > /tmp/tree-started
    i=0; while [ ! -e /tmp/outside-done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    /bind-scenarios --bind 41302
    sh -c "/bind-scenarios --bind 41303"
    sh -c "(sleep 0.2; /bind-scenarios --bind 41304; echo > /tmp/daemon-done) &"
    sh -c "exec sh -c \"exec /bind-scenarios --bind 41305\""
    i=0; while [ ! -e /tmp/daemon-done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    exit 3' 2>/tmp/tree.txt
  echo "@@TREE exit=$?"; cat /tmp/tree.txt /tmp/tree.ndjson
  # Per-thread state, counted here (the events are too many for the console): two threads
  # whose tids once shared an entry slot bind at the same time (every bind reported once);
  # many AF_UNIX binds sleep at once in one directory's lock (each reported, or counted lost
  # when a kretprobe's return instances run out).
  counted COLLISION --collide
  counted SLEEPERS --sleepers
done
# What tracing costs here (emulated: indicative only), when the host asks for it on the kernel
# command line: a getppid loop (collateral) and a bind storm, untraced and with bindtrace
# attached on fexit and kprobe (the hooks the project's host refuses; it measures the
# tracepoint itself), three rounds.
echo "@@COSTS"
grep -q bindtrace.costs /proc/cmdline && for round in 1 2 3; do
  echo "collateral untraced $(/syscall-loop 500000)"
  echo "storm untraced $(/bind-storm --mode ok --binds 20000)"
  for backend in fexit kprobe; do
    if attach /tmp/cost.txt --attach "$backend" --errno EADDRINUSE --no-diagnosis -o none --no-summary; then
      echo "collateral $backend $(/syscall-loop 500000)"
    fi
    kill -INT $tracer 2>/dev/null; wait $tracer
    if attach /tmp/cost.txt --attach "$backend" --comm bind-storm -o ndjson --file /dev/null --no-summary; then
      echo "storm $backend $(/bind-storm --mode ok --binds 20000)"
    fi
    kill -INT $tracer 2>/dev/null; wait $tracer
  done
done
echo "@@END"
poweroff -f
"#;

fn build_initramfs(
    arch: Arch,
    busybox: &Path,
    bindtrace: &Path,
    scenarios: &Path,
    compat: Option<&Path>,
    loads: [&Path; 2],
) -> Result<PathBuf> {
    let dir = workspace_root().join("target/vm");
    let root = dir.join(format!("initramfs-{}", arch.name));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
    for applet in
        ["sh", "mount", "mkdir", "ip", "cat", "sleep", "kill", "grep", "rm", "poweroff", "echo", "uname", "nc"]
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    // Static binaries: nothing else to copy.
    std::fs::copy(bindtrace, root.join("bindtrace")).with_context(|| format!("copying {}", bindtrace.display()))?;
    std::fs::copy(scenarios, root.join("bind-scenarios"))
        .with_context(|| format!("copying {}", scenarios.display()))?;
    if let Some(compat) = compat {
        std::fs::copy(compat, root.join("bind-scenarios-i386"))
            .with_context(|| format!("copying {}", compat.display()))?;
    }
    for (load, name) in loads.into_iter().zip(["syscall-loop", "bind-storm"]) {
        std::fs::copy(load, root.join(name)).with_context(|| format!("copying {}", load.display()))?;
    }
    let init = INIT
        .replace("$BACKENDS", &BACKENDS.join(" "))
        .replace("$PER_THREAD_TRACER_ARGS", &PER_THREAD_TRACER_ARGS.join(" "));
    std::fs::write(root.join("init"), init)?;
    std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join(format!("initramfs-{}.cpio", arch.name));
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        image.display()
    )))?;
    Ok(image)
}

/// `costs`: the guest also measures what tracing costs (see the init), which takes a minute
/// or more under TCG, so only the newest kernel of each architecture does.
fn boot(arch: Arch, kernel: &Path, initramfs: &Path, costs: bool) -> Result<String> {
    let mut command = Command::new("timeout");
    command.arg("900");
    if arch == AARCH64 {
        command.args(["qemu-system-aarch64", "-M", "virt", "-cpu", "max", "-accel", "tcg"]);
    } else {
        command.args(["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]);
    }
    let console = if arch == AARCH64 { "ttyAMA0" } else { "ttyS0" };
    command
        .args(["-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &format!("console={console} quiet panic=-1{}", if costs { " bindtrace.costs" } else { "" })])
        .stdin(Stdio::null());
    eprintln!("xtask: $ {}", describe(&command));
    let out = command.output().context("starting qemu")?;
    Ok(String::from_utf8_lossy(&out.stdout).replace('\r', ""))
}

/// One backend's run, cut out of the console output.
struct GuestRun {
    backend: String,
    exit: String,
    stderr: Vec<String>,
    events: Vec<Value>,
    scenarios: Vec<Value>,
    /// The `--cgroup /bt-scope` run: its exit, and its NDJSON records and stderr lines.
    scope_exit: String,
    scope: Vec<Value>,
    scope_stderr: Vec<String>,
    /// The `-- CMD` run: its exit, and its NDJSON records and stderr lines.
    tree_exit: String,
    tree: Vec<Value>,
    tree_stderr: Vec<String>,
    /// `bind-scenarios --count` of the colliding threads' run, when it ran.
    collision: Option<Value>,
    /// The same for the sleeping binds' run.
    sleepers: Option<Value>,
}

/// What the guest's `bindtrace --check` and `--attach auto` runs said.
#[derive(Default)]
struct GuestChecks {
    check_lines: Vec<String>,
    check_exit: String,
    auto_exit: String,
    /// The backend the auto run's summary names.
    auto_backend: Option<String>,
    auto_output: Vec<String>,
}

impl GuestChecks {
    /// What `--check` said of a backend: `Some(Ok)` yes, `Some(Err(reason))` no.
    fn hook(&self, backend: &str) -> Option<std::result::Result<(), String>> {
        let prefix = format!("hook {backend}: ");
        let answer = self.check_lines.iter().find_map(|l| l.strip_prefix(&prefix))?;
        Some(if answer == "yes" { Ok(()) } else { Err(answer.trim_start_matches("no: ").to_owned()) })
    }
}

fn parse_checks(console: &str) -> GuestChecks {
    let mut checks = GuestChecks::default();
    let mut section = "";
    for line in console.lines() {
        if line == "@@CHECK" {
            section = "check";
        } else if let Some(exit) = line.strip_prefix("@@CHECK_EXIT ") {
            checks.check_exit = exit.trim().to_owned();
            section = "";
        } else if let Some(exit) = line.strip_prefix("@@AUTO ") {
            checks.auto_exit = exit.trim().to_owned();
            section = "auto";
        } else if line.starts_with("@@") {
            if section == "auto" {
                break;
            }
            section = "";
        } else if section == "check" {
            checks.check_lines.push(line.to_owned());
        } else if section == "auto" {
            let summary = serde_json::from_str::<Value>(line).ok().filter(|v| v["type"] == "summary");
            if let Some(backend) = summary.as_ref().and_then(|v| v["backend"].as_str()) {
                checks.auto_backend = Some(backend.to_owned());
            }
            checks.auto_output.push(line.to_owned());
        }
    }
    checks
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
                scope_exit: String::new(),
                scope: Vec::new(),
                scope_stderr: Vec::new(),
                tree_exit: String::new(),
                tree: Vec::new(),
                tree_stderr: Vec::new(),
                collision: None,
                sleepers: None,
            });
            section = "";
        } else if let Some(exit) = line.strip_prefix("@@TREE ") {
            if let Some(current) = runs.last_mut() {
                current.tree_exit = exit.trim().to_owned();
            }
            section = "tree";
        } else if let Some(exit) = line.strip_prefix("@@SCOPE ") {
            if let Some(current) = runs.last_mut() {
                current.scope_exit = exit.trim().to_owned();
            }
            section = "scope";
        } else if let Some(marker) = line.strip_prefix("@@") {
            section = match marker {
                "STDERR" => "stderr",
                "EVENTS" => "events",
                "SCENARIOS" => "scenarios",
                "COLLISION" => "collision",
                "SLEEPERS" => "sleepers",
                _ => "",
            };
        } else if let Some(current) = runs.last_mut() {
            match section {
                "stderr" => current.stderr.push(line.to_owned()),
                "events" => current.events.extend(serde_json::from_str::<Value>(line).ok()),
                "scenarios" => current.scenarios.extend(serde_json::from_str::<Value>(line).ok()),
                "collision" | "sleepers" => {
                    if let Ok(counted) = serde_json::from_str::<Value>(line) {
                        *if section == "collision" { &mut current.collision } else { &mut current.sleepers } =
                            Some(counted);
                    }
                }
                "scope" => match serde_json::from_str::<Value>(line) {
                    Ok(record) => current.scope.push(record),
                    Err(_) => current.scope_stderr.push(line.to_owned()),
                },
                "tree" => match serde_json::from_str::<Value>(line) {
                    Ok(record) => current.tree.push(record),
                    Err(_) => current.tree_stderr.push(line.to_owned()),
                },
                _ => {}
            }
        }
    }
    runs
}

/// Is `event` the one scenario `s` made? Its pid, and the fields of its `match` object (unix
/// names, the caller's errors), or else its port and address.
fn is_event_of(event: &Value, s: &Value) -> bool {
    if event["type"] != "bind" || event["pid"] != s["pid"] {
        return false;
    }
    match s["match"].as_object() {
        Some(fields) => fields.iter().all(|(field, wanted)| event[field] == *wanted),
        None => event["port"] == s["port"] && event["addr"] == s["addr"],
    }
}

/// Checks every scenario against the last bind event of its pid, port and address (or its
/// `match` fields). Returns the failures, in words.
pub fn check(scenarios: &[Value], events: &[Value], backend: &str) -> Vec<String> {
    let mut failures = Vec::new();
    if scenarios.is_empty() {
        failures.push("bind-scenarios printed nothing".to_owned());
    }
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap_or("?");
        if let Some(why) = s["setup_error"].as_str() {
            failures.push(format!("{name}: its setup failed: {why}"));
            continue;
        }
        // A bind some backends cannot see by design (io_uring's, under the syscall
        // tracepoints): under those, seeing it would make the README's table wrong.
        if let Some(seen_by) = s["seen_by"].as_array() {
            if !seen_by.iter().any(|b| b == backend) {
                if events.iter().any(|e| is_event_of(e, s)) {
                    failures.push(format!("{name}: {backend} saw it, but the README says {backend} cannot"));
                }
                continue;
            }
        }
        let Some(event) = events.iter().rev().find(|e| is_event_of(e, s)) else {
            failures.push(format!("{name}: no event for pid {} {}", s["pid"], s.get("match").unwrap_or(&s["port"])));
            continue;
        };
        if let Some(expect) = s["expect"].as_object() {
            let backend_field = ("backend".to_owned(), Value::from(backend));
            for (field, wanted) in expect.iter().chain([(&backend_field.0, &backend_field.1)]) {
                if field == "diagnosis_kind" {
                    // On the event, or in the `diagnosis` record that follows it with its seq.
                    let diagnosis = if event["diagnosis"].is_object() {
                        &event["diagnosis"]
                    } else {
                        events
                            .iter()
                            .find(|e| e["type"] == "diagnosis" && e["seq"] == event["seq"])
                            .map_or(&Value::Null, |record| &record["diagnosis"])
                    };
                    if diagnosis["kind"] != *wanted {
                        failures.push(format!("{name}: the diagnosis is {diagnosis}, expected kind {wanted}"));
                    }
                    continue;
                }
                if event[field] != *wanted {
                    failures.push(format!("{name}: {field} is {} in the event, expected {wanted}", event[field]));
                }
            }
            continue;
        }
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
    /// Guests that failed once and were booted again, with that first failure.
    retried: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.retried.extend(other.retried);
    }
}

/// A backend the kernel is known not to offer must be refused cleanly, and `--check` must
/// say so: reported, never skipped.
fn report_lacking(label: &str, run: Option<&GuestRun>, checks: &GuestChecks, why: &str, tally: &mut Tally) {
    let Some(run) = run else {
        tally.failed += 1;
        tally.failures.push(format!("{label}: the guest printed no result"));
        return;
    };
    let backend = &run.backend;
    let refusal = run.stderr.iter().find(|l| l.starts_with("bindtrace: ")).cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if run.exit == "exit=0" || run.stderr.iter().any(|l| l.contains("attached")) {
        problems.push(format!(
            "{backend} attached, but the matrix says this kernel lacks it ({why}): update vm::MATRIX and the README"
        ));
    }
    if run.stderr.len() != 1 || refusal.is_empty() {
        problems.push(format!("{backend}'s refusal is not one line: {:?}", run.stderr));
    }
    if !matches!(checks.hook(backend), Some(Err(_))) {
        problems.push(format!("--check does not say `hook {backend}: no: ...`"));
    }
    if problems.is_empty() {
        tally.passed += 1;
        eprintln!("xtask: vm {label} {backend}: NOT OFFERED, as expected ({why}); bindtrace said: {refusal}");
    } else {
        tally.failed += 1;
        tally.failures.extend(problems.into_iter().map(|p| format!("{label} {backend}: {p}")));
    }
}

/// `--check` must pass (some hook works) and name every backend; `--attach auto` must take
/// the first of fexit, kprobe, tracepoint that `--check` found working.
fn report_checks(label: &str, checks: &GuestChecks, tally: &mut Tally) {
    let mut problems = Vec::new();
    if checks.check_exit != "0" {
        problems.push(format!("bindtrace --check exited {}: {:?}", checks.check_exit, checks.check_lines));
    }
    // In the order --check says auto tries (the tracepoints first on PREEMPT_RT).
    let order: Vec<&str> = checks
        .check_lines
        .iter()
        .find_map(|l| l.strip_prefix("attach auto tries: "))
        .map(|rest| rest.split(" (").next().unwrap_or(rest).split(", ").collect())
        .unwrap_or_else(|| BACKENDS.to_vec());
    let first_working = order.iter().find(|b| matches!(checks.hook(b), Some(Ok(()))));
    if BACKENDS.iter().any(|b| checks.hook(b).is_none()) {
        problems.push(format!("bindtrace --check does not name every hook: {:?}", checks.check_lines));
    }
    for backend in BACKENDS.iter().filter(|b| matches!(checks.hook(b), Some(Ok(())))) {
        problems.extend(exercise_problem(&checks.check_lines, backend));
    }
    if checks.auto_exit != "exit=0" || checks.auto_backend.as_deref() != first_working.copied() {
        problems.push(format!(
            "--attach auto took {:?} ({}), --check's first working hook is {first_working:?}: {:?}",
            checks.auto_backend, checks.auto_exit, checks.auto_output
        ));
    }
    if problems.is_empty() {
        tally.passed += 1;
        eprintln!("xtask: vm {label}: --check passes; auto attached {}", first_working.unwrap_or(&"?"));
    } else {
        tally.failed += 1;
        tally.failures.extend(problems.into_iter().map(|p| format!("{label}: {p}")));
    }
}

/// `--check --verbose` under a hook that attached: its two test binds were seen and emitted,
/// none lost, its return hooks ran for both (the kernel's own counters), and under kprobe
/// the backstops for skipped kretprobes attached.
fn exercise_problem(lines: &[String], backend: &str) -> Option<String> {
    let prefix = format!("hook {backend} test binds (127.0.0.1:");
    let Some(binds) = lines.iter().find(|l| l.starts_with(&prefix)) else {
        return Some(format!("--check --verbose made no test binds under {backend}: {lines:?}"));
    };
    let number_after = |word: &str| -> Option<u64> {
        binds.split(word).nth(1)?.split_whitespace().next()?.trim_end_matches(';').parse().ok()
    };
    if number_after("saw ").is_none_or(|n| n < 2) || number_after("emitted ").is_none_or(|n| n < 2) {
        return Some(format!("{backend}: the test binds were not both seen and emitted: {binds}"));
    }
    if !binds.ends_with("; 0 lost") {
        return Some(format!("{backend}: test binds lost: {binds}"));
    }
    let program_prefix = format!("hook {backend} program ");
    let return_runs: u64 = lines
        .iter()
        .filter_map(|l| l.strip_prefix(&program_prefix))
        .filter(|l| (l.contains("exit") || l.contains("kretprobe")) && !l.contains("backstop"))
        .filter_map(|l| l.split_once(": ")?.1.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    if return_runs < 2 {
        return Some(format!("{backend}: the return hooks did not run for both test binds: {lines:?}"));
    }
    let backstops = lines.iter().find(|l| l.starts_with("hook kprobe reports bind(2) calls whose kretprobe"));
    (backend == "kprobe" && !backstops.is_some_and(|l| l.ends_with(": yes, from the syscall exit tracepoints")))
        .then(|| format!("kprobe: the backstops for skipped kretprobes did not attach: {backstops:?}"))
}

/// `nc_check`: the guest's init also ran `nc -l` twice (not on the host, which may lack nc).
/// `counted_loss`: backends whose per-thread checks accept a loss that was counted (PREEMPT_RT).
fn report(label: &str, runs: &[GuestRun], backends: &[&str], nc_check: bool, counted_loss: &[&str], tally: &mut Tally) {
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
                if nc_check && !nc_failure {
                    problems.push("nc_eaddrinuse: no EADDRINUSE event from the second `nc -l -p 41100`".to_owned());
                } else if nc_check {
                    tally.passed += 1;
                }
                if nc_check {
                    match tree_problem(run) {
                        Some(problem) => problems.push(format!("process_tree: {problem}")),
                        None => tally.passed += 1,
                    }
                    match scope_problem(run) {
                        Some(problem) => problems.push(format!("cgroup_scope: {problem}")),
                        None => tally.passed += 1,
                    }
                }
                let exact = !counted_loss.contains(backend);
                match collision_problem(run.collision.as_ref(), exact) {
                    Some(problem) => problems.push(format!("tid_slot_collision: {problem}")),
                    None => tally.passed += 1,
                }
                if let Some(sleepers) = &run.sleepers {
                    let reported: u64 =
                        sleepers["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
                    let kernel = &sleepers["summary"]["kernel"];
                    eprintln!(
                        "xtask: vm {label} {backend}: sleeping binds: {reported} reported, {} backstopped, {} dropped",
                        kernel["returns_backstopped"], sleepers["summary"]["dropped"]
                    );
                }
                match sleepers_problem(run.sleepers.as_ref(), exact) {
                    Some(problem) => problems.push(format!("sleeping_binds: {problem}")),
                    None => tally.passed += 1,
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

/// The `--cgroup` run: the listener in the cgroup is reported, the one outside is not (the
/// kernel dropped it), and bindtrace ended cleanly.
fn scope_problem(run: &GuestRun) -> Option<String> {
    let binds: Vec<&Value> = run.scope.iter().filter(|r| r["type"] == "bind").collect();
    if run.scope_exit != "exit=0" {
        return Some(format!("bindtrace --cgroup ended with {}: {:?}", run.scope_exit, run.scope_stderr));
    }
    if !binds.iter().any(|b| b["port"] == 41201 && b["ok"] == true) {
        return Some(format!("no event for the listener inside the cgroup: {binds:?}"));
    }
    if binds.iter().any(|b| b["port"] == 41202) {
        return Some(format!("the listener outside the cgroup was reported: {binds:?}"));
    }
    None
}

/// The `-- CMD` run: bindtrace exits with CMD's status (3); each bind of the tree is reported
/// with its depth (the daemon's after its parent exited), the one outside it is not (the
/// kernel dropped it), and the summary names the command's end.
fn tree_problem(run: &GuestRun) -> Option<String> {
    if run.tree_exit != "exit=3" {
        return Some(format!("bindtrace -- CMD ended with {} (CMD exits 3): {:?}", run.tree_exit, run.tree_stderr));
    }
    let binds: Vec<&Value> = run.tree.iter().filter(|r| r["type"] == "bind").collect();
    // (port, depths it may have): sh -c runs its last command by exec on some shells.
    let expected: [(u64, &[u64]); 4] = [(41302, &[1]), (41303, &[1, 2]), (41304, &[2, 3]), (41305, &[1])];
    for (port, depths) in expected {
        let Some(bind) = binds.iter().find(|b| b["port"] == port) else {
            return Some(format!("no event for the tree's bind of port {port}: {binds:?}"));
        };
        if bind["ok"] != true || !bind["depth"].as_u64().is_some_and(|d| depths.contains(&d)) || !bind["ppid"].is_u64()
        {
            return Some(format!("the bind of port {port} should be ok at depth {depths:?} with its ppid: {bind}"));
        }
    }
    if binds.iter().any(|b| b["port"] == 41301) {
        return Some(format!("a bind outside the tree was reported: {binds:?}"));
    }
    let summary = run.tree.iter().find(|r| r["type"] == "summary");
    // The bind outside ran while CMD did: the probe saw it and its filter dropped it.
    if summary.and_then(|s| s["kernel"]["filtered"].as_u64()).is_none_or(|f| f == 0) {
        return Some(format!(
            "the kernel filtered no bind: the one outside the tree was not made meanwhile: {summary:?}"
        ));
    }
    match summary.map(|s| &s["tree"]) {
        Some(tree) if tree["exit_status"] == 3 => None,
        other => Some(format!("the summary does not give CMD's exit status 3: {other:?}")),
    }
}

/// What `bind-scenarios --count` printed: the count, the binds each thread made, and the
/// threads; or what is wrong with it.
fn counted_plan(counted: Option<&Value>) -> std::result::Result<(&Value, u64, &[Value]), String> {
    let counted = counted.ok_or("no count printed")?;
    let plan = &counted["plan"];
    if let Some(why) = plan["setup_error"].as_str() {
        return Err(format!("its setup failed: {why}"));
    }
    let binds = plan["binds_each"].as_u64().unwrap_or(0);
    let threads = plan["threads"].as_array().map_or(&[][..], Vec::as_slice);
    if binds == 0 || threads.is_empty() {
        return Err(format!("no plan: {counted}"));
    }
    Ok((counted, binds, threads))
}

/// Two threads whose tids once shared an entry slot made N binds each at the same time: each
/// bind is reported exactly once (no loss, no duplicate); or, not `exact`, no bind is reported
/// twice and every one not reported is counted in the summary's `dropped` (which may count
/// more: a skipped inet_bind hook inside bind(2) is counted though it would have stood aside).
fn collision_problem(counted: Option<&Value>, exact: bool) -> Option<String> {
    let (counted, binds, threads) = match counted_plan(counted) {
        Ok(plan) => plan,
        Err(problem) => return Some(problem),
    };
    if threads.len() != 2 {
        return Some(format!("not two threads: {counted}"));
    }
    let kernel = &counted["summary"]["kernel"];
    let events: Vec<u64> = counted["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    if !exact {
        let reported: u64 = events.iter().sum();
        let dropped = counted["summary"]["dropped"].as_u64().unwrap_or(0);
        let twice = events.iter().any(|&e| e > binds);
        return (twice || reported + dropped < binds * threads.len() as u64).then(|| {
            format!("events {events:?} for {binds} binds each, {dropped} counted lost; kernel counters {kernel}")
        });
    }
    let wrong: Vec<String> = threads
        .iter()
        .zip(counted["events"].as_array().into_iter().flatten())
        .filter(|(_, events)| events.as_u64() != Some(binds))
        .map(|(thread, events)| format!("tid {} had {events} events for {binds} binds", thread["tid"]))
        .collect();
    (!wrong.is_empty()).then(|| {
        format!("{}; summary dropped {}, kernel counters {kernel}", wrong.join(", "), counted["summary"]["dropped"])
    })
}

/// Many binds sleeping at once: every one reported (the kprobe backend's kretprobes run out
/// of return instances here: its syscall-exit backstops must report what they skip); not
/// `exact` (PREEMPT_RT, where preempted programs are skipped), each reported or counted lost,
/// never both: reported <= made <= reported + the summary's `dropped` (which may count more:
/// a skipped inet_bind hook is counted though it would have stood aside).
fn sleepers_problem(counted: Option<&Value>, exact: bool) -> Option<String> {
    let (counted, binds, threads) = match counted_plan(counted) {
        Ok(plan) => plan,
        Err(problem) => return Some(problem),
    };
    let threads = threads.len() as u64;
    let reported: u64 = counted["events"].as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
    let kernel = &counted["summary"]["kernel"];
    let dropped = counted["summary"]["dropped"].as_u64().unwrap_or(0);
    let made = binds * threads;
    let wrong = if exact { reported != made || dropped != 0 } else { reported > made || reported + dropped < made };
    wrong
        .then(|| format!("{reported} reported ({dropped} counted lost) of {made} binds made; kernel counters {kernel}"))
}

/// `--ring-buffer-size 4K`: accepted where a page is 4K, refused with one line naming the
/// page size (exit 2) where it is larger.
fn ring_problem(console: &str, page_kib: u32) -> Option<String> {
    let mut lines = console.lines().skip_while(|l| !l.starts_with("@@RING4K "));
    let exit = lines.next()?.trim_start_matches("@@RING4K ").trim().to_owned();
    let said: Vec<&str> = lines.take_while(|l| !l.starts_with("@@")).collect();
    let wanted = if page_kib > 4 { "exit=2" } else { "exit=0" };
    if exit != wanted {
        return Some(format!("ended with {exit}, expected {wanted} ({page_kib}K pages): {said:?}"));
    }
    let names_page = said.len() == 1 && said[0].contains(&format!("page size ({page_kib}K)"));
    (page_kib > 4 && !names_page).then(|| format!("the refusal is not one line naming the page size: {said:?}"))
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
        run.events.iter().rev().find(|e| is_event_of(e, mine)).cloned()
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

/// The static binaries the guests of one architecture run.
pub struct GuestBinaries {
    pub arch: Arch,
    pub bindtrace: PathBuf,
    pub scenarios: PathBuf,
    /// The loads of `cargo xtask bench`, for the emulated cost figures.
    pub syscall_loop: PathBuf,
    pub bind_storm: PathBuf,
    /// A 32-bit build of the scenarios (x86_64 guests), run with `--compat`.
    pub compat_scenarios: Option<PathBuf>,
}

/// Downloads what the selected guests boot (QEMU, their kernels, the guest busybox) ahead of
/// [`vm`], which then finds them in the cache.
pub fn prefetch(args: &VmArgs) -> Result<()> {
    ensure_packages()?;
    for arch in args.arches()? {
        let apt = PrivateApt::new(arch)?;
        guest_busybox(&apt)?;
        for guest in args.guests()?.into_iter().filter(|g| g.arch == arch) {
            guest_kernel(&apt, guest)?;
        }
    }
    Ok(())
}

/// Boots every selected guest and checks it; `binaries` has one entry per architecture.
pub fn vm(args: &VmArgs, binaries: &[GuestBinaries]) -> Result<()> {
    let mut tally = Tally::default();
    let mut costs = Vec::new();
    ensure_packages()?;
    let started = std::time::Instant::now();
    for arch in args.arches()? {
        let bin = binaries
            .iter()
            .find(|b| b.arch == arch)
            .ok_or_else(|| anyhow!("no {} binaries for the guests", arch.name))?;
        let apt = PrivateApt::new(arch)?;
        let initramfs = build_initramfs(
            arch,
            &guest_busybox(&apt)?,
            &bin.bindtrace,
            &bin.scenarios,
            bin.compat_scenarios.as_deref(),
            [&bin.syscall_loop, &bin.bind_storm],
        )?;
        for guest in args.guests()?.into_iter().filter(|g| g.arch == arch) {
            let measures_costs = args.costs && guest.series == NEWEST_SERIES;
            let mut first = Tally::default();
            let measured = run_guest(&apt, guest, &initramfs, measures_costs, &mut first)?;
            if first.failed == 0 && first.failures.is_empty() {
                costs.extend(measured);
                tally.add(first);
                continue;
            }
            // An emulated guest is booted once more after a failure: the matrix then fails
            // only on a failure that comes back, and the first one stays in the log (and in
            // `retried`) to be looked into, never dropped.
            let name = format!("{}-{}", guest.arch.name, guest.series);
            eprintln!("xtask: vm {name}: failed ({}); booting it once more", first.failures.join("; "));
            tally.retried.push(format!("{name}: {}", first.failures.join("; ")));
            let mut second = Tally::default();
            costs.extend(run_guest(&apt, guest, &initramfs, measures_costs, &mut second)?);
            tally.add(second);
        }
    }
    if args.costs {
        report_costs(&costs)?;
    }
    for failure in &tally.failures {
        eprintln!("xtask: vm: {failure}");
    }
    for retried in &tally.retried {
        eprintln!("xtask: vm: failed on a first boot (passed or failed again above): {retried}");
    }
    eprintln!("xtask: vm: the matrix took {:.0?}", started.elapsed());
    finish(&tally)
}

/// The closing line CI reads: scenario checks across kernels, architectures and backends.
fn finish(tally: &Tally) -> Result<()> {
    println!("vm: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 && tally.failures.is_empty() {
        Ok(())
    } else {
        bail!("{} scenario check(s) failed", tally.failed.max(1))
    }
}

fn run_guest(
    apt: &PrivateApt,
    guest: &GuestKernel,
    initramfs: &Path,
    measures_costs: bool,
    tally: &mut Tally,
) -> Result<Vec<Cost>> {
    let name = format!("{}-{}", guest.arch.name, guest.series);
    let kernel = guest_kernel(apt, guest)?;
    let booted = std::time::Instant::now();
    let mut console = boot(guest.arch, &kernel, initramfs, measures_costs)?;
    if !console.contains("@@BEGIN ") {
        // The kernel never reached the init (a TCG boot once panicked in an interrupt before
        // it): nothing of bindtrace ran, so the guest is booted once more, and says so.
        eprintln!("xtask: vm {name}: the kernel did not reach the init; booting it once more");
        console = boot(guest.arch, &kernel, initramfs, measures_costs)?;
    }
    let log = workspace_root().join(format!("target/vm/console-{name}.txt"));
    std::fs::write(&log, &console)?;
    eprintln!("xtask: vm {name}: {:.0?}, console in {}", booted.elapsed(), log.display());
    let release = console
        .lines()
        // The firmware's terminal escapes may precede the first line.
        .find_map(|l| l.find("@@BEGIN ").map(|at| l[at + 8..].trim().to_owned()))
        .unwrap_or_else(|| format!("{name} (did not boot)"));
    if !console.contains("@@END") {
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        tally.failed += 1;
        tally.failures.push(format!("{name}: the guest did not finish; console tail: {:?}", tail));
    }
    let checks = parse_checks(&console);
    report_checks(&release, &checks, tally);
    match ring_problem(&console, guest.page_kib) {
        Some(problem) => {
            tally.failed += 1;
            tally.failures.push(format!("{release}: ring_4k: {problem}"));
        }
        None => tally.passed += 1,
    }
    let runs = parse_console(&console);
    let lacking = |backend: &str| guest.lacks.iter().find(|(b, _)| *b == backend).map(|(_, why)| *why);
    for backend in BACKENDS {
        if let Some(why) = lacking(backend) {
            report_lacking(&release, runs.iter().find(|r| r.backend == backend), &checks, why, tally);
        }
    }
    let offered: Vec<&str> = BACKENDS.into_iter().filter(|b| lacking(b).is_none()).collect();
    let counted_loss: &[&str] = if guest.preempt_rt { &["fexit", "kprobe"] } else { &[] };
    report(&release, &runs, &offered, true, counted_loss, tally);
    let compared: Vec<GuestRun> = runs.into_iter().filter(|r| offered.contains(&r.backend.as_str())).collect();
    compare_backends(&release, &compared, tally);
    let costs = parse_costs(&release, &console);
    if measures_costs && costs.is_empty() {
        tally.failed += 1;
        tally.failures.push(format!("{release}: the guest measured no costs"));
    }
    Ok(costs)
}

/// One measurement of the guest's cost section: `collateral|storm CONFIG {json}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    kernel: String,
    load: String,
    config: String,
    per_second: f64,
}

fn parse_costs(kernel: &str, console: &str) -> Vec<Cost> {
    let Some((_, section)) = console.split_once("@@COSTS") else { return Vec::new() };
    section
        .lines()
        .take_while(|l| !l.starts_with("@@END"))
        .filter_map(|line| {
            let mut words = line.splitn(3, ' ');
            let (load, config, json) = (words.next()?, words.next()?, words.next()?);
            let value: Value = serde_json::from_str(json).ok()?;
            let per_second = value["calls_per_second"].as_f64().or_else(|| value["binds_per_second"].as_f64())?;
            Some(Cost { kernel: kernel.to_owned(), load: load.to_owned(), config: config.to_owned(), per_second })
        })
        .collect()
}

/// The emulated cost table (medians per kernel, load and configuration, as ratios to the
/// untraced run): printed and written to target/vm/costs.json. Indicative only: TCG
/// emulates the CPU, so the ratios, not the rates, are what to read.
fn report_costs(costs: &[Cost]) -> Result<()> {
    let mut keys: Vec<(String, String, String)> =
        costs.iter().map(|c| (c.kernel.clone(), c.load.clone(), c.config.clone())).collect();
    keys.sort();
    keys.dedup();
    let median = |kernel: &str, load: &str, config: &str| {
        let mut values: Vec<f64> = costs
            .iter()
            .filter(|c| c.kernel == kernel && c.load == load && c.config == config)
            .map(|c| c.per_second)
            .collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let mut table = String::from(
        "\n### emulated (QEMU TCG, indicative only): ratio to untraced, median of 3 rounds\n\n| kernel | load | backend | per second | ratio |\n| --- | --- | --- | ---: | ---: |\n",
    );
    let mut rows = Vec::new();
    for (kernel, load, config) in keys.iter().filter(|(_, _, c)| c != "untraced") {
        let (Some(rate), Some(base)) = (median(kernel, load, config), median(kernel, load, "untraced")) else {
            continue;
        };
        table.push_str(&format!("| {kernel} | {load} | {config} | {rate:.0} | {:.2} |\n", rate / base));
        rows.push(serde_json::json!({"kernel": kernel, "load": load, "backend": config, "per_second": rate, "untraced": base, "ratio": rate / base}));
    }
    println!("{table}");
    let path = workspace_root().join("target/vm/costs.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("xtask: vm: emulated costs in {}", path.display());
    Ok(())
}

/// The same scenarios and checks on this machine (tracepoint backend).
fn run_on_host(bindtrace: &Path, scenarios: &Path, tally: &mut Tally) -> Result<()> {
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
        stderr: Vec::new(),
        events,
        scenarios: scenario_lines,
        scope_exit: String::new(),
        scope: Vec::new(),
        scope_stderr: Vec::new(),
        tree_exit: String::new(),
        tree: Vec::new(),
        tree_stderr: Vec::new(),
        collision: serde_json::from_str(counted.trim()).ok(),
        sleepers: serde_json::from_str(sleepers.trim()).ok(),
    }];
    report("host", &runs, &["tracepoint"], false, &[], tally);
    Ok(())
}

/// Starts `bindtrace --attach tracepoint ARGS --file FILE` and waits until it says it is
/// attached.
fn start_attached(bindtrace: &Path, args: &[&str], file: &Path) -> Result<std::process::Child> {
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
fn traced_on_host(bindtrace: &Path, scenarios: &Path, dir: &Path, mode: &str) -> Result<String> {
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

/// How the colliding threads are traced, here and in the guests.
const PER_THREAD_TRACER_ARGS: [&str; 7] =
    ["--no-diagnosis", "--comm", "bind-scenarios", "--ring-buffer-size", "16M", "-o", "ndjson"];

/// `cargo xtask vm --host`: the scenarios traced on this machine (tracepoint backend).
pub fn vm_on_host(bindtrace: &Path, scenarios: &Path) -> Result<()> {
    let mut tally = Tally::default();
    run_on_host(bindtrace, scenarios, &mut tally)?;
    for failure in &tally.failures {
        eprintln!("xtask: vm: {failure}");
    }
    finish(&tally)
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
    fn check_verbose_must_show_the_test_binds_and_the_backstops() {
        let lines = |saw: u64, exit_runs: u64, backstops: &str| -> Vec<String> {
            [
                format!("hook kprobe reports bind(2) calls whose kretprobe the kernel skips (many sleeping at once): {backstops}"),
                format!("hook kprobe test binds (127.0.0.1:5000 twice, the second refused): the probe saw {saw} bind exits and emitted {saw} (binds elsewhere on this machine meanwhile count too); 0 lost"),
                format!("hook kprobe program bindtrace_kretprobe_sys_bind: {exit_runs} runs, 900 ns in all, 0 recursion misses, 100 instructions verified"),
                "hook kprobe program bindtrace_sys_exit_bind_backstop: 2 runs, 90 ns in all, 0 recursion misses, 10 instructions verified".to_owned(),
            ]
            .to_vec()
        };
        let yes = "yes, from the syscall exit tracepoints";
        assert_eq!(exercise_problem(&lines(2, 2, yes), "kprobe"), None);
        assert!(exercise_problem(&lines(1, 2, yes), "kprobe").is_some(), "one test bind unseen");
        assert!(exercise_problem(&lines(2, 0, yes), "kprobe").is_some(), "the backstop's runs are not the kretprobe's");
        assert!(exercise_problem(&lines(2, 2, "no, they are counted as dropped: x"), "kprobe").is_some());
        assert!(exercise_problem(&lines(2, 2, yes), "fexit").is_some(), "no test binds under fexit");
    }

    #[test]
    fn sleeping_binds_must_be_reported() {
        let counted = |events: [u64; 2], missed: u64| {
            json!({"plan": {"binds_each": 10, "threads": [{"tid": 1, "family": "AF_UNIX"}, {"tid": 2, "family": "AF_UNIX"}]},
                   "events": events, "summary": {"dropped": missed, "kernel": {"dropped_return_missed": missed}}})
        };
        assert_eq!(sleepers_problem(Some(&counted([10, 10], 0)), true), None);
        let counted_only = sleepers_problem(Some(&counted([7, 10], 3)), true).expect("lost, even counted, fails");
        assert!(counted_only.contains("17 reported (3 counted lost) of 20 binds made"), "{counted_only}");
        assert!(sleepers_problem(Some(&counted([7, 10], 0)), true).is_some(), "a silent loss fails");
        assert!(sleepers_problem(Some(&counted([10, 10], 2)), true).is_some(), "counted but reported fails");
        assert_eq!(sleepers_problem(Some(&counted([7, 10], 3)), false), None, "PREEMPT_RT: lost, but counted");
        assert_eq!(sleepers_problem(Some(&counted([7, 10], 5)), false), None, "PREEMPT_RT: over-counted passes");
        assert!(sleepers_problem(Some(&counted([7, 10], 0)), false).is_some(), "PREEMPT_RT: a silent loss fails");
        assert!(sleepers_problem(Some(&counted([11, 10], 0)), false).is_some(), "PREEMPT_RT: reported twice fails");
    }

    #[test]
    fn a_ring_smaller_than_a_page_must_be_refused_in_one_line() {
        let refused = "@@RING4K exit=2\nbindtrace: ring buffer size 4K is smaller than this kernel's page size (16K): use 16K or more\n@@BACKEND fexit exit=0\n";
        assert_eq!(ring_problem(refused, 16), None);
        assert!(ring_problem(refused, 4).is_some(), "4K pages take a 4K ring");
        assert_eq!(ring_problem("@@RING4K exit=0\n@@BACKEND fexit exit=0\n", 4), None);
        assert!(ring_problem("@@RING4K exit=1\nbindtrace: EINVAL\n", 16).is_some(), "a bare EINVAL fails");
    }

    #[test]
    fn a_collision_must_report_every_bind_once() {
        let counted = |a: u64, b: u64| {
            json!({"plan": {"binds_each": 10, "threads": [{"tid": 1000, "port": 1}, {"tid": 17384, "port": 2}]},
                   "events": [a, b], "summary": {"dropped": 0, "kernel": {}}})
        };
        assert_eq!(collision_problem(Some(&counted(10, 10)), true), None);
        let lost = collision_problem(Some(&counted(7, 10)), true).expect("a loss fails");
        assert!(lost.contains("tid 1000 had 7 events for 10 binds"), "{lost}");
        assert!(collision_problem(Some(&counted(10, 12)), true).is_some(), "a duplicate fails");
        assert!(collision_problem(None, true).is_some(), "no count fails");
        let setup = json!({"plan": {"scenario": "tid_slot_collision", "setup_error": "no root"}});
        assert!(collision_problem(Some(&setup), true).is_some_and(|p| p.contains("no root")));
        // PREEMPT_RT: a loss passes only when counted.
        let mut counted_loss = counted(7, 10);
        counted_loss["summary"]["dropped"] = json!(3);
        assert_eq!(collision_problem(Some(&counted_loss), false), None);
        assert!(collision_problem(Some(&counted(7, 10)), false).is_some(), "a silent loss fails");
        assert!(collision_problem(Some(&counted(10, 12)), false).is_some(), "a duplicate fails");
    }

    #[test]
    fn the_hosts_debian_mirrors_are_read_from_either_sources_format() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let pairs = deb822_uri_suites(deb822);
        assert_eq!(pairs.len(), 3);
        assert_eq!(
            mirrors_of(&pairs),
            Some(("http://mirror.example/debian".to_owned(), "http://mirror.example/debian-security".to_owned()))
        );
        let list = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\ndeb http://m.example/sec bookworm-security main\n";
        let pairs = one_line_uri_suites(list);
        assert_eq!(mirrors_of(&pairs), Some(("http://m.example/debian".to_owned(), "http://m.example/sec".to_owned())));
        assert_eq!(mirrors_of(&pairs[..1]), None, "no security archive");
        let disabled = "Types: deb\nURIs: http://x/debian\nSuites: bookworm\nEnabled: no\n";
        assert!(deb822_uri_suites(disabled).is_empty());
    }

    #[test]
    fn check_and_auto_sections_are_read() {
        let exercised = |backend: &str, exit: &str| {
            format!(
                "hook {backend} test binds (127.0.0.1:5000 twice, the second refused): the probe saw 2 bind exits and emitted 2 (binds elsewhere on this machine meanwhile count too); 0 lost\n\
                 hook {backend} program {exit}: 2 runs, 900 ns in all (450 ns a run), 0 recursion misses, 100 instructions verified\n"
            )
        };
        let console = format!(
            "@@BEGIN 6.1.0-56-cloud-arm64 aarch64\n@@CHECK\nkernel: 6.1\nhook fexit: no: attaching fexit to inet_bind failed\nhook kprobe: yes\n\
             hook kprobe reports bind(2) calls whose kretprobe the kernel skips (many sleeping at once): yes, from the syscall exit tracepoints\n{}\
             hook tracepoint: yes\n{}@@CHECK_EXIT 0\n@@AUTO exit=0\n{{\"type\":\"summary\",\"backend\":\"kprobe\"}}\n@@BACKEND fexit exit=1\n",
            exercised("kprobe", "bindtrace_kretprobe_sys_bind"),
            exercised("tracepoint", "bindtrace_sys_exit_bind")
        );
        let checks = parse_checks(&console);
        assert_eq!(checks.check_exit, "0");
        assert_eq!(checks.hook("fexit"), Some(Err("attaching fexit to inet_bind failed".to_owned())));
        assert_eq!(checks.hook("kprobe"), Some(Ok(())));
        assert_eq!(checks.auto_backend.as_deref(), Some("kprobe"));
        let mut tally = Tally::default();
        report_checks("arm64 6.1", &checks, &mut tally);
        assert_eq!((tally.passed, tally.failed), (1, 0), "{:?}", tally.failures);
    }

    #[test]
    fn backends_are_compared_on_bind_events_not_on_diagnosis_records() {
        let run = |backend: &str, with_follow_up: bool| {
            let mut events = vec![event(true, 0)];
            if with_follow_up {
                events.push(json!({"type":"diagnosis","seq":1,"pid":7,"addr":"127.0.0.1","port":41001}));
            }
            GuestRun {
                backend: backend.into(),
                exit: "exit=0".into(),
                stderr: Vec::new(),
                events,
                scenarios: vec![scenario()],
                scope_exit: String::new(),
                scope: Vec::new(),
                scope_stderr: Vec::new(),
                tree_exit: String::new(),
                tree: Vec::new(),
                tree_stderr: Vec::new(),
                collision: None,
                sleepers: None,
            }
        };
        let mut tally = Tally::default();
        compare_backends("test", &[run("fexit", false), run("kprobe", true)], &mut tally);
        assert_eq!((tally.passed, tally.failed), (1, 0), "{:?}", tally.failures);
    }

    #[test]
    fn the_matrix_covers_both_arches_and_every_series() {
        let args = VmArgs::default();
        assert_eq!(args.guests().expect("guests").len(), MATRIX.len());
        assert_eq!(args.arches().expect("arches"), vec![X86_64, AARCH64]);
        let only = VmArgs { kernels: vec!["5.10".into()], ..Default::default() };
        assert_eq!(only.arches().expect("arches"), vec![X86_64]);
        assert!(VmArgs { kernels: vec!["4.19".into()], ..Default::default() }.guests().is_err());
    }

    #[test]
    fn the_cost_section_is_read() {
        let console =
            "@@BACKEND kprobe exit=0\n@@COSTS\ncollateral untraced {\"calls\":100,\"calls_per_second\":1000.0}\n\
                       storm kprobe {\"binds\":10,\"binds_per_second\":50.5}\nnoise\n@@END\n";
        let costs = parse_costs("6.1", console);
        assert_eq!(costs.len(), 2);
        assert_eq!(
            (costs[0].load.as_str(), costs[0].config.as_str(), costs[0].per_second),
            ("collateral", "untraced", 1000.0)
        );
        assert_eq!((costs[1].load.as_str(), costs[1].config.as_str(), costs[1].per_second), ("storm", "kprobe", 50.5));
        assert!(parse_costs("6.1", "@@BACKEND kprobe exit=0\n@@END\n").is_empty());
    }

    #[test]
    fn console_sections_are_cut_per_backend() {
        let console = "\x1b[2J@@BEGIN 6.1.0\n@@BACKEND tracepoint exit=0\n@@STDERR\nattached\n@@EVENTS\n{\"type\":\"bind\"}\n@@SCENARIOS\n{\"scenario\":\"x\"}\n@@END\n";
        let runs = parse_console(console);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].backend.as_str(), runs[0].exit.as_str()), ("tracepoint", "exit=0"));
        assert_eq!((runs[0].events.len(), runs[0].scenarios.len(), runs[0].stderr.len()), (1, 1, 1));
        assert!(scope_problem(&runs[0]).is_some(), "no --cgroup run is a failure");
        let scoped = |ports: &str| {
            let console = format!(
                "@@BACKEND kprobe exit=0\n@@SCENARIOS\n@@SCOPE exit=0\nbindtrace: attached (kprobe)\n{ports}@@END\n"
            );
            parse_console(&console).remove(0)
        };
        let inside = "{\"type\":\"bind\",\"port\":41201,\"ok\":true}\n";
        let outside = "{\"type\":\"bind\",\"port\":41202,\"ok\":true}\n";
        let run = scoped(inside);
        assert_eq!((run.scope_exit.as_str(), run.scope.len(), run.scope_stderr.len()), ("exit=0", 1, 1));
        assert_eq!(scope_problem(&run), None);
        assert!(scope_problem(&scoped(&format!("{inside}{outside}"))).is_some_and(|p| p.contains("outside")));
        assert!(scope_problem(&scoped("")).is_some_and(|p| p.contains("inside")));
        let tree = |exit: &str, records: &str| {
            let console =
                format!("@@BACKEND kprobe exit=0\n@@TREE exit={exit}\nbindtrace: attached (kprobe)\n{records}@@END\n");
            parse_console(&console).remove(0)
        };
        let bind = |port: u32, depth: u32| {
            format!("{{\"type\":\"bind\",\"port\":{port},\"ok\":true,\"ppid\":7,\"depth\":{depth}}}\n")
        };
        let all = [bind(41302, 1), bind(41303, 2), bind(41304, 3), bind(41305, 1)].concat();
        let summary = "{\"type\":\"summary\",\"kernel\":{\"filtered\":1},\"tree\":{\"exit_status\":3}}\n";
        assert_eq!(tree_problem(&tree("3", &format!("{all}{summary}"))), None);
        assert!(tree_problem(&tree("0", &format!("{all}{summary}"))).is_some_and(|p| p.contains("exits 3")));
        assert!(tree_problem(&tree("3", &format!("{all}{}{summary}", bind(41301, 1))))
            .is_some_and(|p| p.contains("outside")));
        assert!(tree_problem(&tree("3", &format!("{}{summary}", bind(41302, 1)))).is_some_and(|p| p.contains("41303")));
        assert!(tree_problem(&tree("3", &all)).is_some_and(|p| p.contains("filtered no bind")));
        let unfiltered = "{\"type\":\"summary\",\"kernel\":{\"filtered\":0},\"tree\":{\"exit_status\":3}}\n";
        assert!(tree_problem(&tree("3", &format!("{all}{unfiltered}"))).is_some_and(|p| p.contains("filtered no bind")));
        let no_status = "{\"type\":\"summary\",\"kernel\":{\"filtered\":1},\"tree\":{}}\n";
        assert!(tree_problem(&tree("3", &format!("{all}{no_status}"))).is_some_and(|p| p.contains("exit status 3")));
        assert_eq!(version_key("linux-image-6.12.117+deb12"), vec![6, 12, 117, 12]);
        assert!(version_key("6.12.117") > version_key("6.12.99"));
    }
}
