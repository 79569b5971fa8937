//! From command line to exit status: validate everything that can be wrong with the user's
//! input (exit 2, one line), then load the probe, run the pipeline and print the report.

use std::{
    io::{self, IsTerminal as _, Write as _},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use bindtrace_common::ProbeConfig;
use clap::{error::ErrorKind, Parser as _};

use crate::{
    cli::{self, Cli, ColorChoice, Command, OutputFormat, WhoArgs},
    clock::{Rfc3339, WallClock},
    config::Config,
    enrich::Enricher,
    filter::EventFilter,
    layout,
    pipeline::{Ending, Pipeline, StopSignals},
    probe::{self, AttachedProbe},
    sink::{file::OutputFile, ndjson::NdjsonSink, table::TableSink, Output, Sink},
    summary::Summary,
    tree_run::{end_tree, release_command, start_tree, Finished, TreeRoot},
    who,
};

/// Exit status for bad input and missing privileges.
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure after the input was accepted (the kernel refused, I/O failed).
pub(crate) const EXIT_FAILURE: u8 = 1;

/// One line on stderr. A longer message (a kernel verifier log) is cut to its first line;
/// the rest goes to the debug log (RUST_LOG=debug).
pub(crate) fn print_error(message: &str) {
    crate::say::flush();
    let mut lines = message.lines();
    let first = lines.next().unwrap_or("");
    let rest: Vec<&str> = lines.collect();
    if rest.is_empty() {
        let _ = writeln!(io::stderr().lock(), "bindtrace: {first}");
    } else {
        log::debug!("{}", rest.join("\n"));
        let _ = writeln!(io::stderr().lock(), "bindtrace: {first} [more with RUST_LOG=debug]");
    }
}

/// Everything decided before anything touches the kernel.
struct Plan {
    config: Config,
    filter: EventFilter,
    format: OutputFormat,
    /// Colour in the table.
    color: bool,
    /// `--metrics`: bound before anything is attached, so a taken port is said at once.
    metrics: Option<std::net::TcpListener>,
    /// `--file`, opened before anything is attached (see [`OutputFile`]).
    file: Option<OutputFile>,
    /// The cgroups of `--container` and `--cgroup`, followed across restarts.
    followed: Vec<crate::filter::SelectedCgroup>,
    /// `-- CMD` or `--tree PID`: the process tree traced.
    tree: Option<TreeRoot>,
    /// With `-- CMD`: the events go to stderr (CMD owns stdout).
    to_stderr: bool,
}

/// `child`: with `-- CMD`, the signal mask and open-file limit CMD gets back.
fn plan(config: Config, child: Option<(nix::sys::signal::SigSet, Option<libc::rlimit>)>) -> Result<Plan> {
    if config.user.is_some() && config.command_line.is_empty() {
        anyhow::bail!("--user says whom CMD runs as: give the command after --, e.g. --user alice -- make test");
    }
    let mut filter = EventFilter::new(&config.selection)?;
    let tree = match (config.tree, child) {
        (Some(pid), _) => {
            let parent = crate::tree::parent_of(pid)?;
            // Now, so that the pid cannot be another process's by the time it is followed.
            let handle =
                crate::tree::ProcessHandle::open(pid).map_err(|_| anyhow::anyhow!("--tree {pid}: no such process"))?;
            Some(TreeRoot::Running { pid, parent, handle })
        }
        (None, Some((child_mask, fd_limit))) => {
            let argv = config.command_line.clone();
            let program = argv.first().ok_or_else(|| anyhow::anyhow!("no command after --"))?;
            crate::command::find_program(program, std::env::var_os("PATH"))?;
            let (run_as, note) = crate::command::run_as(
                config.user.as_deref(),
                std::env::var_os("SUDO_UID"),
                std::env::var_os("SUDO_GID"),
                crate::command::started_by_sudo(),
            )?;
            if let Some(note) = note {
                crate::say::line(&format!("warning: {note}"));
            }
            if let Some(user) = run_as.as_ref().filter(|u| u.uid != nix::unistd::geteuid().as_raw()) {
                if !nix::unistd::geteuid().is_root() {
                    anyhow::bail!("running CMD as {} needs root (run bindtrace with sudo)", user.described);
                }
            }
            Some(TreeRoot::Command { argv, run_as, child_mask: Box::new(child_mask), fd_limit })
        }
        (None, None) => None,
    };
    if tree.is_some() {
        filter.kernel.flags |= bindtrace_common::filter_flags::TREE;
    }
    let to_stderr = matches!(tree, Some(TreeRoot::Command { .. })) && config.file.is_none();
    let followed = filter.scope_to_cgroups(&config.containers, &config.cgroups)?;
    if !followed.is_empty() {
        let described: Vec<&str> = followed.iter().map(|s| s.described.as_str()).collect();
        crate::say::line(&format!("only binds in {} (and below)", described.join(", ")));
    }
    // With `-- CMD` the events go to stderr: decide by what they go to.
    let stdout_is_terminal = if to_stderr { io::stderr().is_terminal() } else { io::stdout().is_terminal() };
    // With `-- CMD` the events share stderr with CMD's: a table is what a person (or a CI
    // log) reads there; NDJSON goes to --file.
    let format = config.format.unwrap_or(if config.file.is_some() || (!stdout_is_terminal && !to_stderr) {
        OutputFormat::Ndjson
    } else {
        OutputFormat::Table
    });
    let file = config.file.as_deref().map(OutputFile::open).transpose()?;
    check_pids(&config.selection.pids)?;
    let no_color_env = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let color = match config.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => config.file.is_none() && stdout_is_terminal && !no_color_env,
    };
    if config.metrics_ports.len() > crate::metrics::PORT_LABELS_MAX {
        anyhow::bail!(
            "--metrics-port takes at most {} ports (each is a label value), got {}",
            crate::metrics::PORT_LABELS_MAX,
            config.metrics_ports.len()
        );
    }
    let metrics = match config.metrics {
        Some(addr) => Some(
            crate::metrics::listen(addr)
                .with_context(|| format!("--metrics {addr}: cannot listen there (is the port taken?)"))?,
        ),
        None => None,
    };
    Ok(Plan { config, filter, format, color, metrics, file, followed, tree, to_stderr })
}

/// `--pid` takes process ids that can exist: one above the system's `pid_max` is bad input.
/// One warning line for each that does not exist now (it matches nothing unless a new
/// process gets that id) or that names a thread (whose binds carry its process's id).
fn check_pids(pids: &[u32]) -> Result<()> {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|v| v.trim().parse::<u32>().ok());
    if let Some((pid, max)) = pid_max.and_then(|max| pids.iter().find(|&&pid| pid >= max).map(|&pid| (pid, max))) {
        anyhow::bail!("--pid {pid} is not a process id here: this system's ids stay below {max} (kernel.pid_max)");
    }
    for &pid in pids {
        let tgid = crate::host::owners::tgid_of(pid);
        match tgid {
            None => crate::say::line(&format!(
                "warning: --pid {pid}: no such process now; it matches only a process that gets this id"
            )),
            Some(tgid) if tgid != pid => crate::say::line(&format!(
                "warning: --pid {pid} is a thread of process {tgid}; --pid matches process ids: use {tgid}"
            )),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The sink, on stdout or on `--file` (created or truncated now, with tracing started).
fn open_sink(plan: &Plan, file: Option<OutputFile>) -> Result<Box<dyn Sink>> {
    let writer: Box<dyn io::Write + Send> = match file {
        Some(file) => Box::new(file.start()?),
        None if plan.to_stderr => Box::new(io::stderr()),
        None => Box::new(io::stdout()),
    };
    // stdout is watched for its reader going away; a --file has no reader to lose, and
    // stderr (with `-- CMD`) is CMD's too.
    let watched = (plan.config.file.is_none() && !plan.to_stderr).then_some(libc::STDOUT_FILENO);
    let writer = crate::sink::writer::ThreadWriter::spawn(writer, watched).context("cannot start the output thread")?;
    let output = Output::new(Box::new(writer));
    Ok(match plan.format {
        OutputFormat::Ndjson => Box::new(NdjsonSink::new(output)),
        OutputFormat::Table => Box::new(
            TableSink::new(output, plan.color)
                .hiding_netlink(!plan.config.show_netlink)
                .showing_tree(plan.filter.kernel.is_active(bindtrace_common::filter_flags::TREE))
                .events_on_stderr(plan.to_stderr),
        ),
        // The summary still goes to stderr, as in the table.
        OutputFormat::None => {
            Box::new(crate::sink::NoEvents::new(TableSink::new(Output::new(Box::new(io::sink())), false)))
        }
    })
}

/// clap's message as one line: its first paragraph, which names what is missing or wrong
/// and the valid values ("the following required arguments were not provided: <PORT>";
/// "invalid value 'xml' for '--output' [possible values: table, ndjson]").
fn clap_error_line(rendered: &str) -> String {
    let paragraph: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.is_empty())
        .filter(|l| !l.starts_with("tip:"))
        .collect();
    let line = paragraph.join(" ");
    let line = line.trim_start_matches("error: ");
    if line.is_empty() {
        "invalid arguments".to_owned()
    } else {
        line.to_owned()
    }
}

/// Opens /dev/null on whichever of fds 0, 1 and 2 is closed (`2>&-`): otherwise the first
/// files bindtrace opens (a BPF map, a netlink socket) would take those numbers, and its
/// messages would be written into them.
fn fill_closed_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only asks whether the fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: a plain open; the lowest free number is the closed one.
            let _ = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// Raises the soft limit on open files to the hard one: runtimes start processes at 1,024,
/// and the lookups (netlink sockets, /proc files, namespaces) and `/metrics` connections must
/// not run out of fds on a busy host. Returns the limit before, which `-- CMD` gets back.
fn raise_fd_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        let before = limit;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        Some(before)
    }
}

pub fn main() -> ExitCode {
    let code = run_main();
    // What is queued for stderr is written before the process ends.
    crate::say::flush();
    code
}

fn run_main() -> ExitCode {
    fill_closed_standard_fds();
    let fd_limit = raise_fd_limit();
    crate::say::init_log();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            print_error(&format!("{} (see bindtrace --help)", clap_error_line(&err.render().to_string())));
            return ExitCode::from(EXIT_USAGE);
        }
    };

    match &cli.command {
        Some(Command::Who(args)) => return who_main(args),
        Some(Command::Completions { shell }) => return write_stdout(|out| cli::write_completions(*shell, out)),
        Some(Command::Man { dir }) => {
            return match cli::write_man_pages(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    print_error(&format!("cannot write the man pages into {}: {err}", dir.display()));
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        None => {}
    }

    if cli.check {
        return crate::check::run(cli.verbose);
    }
    // `bindtrace --` with nothing after it (an empty $CMD) would trace the whole host.
    if cli.command_line.is_empty() && std::env::args_os().skip(1).any(|arg| arg == "--") {
        print_error("no command after --: give the command to run, e.g. bindtrace -- make test");
        return ExitCode::from(EXIT_USAGE);
    }

    // Before any thread exists, so that none of them takes CMD's signals (see `command`).
    let child_mask = if cli.command_line.is_empty() {
        None
    } else {
        match crate::command::block_relayed_signals() {
            Ok(mask) => Some(mask),
            Err(err) => {
                print_error(&format!("{err:#}"));
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    };

    let plan = match plan(Config::from_cli(cli), child_mask.map(|mask| (mask, fd_limit)))
        .and_then(|plan| crate::privileges::check_can_load().map(|()| plan))
    {
        Ok(plan) => plan,
        Err(err) => {
            print_error(&format!("{err:#}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            print_error(&format!("cannot start the runtime: {err}"));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(plan)) {
        Ok(Finished { status, signal }) => {
            if let Some(signal) = signal {
                crate::say::flush();
                crate::command::die_of(signal);
            }
            ExitCode::from(status)
        }
        Err(err) => {
            print_error(&format!("{err:#}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Runs a generator that writes to stdout; a closed pipe is not an error.
fn write_stdout(generate: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> ExitCode {
    match generate(&mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&format!("writing to stdout: {err}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn who_main(args: &WhoArgs) -> ExitCode {
    let netns = match who::prepare(args) {
        Ok(netns) => netns,
        Err(err) => {
            print_error(&format!("{err:#}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match who::run(args, &netns) {
        Ok(who::Verdict::Held) => ExitCode::SUCCESS,
        Ok(who::Verdict::Free) => ExitCode::from(EXIT_FAILURE),
        // Not 1: that says the port is free, and a lookup that failed saw nothing.
        Err(err) => {
            print_error(&format!("{err:#}"));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(mut plan: Plan) -> Result<Finished> {
    let metrics_listener = plan.metrics.take();
    let output_file = plan.file.take();
    let tree_root = plan.tree.take();
    let Plan { config, filter, .. } = &plan;
    let started = std::time::Instant::now();
    let loader = probe::PendingLoader::start();
    let kernel = layout::running_kernel_btf()?;
    let mut probe_config =
        ProbeConfig { layout: kernel.layout, filter: filter.kernel, wakeup_bytes: u64::from(config.ring_bytes / 4) };
    if tree_root.is_some() {
        (probe_config.layout.fork_child_pid, probe_config.layout.exec_old_pid) = crate::tree::record_offsets()?;
    }
    log::debug!("kernel layout from BTF in {:?}", started.elapsed());
    // With `-- CMD` the signals are CMD's (see `command`).
    let signals =
        if matches!(tree_root, Some(TreeRoot::Command { .. })) { StopSignals::none() } else { StopSignals::install()? };
    let mut probe =
        AttachedProbe::attach(loader, config.backend, &kernel, &probe_config, &filter.pids, config.ring_bytes)?;
    log::debug!("probe loaded and attached after {:?}", started.elapsed());
    let tree_handle = match &tree_root {
        Some(TreeRoot::Running { handle, .. }) => Some(handle.try_clone()?),
        _ => None,
    };
    let scope = if plan.followed.is_empty() {
        None
    } else {
        Some(crate::follow::spawn(plan.followed.clone(), probe.take_selected_cgroups()?)?)
    };
    // Only now, with tracing started, is `--file` truncated.
    let mut sink = open_sink(&plan, output_file)?;
    let clock = WallClock::new();
    let mut time = Rfc3339::default();
    let start_ns = clock.now_wall_ns();
    let other_filters = filter.kernel.flags & !bindtrace_common::filter_flags::TREE != 0 || !filter.pids.is_empty();
    crate::say::line(&format!(
        "attached ({}); tracing binds{}.{}",
        probe.backend.name(),
        if other_filters { " matching the filters" } else { "" },
        match &tree_root {
            Some(TreeRoot::Command { .. }) => " The trace ends when CMD exits.",
            Some(TreeRoot::Running { .. }) => " Ctrl-C to stop early.",
            None => " Ctrl-C to stop.",
        }
    ));
    if !probe.coverage.every_bind_syscall {
        crate::say::line(&format!(
            "warning: {} sees inet binds only on this kernel (no hook on __sys_bind): unix binds, EBADF, \
             ENOTSOCK, EFAULT and LSM denials are missed; --attach tracepoint sees them",
            probe.backend.name()
        ));
    }
    if probe.backend != bindtrace_common::Backend::Tracepoint && probe::preempt_rt() {
        crate::say::line(&format!(
            "warning: on this PREEMPT_RT kernel {} can lose binds under load (preempted programs are skipped; \
             kretprobes run out outside bind(2)): each is counted as dropped; --attach tracepoint loses none",
            probe.backend.name()
        ));
    }
    if let Err(why) = &probe.coverage.skipped_returns {
        crate::say::line(&format!(
            "warning: {} cannot report binds whose kretprobe the kernel skips ({why}): with many binds \
             sleeping at once some are counted as dropped; --attach tracepoint loses none",
            probe.backend.name()
        ));
    }
    if let Err(why) = &probe.coverage.inet6_bind {
        crate::say::line(&format!(
            "warning: {} has no hook on inet6_bind ({why}): IPv6 binds that do not come through bind(2) \
             (io_uring, in-kernel) are missed",
            probe.backend.name()
        ));
    }
    if config.diagnoses {
        for limit in crate::enrich::blind_spots() {
            crate::say::line(&format!("warning: {limit}"));
        }
    }
    let mut started_tree = tree_root.map(|root| start_tree(root, &mut probe)).transpose()?;
    // What is being traced comes before the table's header.
    crate::say::flush();
    sink.start().context("writing to the output")?;
    // CMD last, once everything is in place: its first instruction runs traced.
    let command = match release_command(started_tree.as_mut().and_then(|started| started.held.take()))? {
        Ok(command) => command,
        Err(finished) => return Ok(finished),
    };
    let root_exit: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>> =
        match (&command, tree_handle) {
            (Some((running, _)), _) => Some(Box::pin(running.handle().try_clone()?.exited())),
            (_, Some(handle)) => Some(Box::pin(handle.exited())),
            _ => None,
        };
    let metrics = metrics_listener.map(|listener| {
        let metrics = crate::metrics::Metrics::new(probe.backend.name(), &config.metrics_ports);
        if let Ok(addr) = listener.local_addr() {
            crate::say::line(&format!("metrics at http://{addr}/metrics"));
        }
        tokio::spawn(crate::metrics::serve(listener, metrics.registry()));
        metrics
    });

    let mut pipeline = Pipeline {
        filter,
        enricher: Enricher::new(config.diagnoses),
        sink: sink.as_mut(),
        summary: Summary::default(),
        clock,
        limits: config.limits,
        metrics,
        file: config.file.clone(),
        scope,
        root_exit,
    };
    let ending = pipeline.run(&mut probe, signals).await;
    let end_ns = clock.now_wall_ns();
    // Before waiting for CMD (after --count or --duration): the ring is no longer read, and
    // what the kernel drops meanwhile is not the trace's.
    let (counters, programs) = probe.counters().unwrap_or_default();
    // CMD's status, whatever became of the trace: bindtrace exits with it.
    let (tree_report, finished) = match started_tree {
        Some(started) => {
            let root_exited = ending.as_ref().ok() == Some(&Ending::RootExited);
            end_tree(started, command, root_exited, &pipeline.summary).await?
        }
        None => (None, Finished::OK),
    };
    let ending = match ending {
        Ok(ending) => ending,
        // The trace failed; CMD's failure, if it failed, is the one a CI step reports.
        Err(err) if finished.status != 0 => {
            print_error(&format!("{err:#}"));
            return Ok(finished);
        }
        Err(err) => return Err(err),
    };
    if ending == Ending::OutputClosed || !config.summary {
        return Ok(finished);
    }
    let mut report = pipeline.summary.report(
        probe.backend.name(),
        time.format(start_ns),
        time.format(end_ns),
        (end_ns - start_ns) as f64 / 1e9,
        counters,
    );
    report.diagnoses = pipeline.enricher.counters();
    report.programs = programs;
    report.tree = tree_report;
    match pipeline.sink.report(&report) {
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(finished),
        other => other.context("writing the summary").map(|()| finished),
    }
}
