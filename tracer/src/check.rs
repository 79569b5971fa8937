//! `bindtrace --check`: whether this kernel and these privileges can run bindtrace, one line
//! per requirement and per hook, and with `--verbose` each program's kernel counters after two
//! test binds. Exit 0 when some hook attaches.

use std::process::ExitCode;

use anyhow::Result;

use bindtrace_common::ProbeConfig;

use crate::{app::EXIT_FAILURE, layout, probe};

/// `bindtrace --check`: one line per requirement and per hook (`verbose`: and per program, after test
/// binds).
pub(crate) fn run(verbose: bool) -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel: {}", kernel.trim());
    let privileges = crate::privileges::check_can_load();
    println!(
        "privileges (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN): {}",
        privileges.as_ref().map_or_else(|e| format!("no: {e}"), |()| "yes".to_owned())
    );
    let blind_spots = crate::enrich::blind_spots();
    if blind_spots.is_empty() {
        println!("diagnoses: bindtrace has the capabilities to look up every process and network namespace");
    }
    for blind_spot in blind_spots {
        println!("diagnoses: limited: {blind_spot}");
    }
    let kernel = layout::running_kernel_btf();
    println!(
        "BTF ({}): {}",
        layout::VMLINUX_BTF,
        kernel.as_ref().map_or_else(
            |e| format!("no: {e:#}"),
            |kernel| match &kernel.fd_to_socket {
                Ok(()) => "yes, every struct member resolved".to_owned(),
                Err(why) =>
                    format!("yes, but {why}: the tracepoint backend cannot attach, the others see inet binds only"),
            }
        )
    );
    if let Ok(kernel) = &kernel {
        for helper in &layout::OPTIONAL_HELPERS {
            let has = kernel.layout.has_helper(helper.bit);
            println!(
                "BPF helper bpf_{} (Linux {}): {}",
                helper.name,
                helper.since,
                if has { "yes" } else { "no (bindtrace takes the slower path older kernels need)" }
            );
        }
    }
    let (Ok(()), Ok(kernel)) = (privileges, kernel) else {
        println!("hooks: not tried (see above)");
        return ExitCode::from(EXIT_FAILURE);
    };
    let config =
        ProbeConfig { layout: kernel.layout, filter: bindtrace_common::FilterConfig::accept_all(), wakeup_bytes: 0 };
    let checks = probe::check_backends(&config, &kernel, verbose);
    let order: Vec<&str> = probe::auto_order().iter().map(|b| b.name()).collect();
    println!(
        "attach auto tries: {}{}",
        order.join(", "),
        if probe::preempt_rt() {
            " (PREEMPT_RT: BPF programs are preemptible here: fexit loses binds under load, and kprobe can outside \
             bind(2), counted as dropped; the tracepoints do not)"
        } else {
            ""
        }
    );
    // The object holds the ring buffer: loading it at all proves BPF_MAP_TYPE_RINGBUF.
    let ring = checks.iter().any(|c| match &c.result {
        Ok(_) => true,
        Err(err) => !err.to_string().starts_with("loading the eBPF object failed"),
    });
    println!("ring buffer: {}", if ring { "yes" } else { "no (the object did not load)" });
    println!(
        "process tree (-- CMD, --tree PID): {}",
        match crate::tree::record_offsets() {
            Ok((offset, _)) => format!(
                "yes (sched:sched_process_fork, _exec and _exit; child_pid at offset {offset} of the fork record)"
            ),
            Err(err) => format!("no: {err:#}"),
        }
    );
    for check in &checks {
        match &check.result {
            Ok(coverage) => {
                println!("hook {}: yes", check.backend.name());
                println!(
                    "hook {} sees: {}",
                    check.backend.name(),
                    match (check.backend, coverage.every_bind_syscall) {
                        (bindtrace_common::Backend::Tracepoint, _) => {
                            "every bind(2) of 64-bit processes (not 32-bit compat callers, not io_uring)"
                        }
                        (_, true) => "every bind(2) (__sys_bind), and io_uring and in-kernel binds (inet_bind)",
                        (_, false) => "inet binds only (inet_bind: no __sys_bind on this kernel)",
                    }
                );
                println!(
                    "hook {} traces failed listen(): {}",
                    check.backend.name(),
                    coverage.failed_listen.as_ref().map_or_else(|why| format!("no: {why}"), |()| "yes".to_owned())
                );
                if check.backend != bindtrace_common::Backend::Tracepoint {
                    println!(
                        "hook {} on inet6_bind (IPv6 binds outside bind(2): io_uring, in-kernel): {}",
                        check.backend.name(),
                        coverage.inet6_bind.as_ref().map_or_else(|why| format!("no: {why}"), |()| "yes".to_owned())
                    );
                }
                if check.backend == bindtrace_common::Backend::Kprobe {
                    println!(
                        "hook kprobe reports bind(2) calls whose kretprobe the kernel skips (many sleeping at once): {}",
                        coverage.skipped_returns.as_ref().map_or_else(
                            |why| format!("no, they are counted as dropped: {why}"),
                            |()| "yes, from the syscall exit tracepoints".to_owned()
                        )
                    );
                }
                println!("hook {} costs other processes: {}", check.backend.name(), collateral_cost(check.backend));
                if let Some(exercised) = &check.exercised {
                    print_exercise(check.backend, exercised);
                }
            }
            Err(err) => println!("hook {}: no: {err:#}", check.backend.name()),
        }
    }
    if checks.iter().any(|c| c.result.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

/// `--check --verbose`: what one backend's programs did for the test binds.
fn print_exercise(backend: bindtrace_common::Backend, exercised: &Result<probe::Exercise>) {
    let name = backend.name();
    let exercise = match exercised {
        Ok(exercise) => exercise,
        Err(err) => {
            println!("hook {name} test binds: not made: {err:#}");
            return;
        }
    };
    let counters = &exercise.counters;
    println!(
        "hook {name} test binds (127.0.0.1:{} twice, the second refused): the probe saw {} bind exits and emitted {} \
         (binds elsewhere on this machine meanwhile count too); {} lost",
        exercise.port,
        counters.seen,
        counters.emitted,
        counters.dropped()
    );
    if let Err(why) = &exercise.run_stats {
        println!("hook {name} run statistics: not counted ({why}; Linux 5.8+, or sysctl kernel.bpf_stats_enabled=1)");
    }
    for (program, instructions) in &exercise.programs {
        let per_run =
            program.run_time_ns.checked_div(program.runs).map(|ns| format!(" ({ns} ns a run)")).unwrap_or_default();
        let verified = instructions.map(|n| format!(", {n} instructions verified")).unwrap_or_default();
        println!(
            "hook {name} program {}: {} runs, {} ns in all{per_run}, {} recursion misses{verified}",
            program.name, program.runs, program.run_time_ns, program.recursion_misses
        );
    }
}

/// What staying attached costs processes that never bind, per backend, from the measurements
/// in docs/PERFORMANCE.md (`cargo xtask bench --parts collateral` on the reference machine;
/// the VM matrix's emulated figures for the hooks that machine refuses).
fn collateral_cost(backend: bindtrace_common::Backend) -> &'static str {
    match backend {
        bindtrace_common::Backend::Tracepoint => {
            "every syscall of every process takes the traced path while attached (a getppid loop kept 0.80 of its \
             untraced rate, +45 ns a call, on the reference machine; docs/PERFORMANCE.md)"
        }
        bindtrace_common::Backend::Fexit | bindtrace_common::Backend::Kprobe => {
            "only bind(), listen() and inet_bind run its programs; other syscalls are not hooked (not measured on \
             real hardware: the reference machine refuses this hook; emulated figures in docs/PERFORMANCE.md)"
        }
    }
}
