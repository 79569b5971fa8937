//! The loader: loads the embedded eBPF object with its configuration, fills the pid and
//! cgroup filters, attaches the first backend the kernel accepts and hands out the ring
//! buffer, the maps the tracer updates and the counters. The only module that loads or
//! attaches programs; the maps it hands out are used through aya where they are read or
//! written (`pipeline`'s ring buffer, `tree`'s and `follow`'s maps).

mod check;
mod counters;
mod loader;
mod programs;
mod tracefs;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use aya_log::EbpfLogger;
use bindtrace_common::{attach_state, filter_flags, names, Backend, CgroupSlot, ProbeConfig, TreePlace};

pub(crate) use self::{
    check::{check_backends, Exercise},
    counters::{KernelCounters, ProgramStats},
    loader::PendingLoader,
    tracefs::read_tracefs,
};
use self::{
    counters::{is_return_hook, program_stats, stat_sums},
    loader::BtfSource,
    programs::{attach_backend, attach_tree},
};
use crate::layout::KernelBtf;

/// Which backends to try, in order, taking the first this kernel accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendChoice {
    /// [`auto_order`].
    Auto,
    Only(Backend),
}

/// The probe, built by build.rs and embedded so that the binary is all a host needs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bindtrace-probe"));

/// aya-log's logger writing to the `log` crate. Kept alive for as long as the probe: dropping
/// it early breaks the next load ("fd is not pointing to valid bpf_map").
pub(crate) type ProbeLogger = EbpfLogger<&'static dyn log::Log>;

pub(crate) struct AttachedProbe {
    // Field order is drop order: the logger must go before the object whose map it reads.
    logger: Option<ProbeLogger>,
    stats: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
    pub backend: Backend,
    /// What the attached backend sees.
    pub coverage: Coverage,
}

/// What an attached backend sees beyond inet binds.
#[derive(Debug)]
pub(crate) struct Coverage {
    /// Every bind(2), whatever the family and outcome (the tracepoints, or a hook on
    /// `__sys_bind`); otherwise only inet binds, through inet_bind.
    pub every_bind_syscall: bool,
    /// Failed listen() calls, or why not.
    pub failed_listen: std::result::Result<(), String>,
    /// A hook on inet6_bind (the kprobe and fexit backends), or why not: without it, IPv6
    /// binds that do not come through bind(2) (io_uring's, the kernel's own) are missed. A
    /// kernel with IPv6 as a module not loaded has no inet6_bind; one with it built as a
    /// module keeps its BTF in /sys/kernel/btf/ipv6, which the fexit backend does not read.
    pub inet6_bind: std::result::Result<(), String>,
    /// The kprobe backend's backstops on bind(2)'s and listen(2)'s exit tracepoints, or why
    /// not: they report the calls whose kretprobe the kernel skipped (out of return
    /// instances, with many binds sleeping at once); without them those are counted as
    /// lost. Always `Ok` on the other backends, which have no such limit.
    pub skipped_returns: std::result::Result<(), String>,
}

/// The order `--attach auto` tries: the inet_bind hooks see every bind (io_uring's, the
/// kernel's own) and cost the traced program least; the syscall tracepoints work everywhere.
pub(crate) const AUTO_ORDER: [Backend; 3] = [Backend::Fexit, Backend::Kprobe, Backend::Tracepoint];

/// The order on a PREEMPT_RT kernel. There BPF programs run preemptible: the VM matrix's
/// Debian 6.1-rt guest lost up to 1,157 of 40,000 binds of two threads under fexit (the
/// trampoline's per-CPU recursion guard skipped programs whose CPU had a preempted one),
/// counted as lost, but lost. kprobe lost 5,177 of 6,400 sleeping AF_UNIX binds before its
/// syscall-exit backstops, and none since; its kretprobes can still run out on io_uring's
/// binds. The tracepoints lost none.
pub(crate) const AUTO_ORDER_PREEMPT_RT: [Backend; 3] = [Backend::Tracepoint, Backend::Fexit, Backend::Kprobe];

/// Is the running kernel PREEMPT_RT (`/sys/kernel/realtime`, or its version string, as
/// `uname -v` shows it)?
pub(crate) fn preempt_rt() -> bool {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    read("/sys/kernel/realtime").trim() == "1" || read("/proc/sys/kernel/version").contains("PREEMPT_RT")
}

/// The backends `--attach auto` tries on this kernel, in order.
pub(crate) fn auto_order() -> [Backend; 3] {
    if preempt_rt() {
        AUTO_ORDER_PREEMPT_RT
    } else {
        AUTO_ORDER
    }
}

/// How much work the verifier did per loaded program: the load time grows with it.
fn log_verifier_work(ebpf: &Ebpf) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    for (name, program) in ebpf.programs() {
        if let Ok(info) = program.info() {
            let verified = info.verified_instruction_count().unwrap_or(0);
            log::debug!("{name}: {verified} instructions verified");
        }
    }
}

/// The backends `attach` tries, in order.
pub(crate) fn candidates(choice: BackendChoice) -> Vec<Backend> {
    match choice {
        BackendChoice::Auto => auto_order().to_vec(),
        BackendChoice::Only(backend) => vec![backend],
    }
}

/// Tells the probe what attaching did (`bindtrace_common::attach_state`): when it ended (an
/// exit without its entry within a second of this is a call that was under way at attach,
/// counted apart from the lost ones), and whether `__sys_bind` is hooked.
fn mark_attached(ebpf: &mut Ebpf, syscall_hooked: bool) -> Result<()> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).context("reading the monotonic clock")?;
    let ns = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap_or(0);
    let mut state: Array<_, u64> = Array::try_from(
        ebpf.map_mut(names::ATTACH_STATE).ok_or_else(|| anyhow!("probe has no {} map", names::ATTACH_STATE))?,
    )?;
    state
        .set(attach_state::SYSCALL_HOOKED, u64::from(syscall_hooked), 0)
        .context("writing the probe's attach state")?;
    state.set(attach_state::ATTACHED_AT, ns, 0).context("writing the attach time for the probe")?;
    Ok(())
}

impl AttachedProbe {
    /// Loads the object and attaches the first backend of `attach` that this kernel accepts
    /// (`auto`: fexit, then kprobe, then the syscall tracepoints).
    pub(crate) fn attach(
        loader: PendingLoader,
        attach: BackendChoice,
        kernel: &KernelBtf,
        config: &ProbeConfig,
        pids: &[u32],
        ring_bytes: u32,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let mut loader = loader.finish()?;
        let mut btf = BtfSource::new(kernel);
        let following_tree = config.filter.is_active(filter_flags::TREE);
        if !following_tree {
            // Preallocated: its 65,536 entries cost memory only a traced tree uses.
            loader.map_max_entries(names::FOLLOWED, 1);
        }
        let mut ebpf = loader
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

        let count = (config.filter.cgroup_count as usize).min(bindtrace_common::MAX_CGROUPS);
        if count > 0 {
            let mut selected: Array<_, CgroupSlot> = Array::try_from(
                ebpf.map_mut(names::SELECTED_CGROUPS)
                    .ok_or_else(|| anyhow!("probe has no {} map", names::SELECTED_CGROUPS))?,
            )?;
            let filter = &config.filter;
            for (index, (&id, &level)) in filter.cgroup_ids.iter().zip(&filter.cgroup_levels).take(count).enumerate() {
                selected
                    .set(index as u32, CgroupSlot { id, parent_id: 0, level, _pad: 0 }, 0)
                    .context("filling the cgroup filter")?;
            }
        }

        let mut refusals = Vec::new();
        let mut chosen = None;
        for backend in candidates(attach) {
            match attach_backend(&mut ebpf, backend, &mut btf) {
                Ok(coverage) => {
                    chosen = Some((backend, coverage));
                    break;
                }
                Err(err) => {
                    log::debug!("backend {} unavailable: {err:#}", backend.name());
                    refusals.push(format!("{}: {err:#}", backend.name()));
                }
            }
        }
        let Some((backend, coverage)) = chosen else {
            if attach == BackendChoice::Auto {
                bail!("this kernel accepts none of bindtrace's hooks ({})", refusals.join("; "));
            }
            bail!("--attach {} (bindtrace --check tells what this kernel supports)", refusals.join("; "));
        };
        if following_tree {
            // After the bind hooks, before the tree's root is added (see `tree`): nothing is
            // followed until then, so the order loses nothing.
            attach_tree(&mut ebpf).context("following the process tree (sched: tracepoints)")?;
        }
        log::debug!("programs loaded and attached in {:?}", started.elapsed());
        mark_attached(&mut ebpf, backend != Backend::Tracepoint && coverage.every_bind_syscall)?;
        log_verifier_work(&ebpf);
        let stats = PerCpuArray::try_from(
            ebpf.take_map(names::STATS).ok_or_else(|| anyhow!("probe has no {} map", names::STATS))?,
        )?;
        Ok(Self { logger, stats, ebpf, backend, coverage })
    }

    pub(crate) fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or_else(|| anyhow!("probe has no {} map (already taken?)", names::EVENTS))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The cgroup filter's ids, for the follower that updates them (see `follow`).
    pub(crate) fn take_selected_cgroups(&mut self) -> Result<Array<MapData, CgroupSlot>> {
        let map = self
            .ebpf
            .take_map(names::SELECTED_CGROUPS)
            .ok_or_else(|| anyhow!("probe has no {} map (already taken?)", names::SELECTED_CGROUPS))?;
        Ok(Array::try_from(map)?)
    }

    /// The followed process tree's map, for the tracer's side of it (see `tree`).
    pub(crate) fn take_followed(&mut self) -> Result<HashMap<MapData, u32, TreePlace>> {
        let map = self
            .ebpf
            .take_map(names::FOLLOWED)
            .ok_or_else(|| anyhow!("probe has no {} map (already taken?)", names::FOLLOWED))?;
        Ok(HashMap::try_from(map)?)
    }

    pub(crate) fn take_logger(&mut self) -> Option<ProbeLogger> {
        self.logger.take()
    }

    /// Sums the per-CPU counters, adds the return hooks the kernel skipped, and gives the
    /// kernel's own counters of each program (one read of each program's fdinfo for both).
    pub(crate) fn counters(&self) -> Result<(KernelCounters, Vec<ProgramStats>)> {
        let programs = program_stats(&self.ebpf);
        let mut counters = KernelCounters::from_sums(&stat_sums(&self.stats)?);
        counters.dropped_recursion =
            programs.iter().filter(|p| is_return_hook(&p.name)).map(|p| p.recursion_misses).sum();
        Ok((counters, programs))
    }
}

#[cfg(test)]
mod tests {
    //! The embedded object against `common`: a probe built from other sources, for another
    //! arch or with other features than the tracer fails here, not at load time on a user's
    //! machine.

    use bindtrace_common::{stat, FilterConfig, KernelLayout};
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;

    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;

    #[test]
    fn maps_are_the_ones_the_tracer_uses() {
        let object = aya_obj::Object::parse(PROBE_OBJECT).expect("the embedded probe parses");
        let map = |name: &str| object.maps.get(name).unwrap_or_else(|| panic!("the probe has no map {name}"));
        let events = map(names::EVENTS);
        assert_eq!(events.map_type(), BPF_MAP_TYPE_RINGBUF);
        assert!(events.max_entries().is_power_of_two(), "a ring buffer's size is a power of two");
        let pids = map(names::FILTER_PIDS);
        assert_eq!((pids.map_type(), pids.key_size(), pids.value_size()), (BPF_MAP_TYPE_HASH, 4, 1), "tgid -> u8");
        let stats = map(names::STATS);
        assert_eq!(
            (stats.map_type(), stats.key_size(), stats.value_size(), stats.max_entries()),
            (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, stat::COUNT),
            "one u64 counter per bindtrace_common::stat"
        );
        for name in [names::INET_BIND_ARGS, names::THREAD_ENTRIES] {
            let entries = map(name);
            assert_eq!(
                (entries.map_type(), entries.key_size()),
                (BPF_MAP_TYPE_LRU_HASH, 4),
                "{name}: by tid, evicting"
            );
        }
        let followed = map(names::FOLLOWED);
        assert_eq!(
            (followed.map_type(), followed.key_size(), followed.value_size()),
            (BPF_MAP_TYPE_HASH, 4, std::mem::size_of::<TreePlace>() as u32),
            "tgid -> TreePlace, never evicted"
        );
        let state = map(names::ATTACH_STATE);
        assert_eq!((state.map_type(), state.max_entries()), (BPF_MAP_TYPE_ARRAY, attach_state::COUNT));
        // The programs: see programs::tests.
    }

    /// The config global is what `override_global` writes: in .rodata, exactly a
    /// `ProbeConfig`; and the probe's BTF gives every shared struct the size the tracer has.
    #[test]
    fn the_config_global_and_shared_structs_match_common() {
        let elf = object::File::parse(PROBE_OBJECT).expect("the embedded probe is an ELF object");
        let config = elf.symbols().find(|s| s.name() == Ok(names::CONFIG)).expect("the config global");
        assert_eq!(config.size() as usize, std::mem::size_of::<ProbeConfig>());
        let section = elf.section_by_index(config.section_index().expect("in a section")).expect("section");
        assert_eq!(section.name(), Ok(".rodata"), "read-only, so the verifier sees its values");

        let btf = elf.section_by_name(".BTF").expect("the probe carries BTF").data().expect("BTF bytes");
        let btf = btf_rs::Btf::from_bytes(btf).expect("the probe's BTF parses");
        let size_of = |name: &str| -> usize {
            let types = btf.resolve_types_by_name(name).unwrap_or_else(|e| panic!("{name} is not in the BTF: {e}"));
            types
                .iter()
                .find_map(|t| match t {
                    btf_rs::Type::Struct(s) => Some(s.size()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{name} is not a struct in the BTF"))
        };
        assert_eq!(size_of("ProbeConfig"), std::mem::size_of::<ProbeConfig>());
        assert_eq!(size_of("KernelLayout"), std::mem::size_of::<KernelLayout>());
        assert_eq!(size_of("FilterConfig"), std::mem::size_of::<FilterConfig>());
        // BindEvent is written through a raw ring-buffer pointer, so the probe's BTF does not
        // describe it: common's compile-time offset asserts (built into the probe too) and
        // the decoder's size check hold its layout.
    }
}
