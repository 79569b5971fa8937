//! `cargo xtask vm`: boots Debian's own kernels under QEMU (TCG: KVM fails on these machines)
//! with an initramfs holding bindtrace, `bind-scenarios` and a busybox init. bindtrace traces
//! the scenarios inside the guest, and the serial console output is checked here, scenario by
//! scenario, the same way `--host` checks a run on this machine.

mod apt;
mod boot;
mod check;
mod console;
mod costs;
mod host;
mod initramfs;
mod matrix;
mod report;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub(crate) use self::{apt::host_debian_mirrors, apt::APT_PACKAGES, host::vm_on_host};
use self::{
    apt::{ensure_packages, guest_busybox, guest_kernel, PrivateApt},
    boot::boot,
    check::compare_backends,
    console::{parse_checks, parse_console, stages, GuestRun},
    costs::{parse_costs, report_costs, Cost},
    initramfs::build_initramfs,
    matrix::{GuestKernel, BACKENDS, MATRIX, NEWEST_SERIES},
    report::{finish, report, report_checks, report_lacking, ring_problem, Tally},
};
use crate::{dist::Arch, workspace_root};

#[derive(clap::Args, Default)]
pub(crate) struct VmArgs {
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
    /// Guests booted at once [default: 2, the CPUs of the machines this runs on; 1 with
    /// --costs, whose figures another guest beside would distort].
    #[arg(long)]
    jobs: Option<usize>,
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
    pub(crate) fn arches(&self) -> Result<Vec<Arch>> {
        let mut arches: Vec<Arch> = Vec::new();
        for guest in self.guests()? {
            if !arches.contains(&guest.arch) {
                arches.push(guest.arch);
            }
        }
        Ok(arches)
    }

    /// Under TCG most of a guest's time is one busy vCPU (the verifier, bindtrace's
    /// start-up, the scenarios one at a time), so two guests side by side take little more
    /// than one: the matrix took 1,346 s one at a time on the 2-CPU CI machine.
    fn parallel_guests(&self) -> usize {
        if self.costs {
            return 1;
        }
        self.jobs.unwrap_or(2).max(1)
    }

    pub(crate) fn host(&self) -> bool {
        self.host
    }
}

/// The static binaries the guests of one architecture run.
pub(crate) struct GuestBinaries {
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
pub(crate) fn prefetch(args: &VmArgs) -> Result<()> {
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
pub(crate) fn vm(args: &VmArgs, binaries: &[GuestBinaries]) -> Result<()> {
    ensure_packages()?;
    let started = std::time::Instant::now();
    // Everything fetched and built first (apt's state is not to be shared by two guests).
    let mut guests = Vec::new();
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
            guests.push(GuestJob {
                guest,
                kernel: guest_kernel(&apt, guest)?,
                initramfs: initramfs.clone(),
                measures_costs: args.costs && guest.series == NEWEST_SERIES,
            });
        }
    }
    // The longest first, so that the last to start is a short one.
    let mut queue: Vec<usize> = (0..guests.len()).collect();
    queue.sort_by_key(|&i| std::cmp::Reverse(guests[i].guest.typical_secs));
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(queue));
    let results = std::sync::Mutex::new(Vec::new());
    let workers = args.parallel_guests();
    let plural = if guests.len() == 1 { "" } else { "s" };
    eprintln!("xtask: vm: {} guest{plural}, {} at a time", guests.len(), workers.min(guests.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while let Some(index) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    let result = run_guest_once_more_on_failure(&guests[index]);
                    if let Ok(mut results) = results.lock() {
                        results.push((index, result));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().map_err(|_| anyhow!("a guest's thread panicked"))?;
    if results.len() != guests.len() {
        bail!("{} of {} guests ran (a guest's thread panicked)", results.len(), guests.len());
    }
    results.sort_by_key(|(index, _)| *index);
    let mut tally = Tally::default();
    let mut costs = Vec::new();
    for (_, result) in results {
        let (guest_tally, guest_costs) = result?;
        tally.add(guest_tally);
        costs.extend(guest_costs);
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

/// One guest to boot, with everything it boots from.
struct GuestJob {
    guest: &'static GuestKernel,
    kernel: PathBuf,
    initramfs: PathBuf,
    measures_costs: bool,
}

/// An emulated guest is booted once more after a failure: the matrix then fails only on a
/// failure that comes back, and the first one stays in the log (and in `retried`) to be
/// looked into, never dropped.
fn run_guest_once_more_on_failure(job: &GuestJob) -> Result<(Tally, Vec<Cost>)> {
    let mut first = Tally::default();
    let measured = run_guest(job, &mut first)?;
    if first.failed == 0 && first.failures.is_empty() {
        return Ok((first, measured));
    }
    let name = format!("{}-{}", job.guest.arch.name, job.guest.series);
    eprintln!("xtask: vm {name}: failed ({}); booting it once more", first.failures.join("; "));
    let mut second = Tally::default();
    let measured = run_guest(job, &mut second)?;
    second.retried.push(format!("{name}: {}", first.failures.join("; ")));
    Ok((second, measured))
}

fn run_guest(job: &GuestJob, tally: &mut Tally) -> Result<Vec<Cost>> {
    let GuestJob { guest, kernel, initramfs, measures_costs } = job;
    let measures_costs = *measures_costs;
    let name = format!("{}-{}", guest.arch.name, guest.series);
    let booted = std::time::Instant::now();
    let mut console = boot(guest.arch, kernel, initramfs, measures_costs)?;
    if !console.contains("@@BEGIN ") {
        // The kernel never reached the init (a TCG boot once panicked in an interrupt before
        // it): nothing of bindtrace ran, so the guest is booted once more, and says so.
        eprintln!("xtask: vm {name}: the kernel did not reach the init; booting it once more");
        console = boot(guest.arch, kernel, initramfs, measures_costs)?;
    }
    let log = workspace_root().join(format!("target/vm/console-{name}.txt"));
    std::fs::write(&log, &console)?;
    eprintln!("xtask: vm {name}: {:.0?}, console in {}", booted.elapsed(), log.display());
    let stages: Vec<String> = stages(&console).iter().map(|(stage, secs)| format!("{stage} {secs:.0}s")).collect();
    eprintln!("xtask: vm {name}: stages: {}", stages.join(", "));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{AARCH64, X86_64};

    #[test]
    fn the_matrix_covers_both_arches_and_every_series() {
        let args = VmArgs::default();
        assert_eq!(args.guests().expect("guests").len(), MATRIX.len());
        assert_eq!(args.arches().expect("arches"), vec![X86_64, AARCH64]);
        let only = VmArgs { kernels: vec!["5.10".into()], ..Default::default() };
        assert_eq!(only.arches().expect("arches"), vec![X86_64]);
        assert!(VmArgs { kernels: vec!["4.19".into()], ..Default::default() }.guests().is_err());
    }
}
