//! `cargo xtask`: installs what building the probe needs, builds, runs and tests bindtrace.
//!
//! Every command starts with the same idempotent set-up, so a fresh Debian machine (as root)
//! gets from clone to a green test run with one command.

mod bench;
mod deploy;
mod dist;
mod nspawn;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test bindtrace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs: rust-src for nightly, Debian's LLVM dev packages
    /// and bpf-linker built against the LLVM that nightly rustc uses.
    Setup,
    /// Build the probe and the `bindtrace` binary (the probe is embedded in it).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release), then run bindtrace with the given arguments (needs root).
    Run {
        /// A debug build instead: far slower under a storm of binds.
        #[arg(long)]
        debug: bool,
        /// Arguments for bindtrace, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole test suite: formatting, clippy, unit tests and the integration tests that
    /// load the real probe (as root).
    Test,
    /// Measure what tracing costs a bind storm (release build, as root); see docs/PERFORMANCE.md.
    Bench(bench::BenchArgs),
    /// Static (musl) binaries for x86_64 and aarch64, a .deb for each, the man page, shell
    /// completions and SHA256SUMS, in target/dist/.
    Dist {
        /// Only these architectures (x86_64, aarch64).
        #[arg(long, value_delimiter = ',', default_values = ["x86_64", "aarch64"])]
        arch: Vec<String>,
    },
    /// Boot Debian's kernels under QEMU (x86_64 5.10, 6.1, 6.1-rt, 6.12; arm64 6.1, 6.12,
    /// 6.12 with 16K pages) and check the bind scenarios traced inside them (or, with --host,
    /// on this machine).
    Vm(vm::VmArgs),
    /// The container image bindtrace:VERSION (deploy/Dockerfile: the static binary alone),
    /// built with the local Docker; nothing is pulled.
    Image,
}

/// The crate of the programs the tests and benchmarks trace (fixtures/).
const FIXTURES: &str = "bindtrace-fixtures";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, echoing it, and fails if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(command));
    if command.get_current_dir().is_none() {
        command.current_dir(workspace_root());
    }
    let started = std::time::Instant::now();
    let status = command.status().with_context(|| format!("cannot start {}", describe(command)))?;
    // Every step's time in the log, so a slow suite says where its minutes went.
    let took = started.elapsed();
    if took.as_secs() >= 2 {
        eprintln!("xtask: {:.0?} for {}", took, program_and_first_args(command));
    }
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

/// The program and its first four arguments: enough to tell the steps apart.
fn program_and_first_args(command: &Command) -> String {
    let mut words: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args().take(4))
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if command.get_args().len() > 4 {
        words.push("...".to_owned());
    }
    words.join(" ")
}

pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn build(release: bool) -> Result<PathBuf> {
    setup::ensure()?;
    let mut command = cargo();
    command.args(["build", "--package", "bindtrace"]);
    if release {
        command.arg("--release");
    }
    run(&mut command)?;
    Ok(workspace_root().join("target").join(if release { "release" } else { "debug" }).join("bindtrace"))
}

/// The Debian packages the integration tests drive: ip (veth, netns, vxlan), setpriv,
/// unshare, mountpoint and mount, Debian's dockerd, containerd (with an image built from a
/// static busybox), podman and prometheus, nft for NAT rules, debootstrap and
/// systemd-nspawn for a systemd as PID 1, and Python helpers that hold the connections and
/// fds of the production-host tests, and sudo (`bindtrace -- CMD` runs CMD as the user who ran
/// it): a fresh machine gets them here, not by hand.
const TEST_PACKAGES: [&str; 16] = [
    "iproute2",
    "util-linux",
    "mount",
    "docker.io",
    "containerd",
    "runc",
    "iptables",
    "busybox-static",
    "tar",
    "prometheus",
    "python3",
    "debootstrap",
    "systemd-container",
    "nftables",
    "podman",
    "sudo",
];

/// What `cargo xtask test` fetches while the builds run (as root): the packages, the systemd
/// root filesystem (debootstrap, in a thread of its own), the VM matrix's kernels.
struct Fetching {
    /// The packages are in, and the root filesystem: where, and its job while it is made.
    installed: std::sync::mpsc::Receiver<Result<nspawn::Rootfs>>,
    /// The VM matrix's downloads, once the packages are in.
    guests: std::thread::JoinHandle<Result<()>>,
}

impl Fetching {
    /// Starts it: network and disk bound, so it runs beside fmt, clippy and the builds,
    /// which take the CPUs (on a fresh machine this took minutes off the critical path).
    fn start() -> Self {
        let (tell, installed) = std::sync::mpsc::channel();
        let guests = std::thread::spawn(move || {
            let packages = TEST_PACKAGES.iter().chain(&vm::APT_PACKAGES).map(|p| (*p).to_owned()).collect::<Vec<_>>();
            let ready = setup::apt_install(&packages).and_then(|()| nspawn::start_rootfs());
            let failed = ready.is_err();
            let _ = tell.send(ready);
            if failed {
                return Ok(());
            }
            vm::prefetch(&vm::VmArgs::default())
        });
        Self { installed, guests }
    }
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    let tested = test_steps();
    eprintln!("xtask: cargo xtask test took {:.0?}", started.elapsed());
    tested
}

fn test_steps() -> Result<()> {
    setup::ensure()?;
    let fetching = is_root().then(Fetching::start);
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "bindtrace-probe",
        "--all-targets",
        // The userspace benchmark's access to the stages (`bench_api`).
        "--features",
        "bindtrace/bench",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The probe only builds for the BPF target, with nightly (rustup picks it from `+nightly`).
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "--package",
        "bindtrace-probe",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut tests = cargo();
    // The features clippy checked with, so that `bench_api` is built here too. (The probe
    // itself is built once per architecture whatever builds the tracer: see tracer/build.rs.)
    tests.args(["test", "--workspace", "--exclude", "bindtrace-probe", "--features", "bindtrace/bench"]);
    let mut rootfs = None;
    if let Some(fetching) = &fetching {
        // The kernel tests must run, not skip, when they can.
        tests.env("BINDTRACE_REQUIRE_ROOT", "1");
        // The container test builds the image from the static binary and runs it. Every
        // architecture's is built now, at once (the VM matrix takes them later).
        dist::build_static_all("bindtrace", "bindtrace")?;
        tests.env("BINDTRACE_STATIC_BINARY", deploy::host_static_binary()?);
        // A systemd to boot as PID 1 for the socket-unit tests: made while the tests build.
        let (root, job) =
            fetching.installed.recv().map_err(|_| anyhow::anyhow!("the package installs stopped without a word"))??;
        tests.env(nspawn::ROOT_ENV, &root);
        rootfs = job;
    } else {
        eprintln!("xtask: not root: the tests that load the probe will be SKIPPED (run `sudo cargo xtask test`)");
    }
    let tested = run(&mut tests);
    if let Some(job) = rootfs {
        match job.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("xtask: the systemd root filesystem: {err:#}"),
            Err(_) => eprintln!("xtask: making the systemd root filesystem panicked"),
        }
    }
    tested?;
    deploy::validate_manifests()?;
    match fetching {
        Some(fetching) => {
            // A failed download is said; the matrix then fetches (and fails) on its own.
            match fetching.guests.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => eprintln!("xtask: fetching the VM matrix's kernels: {err:#}"),
                Err(_) => eprintln!("xtask: fetching the VM matrix's kernels panicked"),
            }
            vm_matrix(&vm::VmArgs::default())
        }
        None => {
            eprintln!("xtask: not root: the VM matrix is SKIPPED (it installs QEMU and kernels with apt-get)");
            Ok(())
        }
    }
}

/// Builds what the guests run, the release artifacts themselves (`cargo xtask dist`: static
/// binaries per architecture), and runs the VM matrix; `--host` runs the same checks here.
fn vm_matrix(args: &vm::VmArgs) -> Result<()> {
    if args.host() {
        let bindtrace = build(false)?;
        run(cargo().args(["build", "--package", FIXTURES, "--bin", "bind-scenarios"]))?;
        return vm::vm_on_host(&bindtrace, &workspace_root().join("target/debug/bind-scenarios"));
    }
    let arches = args.arches()?;
    let dist = dist::dist(&arches)?;
    let mut binaries = Vec::new();
    for arch in arches {
        // x86_64 guests also run a 32-bit build of the scenarios: binds through the ia32
        // compat syscalls, which the syscall tracepoints do not see.
        let compat_scenarios = if arch == dist::X86_64 {
            dist::I686_COMPAT.ensure_toolchain()?;
            Some(dist::I686_COMPAT.build_static(FIXTURES, "bind-scenarios")?)
        } else {
            None
        };
        binaries.push(vm::GuestBinaries {
            arch,
            bindtrace: dist.binary(arch)?.to_path_buf(),
            scenarios: arch.build_static(FIXTURES, "bind-scenarios")?,
            compat_scenarios,
            syscall_loop: arch.build_static(FIXTURES, "syscall-loop")?,
            bind_storm: arch.build_static(FIXTURES, "bind-storm")?,
        });
    }
    vm::vm(args, &binaries)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ensure(),
        Task::Build { release } => build(release).map(|path| eprintln!("xtask: built {}", path.display())),
        Task::Run { debug, args } => build(!debug).and_then(|binary| {
            let status = Command::new(&binary)
                .args(&args)
                .status()
                .with_context(|| format!("cannot run {}", binary.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }),
        Task::Test => test(),
        Task::Vm(args) => vm_matrix(&args),
        Task::Image => deploy::image(),
        Task::Dist { arch } => arch
            .iter()
            .map(|name| dist::Arch::by_name(name))
            .collect::<Result<Vec<_>>>()
            .and_then(|arches| dist::dist(&arches))
            .map(drop),
        Task::Bench(args) => build(true).and_then(|bindtrace| {
            run(cargo().args([
                "build",
                "--release",
                "--package",
                FIXTURES,
                "--bin",
                "bind-storm",
                "--bin",
                "fail-storm",
                "--bin",
                "ndjson-meter",
                "--bin",
                "syscall-loop",
            ]))?;
            let release = workspace_root().join("target/release");
            bench::bench(&args, &bindtrace, &release.join("bind-storm"), &release)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
