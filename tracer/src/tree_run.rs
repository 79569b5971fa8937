//! The traced tree in a run (`-- CMD`, `--tree PID`): its root, started once the probe is
//! attached (CMD held at its gate until then), and its end: CMD's status, which bindtrace
//! exits with, and what the tree left running.

use anyhow::Result;

use crate::{app::print_error, command::RunAs, probe::AttachedProbe, summary::Summary};

/// The root of the traced process tree.
pub(crate) enum TreeRoot {
    /// `-- CMD`: started by bindtrace, as `run_as`, with the signal mask `child_mask` and the
    /// open-file limit `fd_limit`.
    Command {
        argv: Vec<std::ffi::OsString>,
        run_as: Option<RunAs>,
        child_mask: Box<nix::sys::signal::SigSet>,
        fd_limit: Option<libc::rlimit>,
    },
    /// `--tree PID`: running already, with this parent; watched for its exit.
    Running { pid: u32, parent: u32, handle: crate::tree::ProcessHandle },
}

/// How a run ended: the exit status (CMD's with `-- CMD`), and the signal that ended CMD,
/// which bindtrace then ends with too.
pub(crate) struct Finished {
    pub(crate) status: u8,
    pub(crate) signal: Option<i32>,
}

impl Finished {
    pub(crate) const OK: Self = Self { status: 0, signal: None };
}

/// The traced tree's root, followed by the kernel: CMD held before exec, or `--tree`'s
/// process.
pub(crate) struct StartedTree {
    pub(crate) tree: crate::tree::FollowedTree,
    /// `-- CMD`, and how it is shown.
    pub(crate) held: Option<(crate::command::Held, String)>,
    pub(crate) root_pid: u32,
}

/// Gives the tree its root in the kernel (for `-- CMD`, forked and held before exec).
pub(crate) fn start_tree(root: TreeRoot, probe: &mut AttachedProbe) -> Result<StartedTree> {
    let map = probe.take_followed()?;
    match root {
        TreeRoot::Command { argv, run_as, child_mask, fd_limit } => {
            let shown = shown_command(&argv);
            let held = crate::command::launch(&argv, run_as.clone(), *child_mask, fd_limit)?;
            let tree = crate::tree::FollowedTree::new(map, held.pid(), std::process::id())?;
            // A command line is text anyone chose: escaped like a process name.
            let escaped = crate::text::for_terminal(&shown);
            crate::say::line(&format!(
                "tracing the binds of `{escaped}` (pid {}{}) and every process it starts",
                held.pid(),
                run_as.as_ref().map(|u| format!(", as {}", u.described)).unwrap_or_default()
            ));
            let root_pid = held.pid();
            Ok(StartedTree { tree, held: Some((held, shown)), root_pid })
        }
        TreeRoot::Running { pid, parent, .. } => {
            let mut tree = crate::tree::FollowedTree::new(map, pid, parent)?;
            let adopted = tree.adopt_descendants();
            crate::say::line(&format!(
                "tracing the binds of process {pid}, the {adopted} processes below it now, and every process they start; \
                 ends when it exits"
            ));
            Ok(StartedTree { tree, held: None, root_pid: pid })
        }
    }
}

/// Lets a held CMD run, its signals relayed. Err(Finished): it could not be run (said on
/// stderr), and bindtrace exits as a shell would.
pub(crate) fn release_command(
    held: Option<(crate::command::Held, String)>,
) -> Result<std::result::Result<Option<(crate::command::Running, String)>, Finished>> {
    let Some((held, shown)) = held else { return Ok(Ok(None)) };
    crate::say::flush();
    match held.release() {
        Ok(running) => {
            // CMD runs now: a relay that cannot start leaves CMD its signals from the
            // terminal, said, rather than abandoning it.
            if let Err(err) = running.relay_signals() {
                crate::say::line(&format!("warning: signals sent to bindtrace will not reach CMD: {err:#}"));
            }
            Ok(Ok(Some((running, shown))))
        }
        Err(failed) => {
            print_error(&failed.why);
            Ok(Err(Finished { status: failed.status, signal: None }))
        }
    }
}

/// CMD as one line for the messages (each argument as the shell would need it quoted).
pub(crate) fn shown_command(argv: &[std::ffi::OsString]) -> String {
    argv.iter()
        .map(|arg| {
            // Quoted as the shell would need it, so not through `text::from_bytes`, whose
            // doubled backslashes would change what is between the quotes.
            let arg = arg.to_string_lossy();
            if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
                arg.into_owned()
            } else {
                format!("'{}'", arg.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The end of a traced tree: CMD's status (waited for when the trace ended first: a CI step
/// must not go on while CMD runs), what still runs, and the tree's part of the report.
pub(crate) async fn end_tree(
    started: StartedTree,
    command: Option<(crate::command::Running, String)>,
    root_exited: bool,
    summary: &Summary,
) -> Result<(Option<crate::summary::TreeReport>, Finished)> {
    let StartedTree { tree, root_pid, .. } = started;
    let mut report = summary.tree_report();
    report.root_pid = root_pid;
    let mut finished = Finished::OK;
    if let Some((running, shown)) = command {
        if !root_exited {
            crate::say::line(&format!("waiting for `{}` (pid {root_pid}) to exit", crate::text::for_terminal(&shown)));
            running.handle().try_clone()?.exited().await?;
        }
        let status = running.status()?;
        let code = crate::command::exit_code(status);
        report.ended = Some(crate::command::describe(status));
        report.exit_status = Some(code);
        report.command = Some(shown);
        finished = Finished { status: code, signal: std::os::unix::process::ExitStatusExt::signal(&status) };
    } else if root_exited {
        report.ended = Some("exited".to_owned());
    }
    // Once CMD is gone: what it left running.
    report.still_running = tree.still_running();
    Ok((Some(report), finished))
}
