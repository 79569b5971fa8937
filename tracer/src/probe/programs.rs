//! Each backend's programs as one table (what is required, what is optional, where each
//! attaches), and the three loops that use it: attach, unload, and the test that every
//! program in the object is in a table and every table entry in the object.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    programs::{FEntry, FExit, KProbe, TracePoint},
    Ebpf,
};
use bindtrace_common::{names, Backend};

use super::{loader::BtfSource, tracefs::with_tracefs, Coverage};

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hook {
    /// A tracepoint: (category, name).
    Tracepoint(&'static str, &'static str),
    /// A kprobe or kretprobe on each of these kernel functions (the program says which).
    Kprobe(&'static [&'static str]),
    Fentry(&'static str),
    Fexit(&'static str),
}

/// One program of the probe and where it attaches.
#[derive(Clone, Copy, Debug)]
pub(super) struct Program {
    pub(super) name: &'static str,
    pub(super) hook: Hook,
}

const fn program(name: &'static str, hook: Hook) -> Program {
    Program { name, hook }
}

/// A backend's programs, each group attached in its order (which hook of a pair goes first
/// decides whether a call under way meanwhile is counted at its exit or overwritten by the
/// thread's next entry).
pub(super) struct BackendPrograms {
    pub(super) backend: Backend,
    /// The `__sys_bind` hooks: every bind(2), whatever the family and outcome. Optional for
    /// the inet_bind backends (without them they see inet binds only, through inet_bind);
    /// attached first, so that while the rest attach every bind(2) is already seen once.
    pub(super) syscall_bind: &'static [Program],
    /// The bind hooks the backend cannot work without.
    pub(super) required: &'static [Program],
    /// Failed listen() calls: optional.
    pub(super) listen: &'static [Program],
    /// The kprobe backend's reports of bind(2) and listen(2) calls whose kretprobe the
    /// kernel skipped, on the syscalls' exit tracepoints: (program, attached when this group
    /// attached). Optional: without them those calls are counted as lost.
    pub(super) backstops: &'static [(Program, Group)],
}

/// A group of a backend's programs, as [`BackendPrograms::backstops`] names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Group {
    SyscallBind,
    Listen,
}

const INET6_BIND: &str = "inet6_bind";

pub(super) const TRACEPOINT: BackendPrograms = BackendPrograms {
    backend: Backend::Tracepoint,
    syscall_bind: &[],
    required: &[
        program(names::PROG_ENTER_BIND, Hook::Tracepoint("syscalls", "sys_enter_bind")),
        program(names::PROG_EXIT_BIND, Hook::Tracepoint("syscalls", "sys_exit_bind")),
    ],
    listen: &[
        program(names::PROG_ENTER_LISTEN, Hook::Tracepoint("syscalls", "sys_enter_listen")),
        program(names::PROG_EXIT_LISTEN, Hook::Tracepoint("syscalls", "sys_exit_listen")),
    ],
    backstops: &[],
};

pub(super) const KPROBE: BackendPrograms = BackendPrograms {
    backend: Backend::Kprobe,
    syscall_bind: &[
        program(names::PROG_KRETPROBE_SYS_BIND, Hook::Kprobe(&[names::SYSCALL_BIND_FUNCTION])),
        program(names::PROG_KPROBE_SYS_BIND, Hook::Kprobe(&[names::SYSCALL_BIND_FUNCTION])),
    ],
    required: &[
        program(names::PROG_KRETPROBE_INET_BIND, Hook::Kprobe(&names::INET_BIND_FUNCTIONS)),
        program(names::PROG_KPROBE_INET_BIND, Hook::Kprobe(&names::INET_BIND_FUNCTIONS)),
    ],
    listen: &[
        program(names::PROG_KRETPROBE_SYS_LISTEN, Hook::Kprobe(&[names::SYSCALL_LISTEN_FUNCTION])),
        program(names::PROG_KPROBE_SYS_LISTEN, Hook::Kprobe(&[names::SYSCALL_LISTEN_FUNCTION])),
    ],
    backstops: &[
        (program(names::PROG_BACKSTOP_BIND, Hook::Tracepoint("syscalls", "sys_exit_bind")), Group::SyscallBind),
        (program(names::PROG_BACKSTOP_LISTEN, Hook::Tracepoint("syscalls", "sys_exit_listen")), Group::Listen),
    ],
};

pub(super) const FEXIT: BackendPrograms = BackendPrograms {
    backend: Backend::Fexit,
    syscall_bind: &[
        program(names::PROG_FEXIT_SYS_BIND, Hook::Fexit(names::SYSCALL_BIND_FUNCTION)),
        program(names::PROG_FENTRY_SYS_BIND, Hook::Fentry(names::SYSCALL_BIND_FUNCTION)),
    ],
    required: &[
        program(names::PROG_FENTRY_INET_BIND, Hook::Fentry("inet_bind")),
        program(names::PROG_FEXIT_INET_BIND, Hook::Fexit("inet_bind")),
        program(names::PROG_FENTRY_INET6_BIND, Hook::Fentry(INET6_BIND)),
        program(names::PROG_FEXIT_INET6_BIND, Hook::Fexit(INET6_BIND)),
    ],
    listen: &[
        program(names::PROG_FEXIT_SYS_LISTEN, Hook::Fexit(names::SYSCALL_LISTEN_FUNCTION)),
        program(names::PROG_FENTRY_SYS_LISTEN, Hook::Fentry(names::SYSCALL_LISTEN_FUNCTION)),
    ],
    backstops: &[],
};

/// The process tree's programs (`-- CMD`, `--tree PID`), beside any backend: exit and exec
/// first, so that nothing the fork program adds outlives its process.
pub(super) const TREE: [Program; 3] = [
    program(names::PROG_TREE_EXIT, Hook::Tracepoint("sched", "sched_process_exit")),
    program(names::PROG_TREE_EXEC, Hook::Tracepoint("sched", "sched_process_exec")),
    program(names::PROG_TREE_FORK, Hook::Tracepoint("sched", "sched_process_fork")),
];

#[cfg(test)]
pub(super) const BACKENDS: [&BackendPrograms; 3] = [&TRACEPOINT, &KPROBE, &FEXIT];

fn programs_of(backend: Backend) -> &'static BackendPrograms {
    match backend {
        Backend::Tracepoint => &TRACEPOINT,
        Backend::Kprobe => &KPROBE,
        Backend::Fexit => &FEXIT,
    }
}

fn typed<'a, T: 'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("probe has no program {name}"))?;
    Ok(program.try_into()?)
}

/// What attaching a group found: an inet6_bind hook that did not attach (IPv6 a module not
/// loaded, or not in the vmlinux BTF) is said, not fatal.
#[derive(Default)]
struct Attached {
    inet6_bind: Option<String>,
}

/// Loads and attaches `group` in order; the first failure ends it (the caller unloads).
/// `btf`: the kernel's, for fentry/fexit.
fn attach_group(ebpf: &mut Ebpf, group: &[Program], mut btf: Option<&mut BtfSource>) -> Result<Attached> {
    let mut attached = Attached::default();
    let mut run = |ebpf: &mut Ebpf| -> Result<()> {
        for program in group {
            let name = program.name;
            match program.hook {
                Hook::Tracepoint(category, tracepoint) => {
                    let tp: &mut TracePoint = typed(ebpf, name)?;
                    tp.load().with_context(|| format!("loading the {tracepoint} program failed"))?;
                    tp.attach(category, tracepoint)
                        .with_context(|| format!("attaching to {category}:{tracepoint} failed"))?;
                }
                Hook::Kprobe(functions) => {
                    let probe: &mut KProbe = typed(ebpf, name)?;
                    probe.load().with_context(|| format!("loading {name} failed"))?;
                    for &function in functions {
                        match probe.attach(function, 0) {
                            Ok(_) => {}
                            // IPv6 may be a module that is not loaded: the rest still works.
                            Err(err) if function == INET6_BIND => {
                                let err =
                                    anyhow::Error::new(err).context(format!("attaching a kprobe to {function} failed"));
                                attached.inet6_bind = Some(format!("{err:#}"));
                            }
                            Err(err) => {
                                return Err(err).with_context(|| format!("attaching a kprobe to {function} failed"))
                            }
                        }
                    }
                }
                Hook::Fentry(function) | Hook::Fexit(function) => {
                    let btf = btf.as_deref_mut().ok_or_else(|| anyhow!("{name} needs the kernel's BTF"))?;
                    if function == INET6_BIND && !btf.describes(function)? {
                        attached.inet6_bind = Some(format!(
                            "{function} is not in /sys/kernel/btf/vmlinux (IPv6 built as a module, or not at all)"
                        ));
                        continue;
                    }
                    let kind = if matches!(program.hook, Hook::Fentry(_)) { "fentry" } else { "fexit" };
                    let btf = btf.get()?;
                    if let Hook::Fentry(_) = program.hook {
                        let fentry: &mut FEntry = typed(ebpf, name)?;
                        fentry.load(function, btf).with_context(|| format!("loading {kind} on {function} failed"))?;
                        fentry.attach().with_context(|| format!("attaching {kind} to {function} failed"))?;
                    } else {
                        let fexit: &mut FExit = typed(ebpf, name)?;
                        fexit.load(function, btf).with_context(|| format!("loading {kind} on {function} failed"))?;
                        fexit.attach().with_context(|| format!("attaching {kind} to {function} failed"))?;
                    }
                }
            }
        }
        Ok(())
    };
    if group.iter().any(|p| matches!(p.hook, Hook::Tracepoint(..))) {
        // aya reads tracepoint ids from tracefs, mounted privately when the host has not.
        with_tracefs(|| run(ebpf))?;
    } else {
        run(ebpf)?;
    }
    Ok(attached)
}

/// Unloads (and so detaches) the programs of `group` that are loaded.
fn unload_group(ebpf: &mut Ebpf, group: impl IntoIterator<Item = Program>) {
    for program in group {
        let name = program.name;
        match program.hook {
            Hook::Tracepoint(..) => drop(typed::<TracePoint>(ebpf, name).map(|p| p.unload())),
            Hook::Kprobe(_) => drop(typed::<KProbe>(ebpf, name).map(|p| p.unload())),
            Hook::Fentry(_) => drop(typed::<FEntry>(ebpf, name).map(|p| p.unload())),
            Hook::Fexit(_) => drop(typed::<FExit>(ebpf, name).map(|p| p.unload())),
        }
    }
}

/// Unloads everything a backend may have loaded.
fn unload_backend(ebpf: &mut Ebpf, programs: &BackendPrograms) {
    let groups = [programs.syscall_bind, programs.required, programs.listen];
    unload_group(ebpf, groups.into_iter().flatten().copied().chain(programs.backstops.iter().map(|(p, _)| *p)));
}

/// Attaches an optional group; on failure it is unloaded, logged, and its reason kept.
fn attach_optional(
    ebpf: &mut Ebpf,
    group: &[Program],
    btf: Option<&mut BtfSource>,
    what: &str,
    backend: Backend,
) -> std::result::Result<Attached, String> {
    if group.is_empty() {
        return Err("this backend has no such hook".to_owned());
    }
    attach_group(ebpf, group, btf).map_err(|err| {
        log::info!("{}: {what} ({err:#})", backend.name());
        unload_group(ebpf, group.iter().copied());
        format!("{err:#}")
    })
}

/// Without the kprobe PMU (CONFIG_KPROBES off) attaching cannot work: said before the
/// verifier runs.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// Attaches `backend`'s programs; on failure, whatever it loaded is unloaded again.
pub(super) fn attach_backend(ebpf: &mut Ebpf, backend: Backend, btf: &mut BtfSource) -> Result<Coverage> {
    let attached = attach_programs(ebpf, programs_of(backend), btf);
    if attached.is_err() {
        unload_backend(ebpf, programs_of(backend));
    }
    attached.map_err(crate::load_error::explain)
}

fn attach_programs(ebpf: &mut Ebpf, programs: &BackendPrograms, btf: &mut BtfSource) -> Result<Coverage> {
    let backend = programs.backend;
    // The hooks that find a bind's socket from its fd need the walk's members (every
    // backend's syscall hooks do; the tracepoint backend has only those).
    match backend {
        Backend::Tracepoint => btf.fd_to_socket()?,
        Backend::Kprobe if !Path::new(KPROBE_PMU).exists() => {
            bail!("this kernel has no kprobes ({KPROBE_PMU} is missing)")
        }
        Backend::Fexit => {
            btf.fexit_supported()?;
            // Parsed now, once: a parse that fails fails the backend, not first its
            // optional `__sys_bind` group.
            btf.get()?;
        }
        Backend::Kprobe => {}
    }
    let needs_btf = backend == Backend::Fexit;
    let syscall_bind = match btf.fd_to_socket() {
        _ if programs.syscall_bind.is_empty() => Ok(Attached::default()),
        Err(err) => {
            log::info!("{}: only inet binds are seen, through inet_bind ({err:#})", backend.name());
            Err(format!("{err:#}"))
        }
        Ok(()) => attach_optional(
            ebpf,
            programs.syscall_bind,
            needs_btf.then_some(&mut *btf),
            &format!("no hook on {}: only inet binds are seen, through inet_bind", names::SYSCALL_BIND_FUNCTION),
            backend,
        ),
    };
    let required = attach_group(ebpf, programs.required, needs_btf.then_some(&mut *btf))?;
    let listen = attach_optional(
        ebpf,
        programs.listen,
        needs_btf.then_some(&mut *btf),
        "failed listen() calls are not traced",
        backend,
    );
    let backstops: Vec<Program> = programs
        .backstops
        .iter()
        .filter(|(_, group)| match group {
            Group::SyscallBind => syscall_bind.is_ok(),
            Group::Listen => listen.is_ok(),
        })
        .map(|(program, _)| *program)
        .collect();
    let skipped_returns = if backstops.is_empty() {
        Ok(())
    } else {
        attach_optional(
            ebpf,
            &backstops,
            None,
            "calls whose kretprobe is skipped are counted as lost, not reported",
            backend,
        )
        .map(drop)
    };
    Ok(Coverage {
        every_bind_syscall: backend == Backend::Tracepoint || syscall_bind.is_ok(),
        failed_listen: listen.map(drop),
        inet6_bind: match required.inet6_bind {
            Some(why) if backend != Backend::Tracepoint => Err(why),
            _ => Ok(()),
        },
        skipped_returns,
    })
}

/// The process tree's programs: see [`TREE`].
pub(super) fn attach_tree(ebpf: &mut Ebpf) -> Result<()> {
    attach_group(ebpf, &TREE, None).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program the object has is in a table, and every table's program is in the
    /// object: a renamed or added program fails here, not at attach time on a user's host.
    #[test]
    fn every_program_of_the_object_is_in_one_table() {
        let object = aya_obj::Object::parse(super::super::PROBE_OBJECT).expect("the embedded probe parses");
        let mut tabled: Vec<&str> = BACKENDS
            .iter()
            .flat_map(|b| {
                [b.syscall_bind, b.required, b.listen]
                    .into_iter()
                    .flatten()
                    .copied()
                    .chain(b.backstops.iter().map(|(p, _)| *p))
                    .collect::<Vec<_>>()
            })
            .chain(TREE)
            .map(|p| p.name)
            .collect();
        tabled.sort_unstable();
        let before = tabled.len();
        tabled.dedup();
        assert_eq!(before, tabled.len(), "a program is in two tables");
        let mut in_object: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        assert_eq!(tabled, in_object);
    }
}
