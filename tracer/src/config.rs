//! The command line resolved once into the domain's terms (as ripgrep's `HiArgs`): the
//! filter's [`Selection`], the loader's [`BackendChoice`], the run's limits and outputs. Only
//! `app` and this module see [`Cli`]; no stage of a trace sees a clap type (`bindtrace who`
//! takes its own subcommand's arguments). What needs the
//! host (opening `--file`, binding `--metrics`, finding CMD) is `app`'s, after this.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf};

use bindtrace_common::{Backend, AF_INET, AF_INET6, AF_NETLINK, AF_UNIX, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    cli::{Attach, Cli, ColorChoice, Family, OutputFormat, Proto},
    filter::{Results, Selection},
    pipeline::Limits,
    probe::BackendChoice,
};

/// Everything a trace run needs from the command line.
pub(crate) struct Config {
    pub(crate) selection: Selection,
    pub(crate) backend: BackendChoice,
    pub(crate) ring_bytes: u32,
    /// Diagnose failures (and name holders); off with `--no-diagnosis`.
    pub(crate) diagnoses: bool,
    pub(crate) limits: Limits,
    /// `--file`; events on stdout (or stderr, with CMD) without it.
    pub(crate) file: Option<PathBuf>,
    /// `--output`, when given; otherwise decided by where the events go.
    pub(crate) format: Option<OutputFormat>,
    pub(crate) color: ColorChoice,
    /// Print the summary at the end.
    pub(crate) summary: bool,
    /// The table shows AF_NETLINK binds only when asked for by `--family netlink`.
    pub(crate) show_netlink: bool,
    pub(crate) metrics: Option<SocketAddr>,
    pub(crate) metrics_ports: Vec<u16>,
    /// `--container`, `--cgroup`: resolved to cgroups on the host by `app`.
    pub(crate) containers: Vec<String>,
    pub(crate) cgroups: Vec<String>,
    /// `--tree PID`.
    pub(crate) tree: Option<u32>,
    /// `-- CMD` (empty without it), and `--user`.
    pub(crate) command_line: Vec<OsString>,
    pub(crate) user: Option<String>,
}

impl Config {
    pub(crate) fn from_cli(cli: Cli) -> Self {
        Self {
            selection: selection(&cli),
            backend: backend_choice(cli.attach),
            ring_bytes: cli.ring_buffer_size,
            diagnoses: !cli.no_diagnosis,
            limits: Limits { duration: cli.duration, count: cli.count },
            file: cli.file,
            format: cli.output,
            color: cli.color,
            summary: !cli.no_summary,
            show_netlink: cli.family.is_some(),
            metrics: cli.metrics,
            metrics_ports: cli.metrics_ports,
            containers: cli.containers,
            cgroups: cli.cgroups,
            tree: cli.tree,
            command_line: cli.command_line,
            user: cli.user,
        }
    }
}

/// The filter flags as the filter takes them.
pub(crate) fn selection(cli: &Cli) -> Selection {
    let results = if !cli.errno.is_empty() {
        Results::Errnos(cli.errno.clone())
    } else if cli.failed {
        Results::Failed
    } else {
        Results::All
    };
    Selection {
        results,
        ports: cli.ports.iter().map(|range| (range.low, range.high)).collect(),
        family: cli.family.map(|family| match family {
            Family::Inet => AF_INET,
            Family::Inet6 => AF_INET6,
            Family::Unix => AF_UNIX,
            Family::Netlink => AF_NETLINK,
        }),
        protocol: cli.proto.map(|proto| match proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }),
        comm: cli.comm.clone(),
        pids: cli.pids.clone(),
    }
}

fn backend_choice(attach: Attach) -> BackendChoice {
    match attach {
        Attach::Auto => BackendChoice::Auto,
        Attach::Fexit => BackendChoice::Only(Backend::Fexit),
        Attach::Kprobe => BackendChoice::Only(Backend::Kprobe),
        Attach::Tracepoint => BackendChoice::Only(Backend::Tracepoint),
    }
}
