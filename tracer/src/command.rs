//! `bindtrace -- CMD`: the command bindtrace starts, as whom, and how it ends.
//!
//! CMD is forked at once but held before exec at a gate (a pipe) until the probe is attached
//! and its pid is the followed tree's root: nothing it does runs untraced. It runs as the
//! user who ran sudo, keeps the terminal and bindtrace's process group (so Ctrl-C and job
//! control reach it as they would without bindtrace), and its exit status becomes
//! bindtrace's. bindtrace blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT and takes them on a
//! thread of its own: one the terminal sent has reached CMD already and is left to it; one a
//! process sent (a CI runner's timeout, `kill`) is passed on to CMD.

use std::{
    ffi::{CString, OsString},
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, process::CommandExt as _, process::ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    thread::JoinHandle,
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    sys::signal::{SigSet, SigmaskHow, Signal},
    unistd::{Gid, Uid, User},
};

use crate::tree::ProcessHandle;

/// The signals bindtrace takes on CMD's behalf.
const RELAYED: [Signal; 4] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT];

/// `si_code` of a signal the kernel sent: the terminal's (Ctrl-C, Ctrl-\, a hangup).
const SI_KERNEL: i32 = 0x80;

/// Blocks the relayed signals in this thread, and so in every thread it starts: call it
/// first, before any thread exists. Returns the mask CMD gets back before exec.
pub(crate) fn block_relayed_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    for signal in RELAYED {
        set.add(signal);
    }
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
        .context("blocking SIGINT, SIGTERM, SIGHUP and SIGQUIT")?;
    Ok(old)
}

/// Who CMD runs as: ids and groups resolved before the fork (the user database is not
/// read in the child, between fork and exec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    /// "alice (uid 1000)" for the messages.
    pub(crate) described: String,
    /// The user's name and home, for CMD's `USER`, `LOGNAME` and `HOME` (sudo left root's).
    name: Option<String>,
    home: Option<PathBuf>,
}

/// Is bindtrace's parent sudo? Only then do `SUDO_UID` and `SUDO_GID` say who asked: a root
/// shell started by `sudo -i` or `sudo -s` passes them on to everything it runs.
pub(crate) fn started_by_sudo() -> bool {
    let parent = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        // The fields after the command name, which may hold spaces and parentheses.
        let after = stat.rsplit_once(')')?.1.to_owned();
        after.split_whitespace().nth(1)?.parse::<u32>().ok()
    });
    parent
        .and_then(|ppid| std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok())
        .is_some_and(|comm| comm.trim() == "sudo")
}

/// `--user`; or the user who ran sudo (`SUDO_UID`, `SUDO_GID`) when sudo started bindtrace
/// (`by_sudo`); or nobody else (`None`: CMD runs as bindtrace does, root without sudo). The
/// second value is a note for stderr: the sudo variables were set, but not by a sudo that
/// started bindtrace.
pub(crate) fn run_as(
    user: Option<&str>,
    sudo_uid: Option<OsString>,
    sudo_gid: Option<OsString>,
    by_sudo: bool,
) -> Result<(Option<RunAs>, Option<String>)> {
    if let Some(user) = user {
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .with_context(|| format!("--user {user}: cannot read the user database"))?;
        let Some(found) = found else {
            bail!("--user {user}: no such user here (a name from /etc/passwd, or a uid)");
        };
        return Ok((Some(for_user(found.uid.as_raw(), found.gid.as_raw(), Some(&found))), None));
    }
    let Some(uid) = sudo_uid else { return Ok((None, None)) };
    if !by_sudo {
        let note = format!(
            "SUDO_UID={} is set, but sudo did not start bindtrace (a shell from sudo -i or sudo -s?): CMD runs as \
             root; --user USER runs it as someone else",
            uid.to_string_lossy()
        );
        return Ok((None, Some(note)));
    }
    let parse = |name: &str, value: &OsString| {
        value
            .to_str()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or_else(|| anyhow!("{name}={} is not a number: run CMD as a user with --user", value.to_string_lossy()))
    };
    let uid = parse("SUDO_UID", &uid)?;
    if uid == 0 {
        return Ok((None, None));
    }
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let gid = match &sudo_gid {
        Some(gid) => parse("SUDO_GID", gid)?,
        None => user.as_ref().map(|u| u.gid.as_raw()).ok_or_else(|| {
            anyhow!("SUDO_UID={uid} has no SUDO_GID and no entry in the user database: say who with --user")
        })?,
    };
    Ok((Some(for_user(uid, gid, user.as_ref())), None))
}

/// A user's groups: its own, and the supplementary ones the database gives its name (none for
/// a uid without an entry).
fn for_user(uid: u32, gid: u32, user: Option<&User>) -> RunAs {
    let name = user.map(|u| u.name.clone());
    let mut groups = vec![gid];
    if let Some(list) = name
        .as_deref()
        .and_then(|name| CString::new(name).ok())
        .and_then(|name| nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).ok())
    {
        for group in list {
            if !groups.contains(&group.as_raw()) {
                groups.push(group.as_raw());
            }
        }
    }
    let described = match &name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    RunAs { uid, gid, groups, described, name, home: user.map(|u| u.dir.clone()) }
}

/// The program CMD names, found as exec will find it: a path, or a name in `PATH`. Missing
/// or not executable is bad input (exit 2, before anything is attached).
pub(crate) fn find_program(program: &std::ffi::OsStr, path: Option<OsString>) -> Result<PathBuf> {
    let shown = program.to_string_lossy();
    if program.is_empty() {
        bail!("CMD is empty: give the command after --, e.g. bindtrace -- make test");
    }
    let executable = |candidate: &Path| {
        nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok() && candidate.is_file()
    };
    if program.as_bytes().contains(&b'/') {
        let candidate = PathBuf::from(program);
        if !candidate.exists() {
            bail!("{shown}: no such file (CMD after --)");
        }
        if !executable(&candidate) {
            bail!("{shown}: not an executable file (CMD after --)");
        }
        return Ok(candidate);
    }
    let path = path.unwrap_or_else(|| OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|c| executable(c))
        .ok_or_else(|| anyhow!("{shown}: command not found in PATH ({}); give its path", path.to_string_lossy()))
}

/// CMD forked and waiting at the gate. Dropped without [`Held::release`], the child exits
/// without running CMD (its read of the gate ends).
pub(crate) struct Held {
    pid: u32,
    gate: OwnedFd,
    spawner: JoinHandle<io::Result<Child>>,
    program: String,
}

/// Forks CMD. The child tells its pid through one pipe and waits on another (both close on
/// exec); once released it takes the user's groups and ids, gets the signal mask bindtrace
/// had, and execs.
pub(crate) fn launch(
    argv: &[OsString],
    run_as: Option<RunAs>,
    child_mask: SigSet,
    fd_limit: Option<libc::rlimit>,
) -> Result<Held> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command after --"))?;
    let (pid_read, pid_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making a pipe")?;
    let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making a pipe")?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    // The environment sudo left, but the user's own name and home: tools that write to
    // ~/.cache as alice must not be pointed at /root.
    if let Some(user) = &run_as {
        if let Some(name) = &user.name {
            command.env("USER", name).env("LOGNAME", name);
        }
        if let Some(home) = &user.home {
            command.env("HOME", home);
        }
    }
    let (pid_fd, gate_fd) = (pid_write.as_raw_fd(), gate_read.as_raw_fd());
    // bindtrace's ends, which the fork copies: closed in the child at once, or its read of
    // the gate would never see the end of a bindtrace that gave up.
    let (parent_ends, gate_end) = (pid_read.as_raw_fd(), gate_write.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe calls (close, getpid, write, read, setgroups, setgid, setuid,
    // pthread_sigmask, setrlimit) on values prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            libc::close(parent_ends);
            libc::close(gate_end);
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(pid_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut go = 0u8;
            loop {
                match libc::read(gate_fd, (&raw mut go).cast(), 1) {
                    1 => break,
                    -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
                    // bindtrace gave up (it could not attach): CMD never runs.
                    _ => return Err(io::Error::from_raw_os_error(libc::ECANCELED)),
                }
            }
            if let Some(user) = &run_as {
                if libc::setgroups(user.groups.len(), user.groups.as_ptr()) != 0
                    || libc::setgid(user.gid) != 0
                    || libc::setuid(user.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::pthread_sigmask(libc::SIG_SETMASK, child_mask.as_ref(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The open-file limit CMD would have had: bindtrace raised its own.
            if let Some(limit) = &fd_limit {
                libc::setrlimit(libc::RLIMIT_NOFILE, limit);
            }
            Ok(())
        });
    }
    // spawn() returns only once the child has exec'd (or failed to), so it waits on a thread
    // of its own while the pid comes through the pipe.
    let spawner = std::thread::Builder::new()
        .name("bindtrace-cmd".into())
        .spawn(move || {
            let spawned = command.spawn();
            drop((pid_write, gate_read));
            spawned
        })
        .context("starting the thread that runs CMD")?;
    let mut pid = [0u8; 4];
    let mut pipe = std::fs::File::from(pid_read);
    if let Err(err) = pipe.read_exact(&mut pid) {
        drop(gate_write);
        return Err(match spawner.join() {
            Ok(Err(spawn)) => anyhow!(spawn),
            _ => anyhow!(err),
        })
        .with_context(|| format!("cannot start {}", program.to_string_lossy()));
    }
    let pid = u32::from_ne_bytes(pid);
    Ok(Held { pid, gate: gate_write, spawner, program: program.to_string_lossy().into_owned() })
}

impl Held {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets CMD exec. An exec that fails is CMD's failure: 127 when it is not found, 126
    /// otherwise, as shells say it.
    pub(crate) fn release(self) -> Result<Running, Failed> {
        let go = nix::unistd::write(&self.gate, &[1u8]);
        let spawned = self.spawner.join();
        drop(self.gate);
        let child = match (go, spawned) {
            (_, Ok(Ok(child))) => child,
            (_, Ok(Err(err))) => {
                let status = if err.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
                return Err(Failed { status, why: format!("cannot run {}: {err}", self.program) });
            }
            (_, Err(_)) => return Err(Failed { status: 126, why: "the thread that runs CMD panicked".to_owned() }),
        };
        let handle = ProcessHandle::open(self.pid).map_err(|err| Failed { status: 126, why: format!("{err:#}") })?;
        Ok(Running { child, handle })
    }
}

/// CMD could not be run; bindtrace exits with `status`.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) status: u8,
    pub(crate) why: String,
}

/// CMD, running.
pub(crate) struct Running {
    child: Child,
    handle: ProcessHandle,
}

impl Running {
    pub(crate) fn handle(&self) -> &ProcessHandle {
        &self.handle
    }

    /// Passes the relayed signals a process sends bindtrace on to CMD, for as long as
    /// bindtrace runs (through the pidfd: never to a process that reused CMD's pid).
    pub(crate) fn relay_signals(&self) -> Result<()> {
        let target = self.handle.try_clone()?;
        let mut set = SigSet::empty();
        for signal in RELAYED {
            set.add(signal);
        }
        std::thread::Builder::new()
            .name("bindtrace-signals".into())
            .spawn(move || loop {
                let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::uninit();
                // SAFETY: sigwaitinfo with a valid set (blocked in every thread) and a buffer.
                let signal = unsafe { libc::sigwaitinfo(set.as_ref(), info.as_mut_ptr()) };
                if signal < 0 {
                    continue;
                }
                // SAFETY: filled by a successful sigwaitinfo.
                let info = unsafe { info.assume_init() };
                if info.si_code == SI_KERNEL {
                    // The terminal's: CMD, in the same process group, has it already.
                    log::debug!("signal {signal} from the terminal, left to CMD");
                    continue;
                }
                // SAFETY: a signal sent by a process (not the kernel's) carries its pid.
                let sender = unsafe { info.si_pid() };
                // SAFETY: plain queries of process groups.
                if sender > 0 && unsafe { libc::getpgid(sender) == libc::getpgrp() } {
                    // From our own process group (`timeout`, `kill 0`, a group kill): likely
                    // sent to the whole group, CMD included, so not sent twice (sudo's rule).
                    log::debug!("signal {signal} from pid {sender} of bindtrace's process group, left to CMD");
                    continue;
                }
                if let Err(err) = target.signal(signal) {
                    log::debug!("passing signal {signal} on to CMD: {err}");
                }
            })
            .context("starting the signal relay")?;
        Ok(())
    }

    /// CMD's exit status, once it has exited (after [`ProcessHandle::exited`]).
    pub(crate) fn status(mut self) -> Result<ExitStatus> {
        self.child.wait().context("reading CMD's exit status")
    }
}

/// bindtrace's exit status for CMD's: its code, or 128+N for signal N (as shells give it).
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(255),
        (None, None) => 1,
    }
}

/// Ends bindtrace the way CMD ended when a signal ended it (after the summary), so that a
/// shell loop around bindtrace stops on Ctrl-C as it would around CMD: the signal's default
/// action, unblocked, without a core dump. Returns if the signal did not end bindtrace.
pub(crate) fn die_of(signal: i32) {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain calls on this process: the core limit, the signal's default action, its
    // unblocking, then the signal itself.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(signal, libc::SIG_DFL);
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
}

/// How CMD ended, in words.
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| format!("{signal}"));
            format!("was killed by {name}{}", if status.core_dumped() { " (core dumped)" } else { "" })
        }
        (None, None) => "ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sudo_variables_name_the_user_and_root_is_no_one_else() {
        let os = |s: &str| Some(OsString::from(s));
        let nobody = run_as(None, os("65534"), os("65534"), true).expect("valid").0.expect("a user");
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
        assert!(nobody.groups.contains(&65534));
        assert_eq!(nobody.name.as_deref(), Some("nobody"));
        assert_eq!(
            run_as(None, os("0"), os("0"), true).expect("valid"),
            (None, None),
            "sudo from root: CMD stays root"
        );
        assert_eq!(run_as(None, None, None, false).expect("valid"), (None, None), "no sudo: CMD runs as bindtrace");
        let (who, note) = run_as(None, os("65534"), os("65534"), false).expect("valid");
        assert_eq!(who, None, "a shell from sudo -i passes the variables on: CMD stays root");
        assert!(note.is_some_and(|n| n.contains("sudo did not start bindtrace")));
        let err = run_as(None, os("alice"), os("1"), true).expect_err("not a number");
        assert!(err.to_string().contains("SUDO_UID=alice is not a number"), "{err}");
        let root = run_as(Some("root"), os("65534"), os("65534"), true).expect("valid").0.expect("a user");
        assert_eq!((root.uid, root.gid), (0, 0), "--user wins over sudo's variables");
        let err = run_as(Some("no-such-user-bindtrace"), None, None, false).expect_err("unknown");
        assert!(err.to_string().contains("no such user"), "{err}");
    }

    #[test]
    fn a_program_is_found_as_exec_finds_it() {
        let path = Some(OsString::from("/nonexistent:/bin:/usr/bin"));
        assert!(find_program(std::ffi::OsStr::new("sh"), path.clone()).expect("sh is in /bin").ends_with("sh"));
        let err = find_program(std::ffi::OsStr::new("no-such-program-bindtrace"), path).expect_err("missing");
        assert!(err.to_string().contains("command not found in PATH"), "{err}");
        let err = find_program(std::ffi::OsStr::new("/etc/passwd"), None).expect_err("not executable");
        assert!(err.to_string().contains("not an executable file"), "{err}");
    }

    #[test]
    fn exit_status_is_the_shells() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGTERM)), "was killed by SIGTERM");
        assert_eq!(describe(ExitStatus::from_raw(0)), "exited with status 0");
    }
}
