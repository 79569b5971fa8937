//! Loads the embedded eBPF object with its configuration, fills the pid filter, attaches the
//! programs and hands out the ring buffer and the counters. Nothing else talks to aya.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, KProbe, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use bindtrace_common::{attach_state, filter_flags, names, stat, Backend, CgroupSlot, ProbeConfig, TreePlace};

use std::os::fd::{AsFd as _, AsRawFd as _};

use crate::{
    cli::Attach,
    layout::KernelBtf,
    summary::{KernelCounters, ProgramStats},
};

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
    /// What the attached backend sees.
    pub coverage: Coverage,
}

/// What an attached backend sees beyond inet binds.
#[derive(Debug)]
pub struct Coverage {
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

const INET6_BIND: &str = "inet6_bind";

/// Where tracefs is, as aya looks for it.
enum Tracefs {
    /// Mounted and readable: aya finds it.
    Readable,
    /// Mounted, but its mode (0700) keeps bindtrace out.
    Unreadable,
    /// Not mounted anywhere aya looks.
    Missing,
}

fn tracefs_state() -> Tracefs {
    let populated = |path: &str| Path::new(path).read_dir().map(|mut d| d.next().is_some());
    match populated(TRACEFS) {
        Ok(true) => Tracefs::Readable,
        _ if Path::new("/sys/kernel/debug/tracing/events").exists() => Tracefs::Readable,
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => Tracefs::Unreadable,
        _ => Tracefs::Missing,
    }
}

/// Runs `attach` where aya can read tracepoint ids from tracefs. When the host has not
/// mounted it, the work runs on a thread of its own that takes a private mount namespace
/// (`unshare(CLONE_NEWNS)`, this thread only), stops propagation to the host and mounts
/// tracefs there: no other process ever sees the mount, and it is gone when the thread ends,
/// so bindtrace leaves no mount behind and parallel runs cannot unmount each other's.
fn with_tracefs<T: Send>(attach: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    use nix::mount::{mount, MsFlags};
    match tracefs_state() {
        Tracefs::Readable => return attach(),
        Tracefs::Unreadable => bail!(
            "tracefs on {TRACEFS} is not readable (mode 0700): the tracepoint backend needs CAP_DAC_READ_SEARCH \
             besides CAP_BPF and CAP_PERFMON (or run it as root)"
        ),
        Tracefs::Missing => {}
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .and_then(|()| {
                        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
                    })
                    .and_then(|()| mount(Some("nodev"), TRACEFS, Some("tracefs"), MsFlags::empty(), None::<&str>))
                    .with_context(|| {
                        format!(
                            "tracefs is not mounted and bindtrace cannot mount it (that needs CAP_SYS_ADMIN): \
                             mount it with `mount -t tracefs nodev {TRACEFS}`"
                        )
                    })?;
                log::debug!("tracefs mounted on {TRACEFS} in a mount namespace private to the attaching thread");
                attach()
            })
            .join()
            .map_err(|_| anyhow!("the thread attaching the tracepoints panicked"))?
    })
}

/// A file of tracefs (`events/sched/sched_process_fork/format`), mounted privately for the
/// read when the host has not mounted it (see [`with_tracefs`]).
pub(crate) fn read_tracefs(relative: &str) -> Result<String> {
    with_tracefs(|| {
        let mut last = None;
        for root in [TRACEFS, "/sys/kernel/debug/tracing"] {
            match std::fs::read_to_string(Path::new(root).join(relative)) {
                Ok(text) => return Ok(text),
                Err(err) => last = Some(format!("{root}/{relative}: {err}")),
            }
        }
        bail!("cannot read {}", last.unwrap_or_default())
    })
}

/// aya's loader, created on another thread (see [`spawn_loader_without_kernel_btf`]).
pub struct PendingLoader {
    loader: std::thread::JoinHandle<EbpfLoader<'static>>,
}

/// Where the loader's thread moves its root: aya's fixed path to the kernel BTF
/// (`/sys/kernel/btf/vmlinux`) does not exist below it.
const LOADER_ROOT: &str = "/sys/kernel/btf";

/// `EbpfLoader::new()`, the only constructor aya 0.14 has, parses the whole kernel BTF:
/// about 20 ms of CPU and 19 MB of peak RSS (VmHWM with and without it), for a copy bindtrace
/// never uses (the probe takes its offsets from the config, not from CO-RE relocations, and
/// fexit parses its own copy only once the kernel has shown it loads fexit programs). So the
/// loader is made on a thread that first takes a private filesystem context
/// (`unshare(CLONE_FS)`, this thread only) and changes its root to [`LOADER_ROOT`], where
/// aya's read fails at once. The thread ends right after; nothing else runs under that root.
/// Without CAP_SYS_CHROOT the parse happens, and is freed at once.
fn spawn_loader_without_kernel_btf() -> std::thread::JoinHandle<EbpfLoader<'static>> {
    // Only ever on a thread of its own: it changes that thread's root.
    std::thread::spawn(|| {
        let isolated = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
            .and_then(|()| nix::unistd::chroot(LOADER_ROOT))
            .and_then(|()| nix::unistd::chdir("/"));
        if let Err(err) = isolated {
            log::debug!("eBPF loader made with aya's kernel BTF parse (no private root: {err})");
        }
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        loader
    })
}

impl PendingLoader {
    pub fn start() -> Self {
        Self { loader: spawn_loader_without_kernel_btf() }
    }

    fn finish(self) -> Result<EbpfLoader<'static>> {
        self.loader.join().map_err(|_| anyhow!("preparing the eBPF loader panicked"))
    }
}

/// The order `--attach auto` tries: the inet_bind hooks see every bind (io_uring's, the
/// kernel's own) and cost the traced program least; the syscall tracepoints work everywhere.
pub const AUTO_ORDER: [Backend; 3] = [Backend::Fexit, Backend::Kprobe, Backend::Tracepoint];

/// The order on a PREEMPT_RT kernel. There BPF programs run preemptible: the VM matrix's
/// Debian 6.1-rt guest lost up to 1,157 of 40,000 binds of two threads under fexit (the
/// trampoline's per-CPU recursion guard skipped programs whose CPU had a preempted one),
/// counted as lost, but lost. kprobe lost 5,177 of 6,400 sleeping AF_UNIX binds before its
/// syscall-exit backstops, and none since; its kretprobes can still run out on io_uring's
/// binds. The tracepoints lost none.
pub const AUTO_ORDER_PREEMPT_RT: [Backend; 3] = [Backend::Tracepoint, Backend::Fexit, Backend::Kprobe];

/// Is the running kernel PREEMPT_RT (`/sys/kernel/realtime`, or its version string, as
/// `uname -v` shows it)?
pub fn preempt_rt() -> bool {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    read("/sys/kernel/realtime").trim() == "1" || read("/proc/sys/kernel/version").contains("PREEMPT_RT")
}

/// The backends `--attach auto` tries on this kernel, in order.
pub fn auto_order() -> [Backend; 3] {
    if preempt_rt() {
        AUTO_ORDER_PREEMPT_RT
    } else {
        AUTO_ORDER
    }
}

fn program<'a, T: 'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("probe has no program {name}"))?;
    Ok(program.try_into()?)
}

/// Loads and attaches (program, syscalls tracepoint) pairs in order; tracefs must be there
/// (see [`with_tracefs`]).
fn attach_syscall_tracepoints(ebpf: &mut Ebpf, programs: &[(&str, &str)]) -> Result<()> {
    for (name, tracepoint) in programs {
        let program: &mut TracePoint = program(ebpf, name)?;
        program.load().with_context(|| format!("loading the {tracepoint} program failed"))?;
        program.attach("syscalls", tracepoint).with_context(|| format!("attaching to syscalls:{tracepoint} failed"))?;
    }
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<Coverage> {
    with_tracefs(|| {
        // Entry first: an exit without its entry is counted, an entry without its exit is
        // overwritten by the thread's next call.
        attach_syscall_tracepoints(
            ebpf,
            &[(names::PROG_ENTER, "sys_enter_bind"), (names::PROG_EXIT, "sys_exit_bind")],
        )?;
        let listen = attach_syscall_tracepoints(
            ebpf,
            &[(names::PROG_ENTER_LISTEN, "sys_enter_listen"), (names::PROG_EXIT_LISTEN, "sys_exit_listen")],
        );
        if let Err(err) = &listen {
            log::info!("tracepoint: failed listen() calls are not traced: {err:#}");
            unload_listen_hooks(ebpf, Backend::Tracepoint);
        }
        Ok(Coverage {
            every_bind_syscall: true,
            failed_listen: listen.map_err(|e| format!("{e:#}")),
            inet6_bind: Ok(()),
            skipped_returns: Ok(()),
        })
    })
}

/// The process tree's programs on `sched:sched_process_fork`, `_exec` and `_exit`: exit and
/// exec first, so that nothing the fork program adds outlives its process.
fn attach_tree_programs(ebpf: &mut Ebpf) -> Result<()> {
    with_tracefs(|| {
        for (name, tracepoint) in [
            (names::PROG_TREE_EXIT, "sched_process_exit"),
            (names::PROG_TREE_EXEC, "sched_process_exec"),
            (names::PROG_TREE_FORK, "sched_process_fork"),
        ] {
            let program: &mut TracePoint = program(ebpf, name)?;
            program.load().with_context(|| format!("loading the {tracepoint} program failed"))?;
            program.attach("sched", tracepoint).with_context(|| format!("attaching to sched:{tracepoint} failed"))?;
        }
        Ok(())
    })
}

const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// `fd_to_socket`: whether the `__sys_bind` hooks can find a bind's socket (see
/// [`KernelBtf::fd_to_socket`]); without it they are left out.
fn attach_kprobe(ebpf: &mut Ebpf, fd_to_socket: Result<()>) -> Result<Coverage> {
    // Without the kprobe PMU (CONFIG_KPROBES off) attaching cannot work: skip the verifier.
    if !Path::new(KPROBE_PMU).exists() {
        bail!("this kernel has no kprobes ({KPROBE_PMU} is missing)");
    }
    // __sys_bind first (return, then entry), the inet_bind hooks after: while they attach,
    // every bind(2) is already seen once.
    let syscall = attach_optional(ebpf, Backend::Kprobe, |ebpf| {
        fd_to_socket?;
        for name in [names::PROG_KRETPROBE_SYS_BIND, names::PROG_KPROBE_SYS_BIND] {
            let probe: &mut KProbe = program(ebpf, name)?;
            probe.load().with_context(|| format!("loading {name} failed"))?;
            probe
                .attach(names::SYSCALL_BIND_FUNCTION, 0)
                .with_context(|| format!("attaching a kprobe to {} failed", names::SYSCALL_BIND_FUNCTION))?;
        }
        Ok(())
    });
    let mut inet6_bind = Ok(());
    for name in [names::PROG_KRETPROBE, names::PROG_KPROBE] {
        let probe: &mut KProbe = program(ebpf, name)?;
        probe.load().with_context(|| format!("loading {name} failed"))?;
        for function in names::INET_BIND_FUNCTIONS {
            let attached =
                probe.attach(function, 0).with_context(|| format!("attaching a kprobe to {function} failed"));
            match attached {
                Ok(_) => {}
                // IPv6 may be a module that is not loaded: the rest still works.
                Err(err) if function == INET6_BIND => inet6_bind = Err(format!("{err:#}")),
                Err(err) => return Err(err),
            }
        }
    }
    let listen = [names::PROG_KRETPROBE_SYS_LISTEN, names::PROG_KPROBE_SYS_LISTEN];
    let attached = listen.iter().try_for_each(|name| -> Result<()> {
        let probe: &mut KProbe = program(ebpf, name)?;
        probe.load().with_context(|| format!("loading {name} failed"))?;
        probe.attach(names::SYSCALL_LISTEN_FUNCTION, 0)?;
        Ok(())
    });
    if let Err(err) = &attached {
        log::info!("kprobe: failed listen() calls are not traced: {err:#}");
        unload_listen_hooks(ebpf, Backend::Kprobe);
    }
    let mut backstops = Vec::new();
    if syscall {
        backstops.push((names::PROG_BACKSTOP_BIND, "sys_exit_bind"));
    }
    if attached.is_ok() {
        backstops.push((names::PROG_BACKSTOP_LISTEN, "sys_exit_listen"));
    }
    let skipped_returns = attach_backstops(ebpf, &backstops);
    if let Err(err) = &skipped_returns {
        log::info!("kprobe: calls whose kretprobe is skipped are counted as lost, not reported: {err:#}");
        unload_named(ebpf, &[], &[], &[], &[names::PROG_BACKSTOP_BIND, names::PROG_BACKSTOP_LISTEN]);
    }
    Ok(Coverage {
        every_bind_syscall: syscall,
        failed_listen: attached.map_err(|e| format!("{e:#}")),
        inet6_bind,
        skipped_returns: skipped_returns.map_err(|e| format!("{e:#}")),
    })
}

/// Attaches the kprobe backend's backstops (program, syscalls tracepoint): see
/// [`Coverage::skipped_returns`]. Not on a kernel without syscall tracepoints
/// (CONFIG_FTRACE_SYSCALLS off), where kprobe still works without them.
fn attach_backstops(ebpf: &mut Ebpf, backstops: &[(&str, &str)]) -> Result<()> {
    if backstops.is_empty() {
        return Ok(());
    }
    with_tracefs(|| attach_syscall_tracepoints(ebpf, backstops))
}

/// Attaches a backend's optional `__sys_bind` pair. Without it (a kernel whose BTF or
/// symbols lack the function) the backend still works on inet_bind alone, seeing inet binds
/// only: `Ok(false)`, logged, and said by `--check`.
fn attach_optional(ebpf: &mut Ebpf, backend: Backend, attach: impl FnOnce(&mut Ebpf) -> Result<()>) -> bool {
    match attach(ebpf) {
        Ok(()) => true,
        Err(err) => {
            log::info!(
                "{}: no hook on {} ({err:#}): only inet binds are seen, through inet_bind",
                backend.name(),
                names::SYSCALL_BIND_FUNCTION
            );
            unload_syscall_hooks(ebpf, backend);
            false
        }
    }
}

/// Proves with a two-instruction program that this kernel loads fexit programs on the bind
/// functions, before the expensive part (see [`crate::hook_support`]).
fn fexit_supported(function_ids: &[Option<u32>; 2]) -> Result<()> {
    // inet_bind is required; inet6_bind may be in a module's BTF (see Coverage::inet6_bind).
    let (function, id) = (names::INET_BIND_FUNCTIONS[0], function_ids[0]);
    let Some(id) = id else {
        bail!("the kernel's BTF does not describe {function}");
    };
    crate::hook_support::fexit_loadable(function, id)
}

fn attach_fexit(ebpf: &mut Ebpf, btf: &Btf, fd_to_socket: Result<()>) -> Result<Coverage> {
    // __sys_bind first (fexit, then fentry), then the inet_bind hooks: see attach_kprobe.
    let syscall = attach_optional(ebpf, Backend::Fexit, |ebpf| {
        fd_to_socket?;
        let function = names::SYSCALL_BIND_FUNCTION;
        let fexit: &mut FExit = program(ebpf, names::PROG_FEXIT_SYS_BIND)?;
        fexit.load(function, btf).with_context(|| format!("loading fexit on {function} failed"))?;
        fexit.attach().with_context(|| format!("attaching fexit to {function} failed"))?;
        let fentry: &mut FEntry = program(ebpf, names::PROG_FENTRY_SYS_BIND)?;
        fentry.load(function, btf).with_context(|| format!("loading fentry on {function} failed"))?;
        fentry.attach().with_context(|| format!("attaching fentry to {function} failed"))?;
        Ok(())
    });
    let mut inet6_bind = Ok(());
    for (entry, exit, function) in names::PROGS_FEXIT {
        if function == INET6_BIND && !btf_describes(btf, function) {
            inet6_bind =
                Err(format!("{function} is not in /sys/kernel/btf/vmlinux (IPv6 built as a module, or not at all)"));
            continue;
        }
        let fentry: &mut FEntry = program(ebpf, entry)?;
        fentry.load(function, btf).with_context(|| format!("loading fentry on {function} failed"))?;
        fentry.attach().with_context(|| format!("attaching fentry to {function} failed"))?;
        let fexit: &mut FExit = program(ebpf, exit)?;
        fexit.load(function, btf).with_context(|| format!("loading fexit on {function} failed"))?;
        fexit.attach().with_context(|| format!("attaching fexit to {function} failed"))?;
    }
    let function = names::SYSCALL_LISTEN_FUNCTION;
    let attached = (|| -> Result<()> {
        let fexit: &mut FExit = program(ebpf, names::PROG_FEXIT_SYS_LISTEN)?;
        fexit.load(function, btf)?;
        fexit.attach()?;
        let fentry: &mut FEntry = program(ebpf, names::PROG_FENTRY_SYS_LISTEN)?;
        fentry.load(function, btf)?;
        fentry.attach()?;
        Ok(())
    })();
    if let Err(err) = &attached {
        log::info!("fexit: failed listen() calls are not traced: {err:#}");
        unload_listen_hooks(ebpf, Backend::Fexit);
    }
    Ok(Coverage {
        every_bind_syscall: syscall,
        failed_listen: attached.map_err(|e| format!("{e:#}")),
        inet6_bind,
        skipped_returns: Ok(()),
    })
}

/// Does the kernel's BTF describe this function?
fn btf_describes(btf: &Btf, function: &str) -> bool {
    btf.id_by_type_name_kind(function, aya_obj::btf::BtfKind::Func).is_ok()
}

/// Unloads (and so detaches) the named programs of each kind, those that are loaded.
fn unload_named(ebpf: &mut Ebpf, kprobes: &[&str], fentries: &[&str], fexits: &[&str], tracepoints: &[&str]) {
    fn unload<'a, T: 'a>(ebpf: &'a mut Ebpf, name: &str, unload: impl FnOnce(&'a mut T))
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        if let Ok(program) = program::<T>(ebpf, name) {
            unload(program);
        }
    }
    for name in kprobes {
        unload::<KProbe>(ebpf, name, |p| drop(p.unload()));
    }
    for name in fentries {
        unload::<FEntry>(ebpf, name, |p| drop(p.unload()));
    }
    for name in fexits {
        unload::<FExit>(ebpf, name, |p| drop(p.unload()));
    }
    for name in tracepoints {
        unload::<TracePoint>(ebpf, name, |p| drop(p.unload()));
    }
}

/// Unloads a backend's listen() programs.
fn unload_listen_hooks(ebpf: &mut Ebpf, backend: Backend) {
    match backend {
        Backend::Kprobe => {
            unload_named(ebpf, &[names::PROG_KPROBE_SYS_LISTEN, names::PROG_KRETPROBE_SYS_LISTEN], &[], &[], &[]);
        }
        Backend::Fexit => {
            unload_named(ebpf, &[], &[names::PROG_FENTRY_SYS_LISTEN], &[names::PROG_FEXIT_SYS_LISTEN], &[]);
        }
        Backend::Tracepoint => {
            unload_named(ebpf, &[], &[], &[], &[names::PROG_ENTER_LISTEN, names::PROG_EXIT_LISTEN]);
        }
    }
}

/// Unloads a backend's `__sys_bind` programs.
fn unload_syscall_hooks(ebpf: &mut Ebpf, backend: Backend) {
    match backend {
        Backend::Kprobe => {
            unload_named(ebpf, &[names::PROG_KPROBE_SYS_BIND, names::PROG_KRETPROBE_SYS_BIND], &[], &[], &[]);
        }
        Backend::Fexit => {
            unload_named(ebpf, &[], &[names::PROG_FENTRY_SYS_BIND], &[names::PROG_FEXIT_SYS_BIND], &[]);
        }
        Backend::Tracepoint => {}
    }
}

/// Unloads (and so detaches) whatever a failed backend managed to load.
fn unload_backend(ebpf: &mut Ebpf, backend: Backend) {
    match backend {
        Backend::Tracepoint => unload_named(ebpf, &[], &[], &[], &[names::PROG_ENTER, names::PROG_EXIT]),
        Backend::Kprobe => unload_named(
            ebpf,
            &[names::PROG_KPROBE, names::PROG_KRETPROBE],
            &[],
            &[],
            &[names::PROG_BACKSTOP_BIND, names::PROG_BACKSTOP_LISTEN],
        ),
        Backend::Fexit => {
            let (entries, exits): (Vec<&str>, Vec<&str>) =
                names::PROGS_FEXIT.iter().map(|(entry, exit, _)| (*entry, *exit)).unzip();
            unload_named(ebpf, &[], &entries, &exits, &[]);
        }
    }
    unload_syscall_hooks(ebpf, backend);
    unload_listen_hooks(ebpf, backend);
}

fn attach_backend(ebpf: &mut Ebpf, backend: Backend, btf: &mut BtfSource) -> Result<Coverage> {
    let attached = match backend {
        Backend::Fexit => {
            let fd_to_socket = btf.fd_to_socket();
            fexit_supported(&btf.function_ids)
                .and_then(|()| btf.get())
                .and_then(|btf| attach_fexit(ebpf, btf, fd_to_socket))
        }
        Backend::Kprobe => attach_kprobe(ebpf, btf.fd_to_socket()),
        Backend::Tracepoint => btf.fd_to_socket().and_then(|()| attach_tracepoint(ebpf)),
    };
    if attached.is_err() {
        unload_backend(ebpf, backend);
    }
    attached.map_err(crate::load_error::explain)
}

/// The kernel BTF aya's fexit loading needs, parsed on first use: only on kernels that have
/// shown they load fexit programs (two whole-kernel BTF parses at once took peak RSS to
/// ~41 MB, `cargo xtask bench`).
pub struct BtfSource {
    parsed: Option<Btf>,
    /// The bind functions' BTF ids, from bindtrace's own (cheap) BTF reading.
    function_ids: [Option<u32>; 2],
    /// See [`KernelBtf::fd_to_socket`].
    fd_to_socket: std::result::Result<(), String>,
}

impl BtfSource {
    fn new(kernel: &KernelBtf) -> Self {
        Self { parsed: None, function_ids: kernel.bind_function_ids, fd_to_socket: kernel.fd_to_socket.clone() }
    }

    /// The hooks that find a bind's socket from its fd need the walk's members.
    fn fd_to_socket(&self) -> Result<()> {
        self.fd_to_socket.clone().map_err(|why| anyhow!("a bind's socket cannot be found from its fd: {why}"))
    }

    fn get(&mut self) -> Result<&Btf> {
        if self.parsed.is_none() {
            self.parsed = Some(Btf::from_sys_fs().context("fexit needs the kernel's BTF")?);
        }
        self.parsed.as_ref().ok_or_else(|| anyhow!("kernel BTF unavailable"))
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

/// What `bindtrace --check` found out about one backend.
pub struct BackendCheck {
    pub backend: Backend,
    /// Whether it attached, and then what it sees.
    pub result: Result<Coverage>,
    /// `--check --verbose`, once attached: what the test binds made its programs do.
    pub exercised: Option<Result<Exercise>>,
}

/// What one backend's programs did for `--check --verbose`'s two test binds (and whatever
/// else bound on the machine meanwhile).
pub struct Exercise {
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
pub fn check_backends(config: &ProbeConfig, kernel: &KernelBtf, exercise: bool) -> Vec<BackendCheck> {
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

/// The backends `attach` tries, in order.
pub fn candidates(attach: Attach) -> Vec<Backend> {
    match attach {
        Attach::Auto => auto_order().to_vec(),
        Attach::Fexit => vec![Backend::Fexit],
        Attach::Kprobe => vec![Backend::Kprobe],
        Attach::Tracepoint => vec![Backend::Tracepoint],
    }
}

/// A hook on a return (exit tracepoint, kretprobe, fexit): one the kernel skips loses its
/// event. A skipped entry hook shows at its exit instead (no entry), so it is not added; nor
/// is a skipped backstop, which only loses what its kretprobe already reported.
fn is_return_hook(name: &str) -> bool {
    (name.contains("exit") || name.contains("kretprobe")) && !name.contains("backstop")
}

/// The fields of a BPF program's fdinfo that bindtrace reports; absent ones (older kernels,
/// stats off) are 0.
fn parse_program_fdinfo(name: &str, info: &str) -> ProgramStats {
    let field = |key: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    ProgramStats {
        name: name.to_owned(),
        runs: field("run_cnt"),
        run_time_ns: field("run_time_ns"),
        recursion_misses: field("recursion_misses"),
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
    pub fn attach(
        loader: PendingLoader,
        attach: Attach,
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
            if attach == Attach::Auto {
                bail!("this kernel accepts none of bindtrace's hooks ({})", refusals.join("; "));
            }
            bail!("--attach {} (bindtrace --check tells what this kernel supports)", refusals.join("; "));
        };
        if following_tree {
            // After the bind hooks, before the tree's root is added (see `tree`): nothing is
            // followed until then, so the order loses nothing.
            attach_tree_programs(&mut ebpf).context("following the process tree (sched: tracepoints)")?;
        }
        log::debug!("programs loaded and attached in {:?}", started.elapsed());
        mark_attached(&mut ebpf, backend != Backend::Tracepoint && coverage.every_bind_syscall)?;
        log_verifier_work(&ebpf);
        let stats = PerCpuArray::try_from(
            ebpf.take_map(names::STATS).ok_or_else(|| anyhow!("probe has no {} map", names::STATS))?,
        )?;
        Ok(Self { logger, stats, ebpf, backend, coverage })
    }

    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or_else(|| anyhow!("probe has no {} map (already taken?)", names::EVENTS))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The cgroup filter's ids, for the follower that updates them (see `follow`).
    pub fn take_selected_cgroups(&mut self) -> Result<Array<MapData, CgroupSlot>> {
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

    pub fn take_logger(&mut self) -> Option<ProbeLogger> {
        self.logger.take()
    }

    /// Sums the per-CPU counters, adds the return hooks the kernel skipped, and gives the
    /// kernel's own counters of each program (one read of each program's fdinfo for both).
    pub fn counters(&self) -> Result<(KernelCounters, Vec<ProgramStats>)> {
        let programs = program_stats(&self.ebpf);
        let mut counters = KernelCounters::from_sums(&stat_sums(&self.stats)?);
        counters.dropped_recursion =
            programs.iter().filter(|p| is_return_hook(&p.name)).map(|p| p.recursion_misses).sum();
        Ok((counters, programs))
    }
}

/// The probe's counters, summed over the CPUs, in `bindtrace_common::stat` order.
fn stat_sums<T: std::borrow::Borrow<MapData>>(stats: &PerCpuArray<T, u64>) -> Result<[u64; stat::COUNT as usize]> {
    let mut sums = [0u64; stat::COUNT as usize];
    for (index, sum) in (0..stat::COUNT).zip(sums.iter_mut()) {
        *sum = stats.get(&index, 0)?.iter().sum();
    }
    Ok(sums)
}

/// What the kernel counts for each loaded program (runs, run time, recursion misses).
fn program_stats(ebpf: &Ebpf) -> Vec<ProgramStats> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let fd = program.fd().ok()?.as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            Some(parse_program_fdinfo(name, &info))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The embedded object against `common`: a probe built from other sources, for another
    //! arch or with other features than the tracer fails here, not at load time on a user's
    //! machine.

    use bindtrace_common::{FilterConfig, KernelLayout};
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;

    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;

    #[test]
    fn program_fdinfo_gives_runs_time_and_recursion_misses() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tab\nmemlock:\t4096\n\
                    prog_id:\t91\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t3\nverified_insns:\t2530\n";
        let stats = parse_program_fdinfo("bindtrace_fexit_inet_bind", info);
        assert_eq!((stats.runs, stats.run_time_ns, stats.recursion_misses), (789, 123456, 3));
        // A 5.10 kernel has no recursion_misses line: 0, not an error.
        assert_eq!(parse_program_fdinfo("x", "run_time_ns:\t5\nrun_cnt:\t1\n").recursion_misses, 0);
        assert!(is_return_hook("bindtrace_sys_exit_bind") && is_return_hook("bindtrace_kretprobe_sys_bind"));
        assert!(is_return_hook("bindtrace_fexit_inet_bind") && !is_return_hook("bindtrace_fentry_inet_bind"));
        assert!(!is_return_hook("bindtrace_sys_enter_bind") && !is_return_hook("bindtrace_kprobe_sys_bind"));
        assert!(!is_return_hook(names::PROG_BACKSTOP_BIND) && !is_return_hook(names::PROG_BACKSTOP_LISTEN));
    }

    #[test]
    fn maps_and_programs_are_the_ones_the_tracer_uses() {
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
        for name in [names::IN_FLIGHT, names::ENTRIES] {
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
        let mut programs = vec![
            names::PROG_ENTER,
            names::PROG_EXIT,
            names::PROG_KPROBE,
            names::PROG_KRETPROBE,
            names::PROG_BACKSTOP_BIND,
            names::PROG_BACKSTOP_LISTEN,
            names::PROG_TREE_FORK,
            names::PROG_TREE_EXIT,
            names::PROG_TREE_EXEC,
        ];
        programs.extend(names::PROGS_FEXIT.iter().flat_map(|(entry, exit, _)| [*entry, *exit]));
        for program in programs {
            assert!(object.programs.contains_key(program), "the probe has no program {program}");
        }
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
