//! `bindtrace --check`: each backend loaded and attached on its own, and with `--verbose`
//! exercised by two test binds, with the kernel's counters of each program.

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{maps::PerCpuArray, Ebpf};
use bindtrace_common::{names, Backend, ProbeConfig};

use super::{
    auto_order,
    counters::{program_stats, stat_sums, KernelCounters, ProgramStats},
    loader::{BtfSource, PendingLoader},
    programs::attach_backend,
    Coverage, PROBE_OBJECT,
};
use crate::layout::KernelBtf;

/// What `bindtrace --check` found out about one backend.
pub(crate) struct BackendCheck {
    pub backend: Backend,
    /// Whether it attached, and then what it sees.
    pub result: Result<Coverage>,
    /// `--check --verbose`, once attached: what the test binds made its programs do.
    pub exercised: Option<Result<Exercise>>,
}

/// What one backend's programs did for `--check --verbose`'s two test binds (and whatever
/// else bound on the machine meanwhile).
pub(crate) struct Exercise {
    /// The port of the test binds on 127.0.0.1.
    pub port: u16,
    pub counters: KernelCounters,
    /// Each loaded program's kernel counters, with the instructions the verifier checked
    /// (the kernel tells since 5.16).
    pub programs: Vec<(ProgramStats, Option<u32>)>,
    /// Whether the kernel counted runs and their time (BPF_ENABLE_STATS, 5.8+), or why not.
    pub run_stats: std::result::Result<(), String>,
}

/// Loads the object once per backend and tries to attach it, then lets it go; `exercise`:
/// with test binds while attached (see [`Exercise`]).
pub(crate) fn check_backends(config: &ProbeConfig, kernel: &KernelBtf, exercise: bool) -> Vec<BackendCheck> {
    let mut btf = BtfSource::new(kernel);
    auto_order()
        .iter()
        .map(|&backend| {
            let attached = PendingLoader::start()
                .finish()
                .and_then(|mut loader| {
                    loader
                        .override_global(names::CONFIG, config, true)
                        .load(PROBE_OBJECT)
                        .context("loading the eBPF object failed")
                })
                .and_then(|mut ebpf| attach_backend(&mut ebpf, backend, &mut btf).map(|coverage| (ebpf, coverage)));
            match attached {
                Ok((ebpf, coverage)) => {
                    let exercised = exercise.then(|| exercise_hooks(&ebpf));
                    BackendCheck { backend, result: Ok(coverage), exercised }
                }
                Err(err) => BackendCheck { backend, result: Err(err), exercised: None },
            }
        })
        .collect()
}

/// Two binds on 127.0.0.1 under the attached hooks, the second refused (EADDRINUSE), with the
/// kernel's run statistics on; then the probe's and the kernel's counters.
fn exercise_hooks(ebpf: &Ebpf) -> Result<Exercise> {
    let run_stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    let held = std::net::UdpSocket::bind("127.0.0.1:0").context("the test bind on 127.0.0.1 failed")?;
    let port = held.local_addr().context("the test socket has no address")?.port();
    if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        bail!("the second test bind on 127.0.0.1:{port} succeeded where it should have been refused");
    }
    drop(held);
    let stats =
        PerCpuArray::try_from(ebpf.map(names::STATS).ok_or_else(|| anyhow!("probe has no {} map", names::STATS))?)?;
    let counters = KernelCounters::from_sums(&stat_sums(&stats)?);
    let verified: std::collections::HashMap<&str, u32> = ebpf
        .programs()
        .filter_map(|(name, program)| Some((name, program.info().ok()?.verified_instruction_count()?)))
        .filter(|(_, count)| *count > 0)
        .collect();
    let mut programs = program_stats(ebpf);
    programs.sort_by(|a, b| a.name.cmp(&b.name));
    let programs = programs
        .into_iter()
        .map(|stats| {
            let instructions = verified.get(stats.name.as_str()).copied();
            (stats, instructions)
        })
        .collect();
    Ok(Exercise { port, counters, programs, run_stats: run_stats.map(drop).map_err(|e| format!("{e}")) })
}
