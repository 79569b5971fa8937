//! Loads the embedded eBPF object with its configuration, fills the pid filter, attaches the
//! programs and hands out the ring buffer and the counters. Nothing else talks to aya.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use bindtrace_common::{names, stat, Backend, ProbeConfig};

use crate::{cli::Attach, summary::KernelCounters};

/// The probe, built by build.rs and embedded so that the binary is all a host needs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bindtrace-probe"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// aya-log's logger writing to the `log` crate. Kept alive for as long as the probe: dropping
/// it early breaks the next load ("fd is not pointing to valid bpf_map").
pub type ProbeLogger = EbpfLogger<&'static dyn log::Log>;

pub struct AttachedProbe {
    // Field order is drop order: the logger must go before the object whose map it reads.
    logger: Option<ProbeLogger>,
    stats: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
    pub backend: Backend,
}

/// CAP_BPF plus CAP_PERFMON (or CAP_SYS_ADMIN) in the effective set: what loading a
/// tracepoint program needs.
pub fn check_privileges() -> Result<()> {
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    let status =
        procfs::process::Process::myself().and_then(|p| p.status()).context("cannot read /proc/self/status")?;
    let effective = status.capeff;
    let has = |cap: u64| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        bail!("bindtrace needs root (CAP_BPF and CAP_PERFMON) to load its probe: run it with sudo")
    }
}

/// aya finds tracepoint ids through tracefs, which many hosts do not mount by default.
fn ensure_tracefs() -> Result<()> {
    let path = Path::new(TRACEFS);
    let populated = path.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false);
    if populated || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    nix::mount::mount(Some("nodev"), path, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("tracefs is not mounted and mounting it on {TRACEFS} failed"))?;
    log::info!("mounted tracefs on {TRACEFS}");
    Ok(())
}

/// aya's loader, created on another thread: `EbpfLoader::new` parses the whole kernel BTF
/// (about 20 ms), which can overlap with resolving the layout bindtrace itself needs.
pub struct PendingLoader(std::thread::JoinHandle<EbpfLoader<'static>>);

impl PendingLoader {
    pub fn start() -> Self {
        Self(std::thread::spawn(EbpfLoader::new))
    }

    fn finish(self) -> Result<EbpfLoader<'static>> {
        self.0.join().map_err(|_| anyhow!("preparing the eBPF loader panicked"))
    }
}

impl AttachedProbe {
    /// Loads and attaches. `attach` is the user's choice; this kernel offers only the syscall
    /// tracepoints today, so `auto` resolves to them.
    pub fn attach(
        loader: PendingLoader,
        attach: Attach,
        config: &ProbeConfig,
        pids: &[u32],
        ring_bytes: u32,
    ) -> Result<Self> {
        let backend = match attach {
            Attach::Auto | Attach::Tracepoint => Backend::Tracepoint,
        };
        let started = std::time::Instant::now();
        let mut ebpf = loader
            .finish()?
            // The probe takes its offsets from the config, not from CO-RE relocations: no
            // relocation pass against the kernel's BTF.
            .btf(None)
            .override_global(names::CONFIG, config, true)
            .map_max_entries(names::EVENTS, ring_bytes)
            .load(PROBE_OBJECT)
            .context("loading the eBPF probe failed")?;
        log::debug!("object loaded in {:?}", started.elapsed());

        // The probe only logs on rare error paths; without the logger those lines are lost,
        // not the events, so a failure here is a debug note.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                log::debug!("eBPF logger unavailable: {err}");
                None
            }
        };

        if !pids.is_empty() {
            let mut filter: HashMap<_, u32, u8> = HashMap::try_from(
                ebpf.map_mut(names::FILTER_PIDS).ok_or_else(|| anyhow!("probe has no {} map", names::FILTER_PIDS))?,
            )?;
            for pid in pids {
                filter.insert(pid, 1, 0).context("filling the pid filter")?;
            }
        }

        ensure_tracefs()?;
        // Entry first: an exit without its entry is counted, an entry without its exit is
        // overwritten by the thread's next bind.
        for (program, tracepoint) in [(names::PROG_ENTER, "sys_enter_bind"), (names::PROG_EXIT, "sys_exit_bind")] {
            let program: &mut TracePoint =
                ebpf.program_mut(program).ok_or_else(|| anyhow!("probe has no program {program}"))?.try_into()?;
            program.load().with_context(|| format!("loading {tracepoint} program failed"))?;
            program
                .attach("syscalls", tracepoint)
                .with_context(|| format!("attaching to syscalls:{tracepoint} failed"))?;
        }

        log::debug!("programs loaded and attached in {:?}", started.elapsed());
        let stats = PerCpuArray::try_from(
            ebpf.take_map(names::STATS).ok_or_else(|| anyhow!("probe has no {} map", names::STATS))?,
        )?;
        Ok(Self { logger, stats, ebpf, backend })
    }

    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or_else(|| anyhow!("probe has no {} map (already taken?)", names::EVENTS))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn take_logger(&mut self) -> Option<ProbeLogger> {
        self.logger.take()
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<KernelCounters> {
        let mut sums = [0u64; stat::COUNT as usize];
        for (index, sum) in (0..stat::COUNT).zip(sums.iter_mut()) {
            *sum = self.stats.get(&index, 0)?.iter().sum();
        }
        Ok(KernelCounters::from_sums(&sums))
    }
}
