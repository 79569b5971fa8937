//! Every flag bindtrace takes, in one place, with the parsers that turn user text into typed
//! values. Anything wrong here is reported as one line and exit status 2 before the probe
//! is loaded.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::errno;

const EXAMPLES: &str = "\
Examples:
  sudo bindtrace                           every bind on this host, live
  sudo bindtrace --errno EADDRINUSE        only binds that failed with 'Address already in use'
  sudo bindtrace -x -P 8000-8100           failed binds on ports 8000 to 8100
  sudo bindtrace -p 4242 --proto udp       UDP binds of process 4242
  sudo bindtrace -o ndjson > trace.ndjson  one JSON object per line (schema: ndjson-schema.md in
                                           /usr/share/doc/bindtrace, or docs/ in the source)
  sudo bindtrace -d 30s --file trace.ndjson
  sudo bindtrace -o ndjson | jq 'select(.ok == false)'
  sudo bindtrace who 8080                  who holds port 8080 now (TCP and UDP)
  sudo bindtrace who 53/udp --netns 4242   ... in the network namespace of process 4242
  sudo bindtrace --check                   which hooks this kernel supports
  sudo bindtrace -- make test              the binds of `make test` and everything it starts
                                           (as the user who ran sudo; exits with its status)
  sudo bindtrace -x -- ./run-tests.sh      only the failed binds of a test suite's processes
  sudo bindtrace --tree 4242               process 4242 and everything it starts from now on

Table OPTS: a=SO_REUSEADDR p=SO_REUSEPORT 6=IPV6_V6ONLY f=IP_FREEBIND t=IP_TRANSPARENT
            n=IP_BIND_ADDRESS_NO_PORT, - none, ? socket not read";

#[derive(Debug, Parser)]
#[command(
    name = "bindtrace",
    version,
    about = "Trace every socket bind on this host, with its result, live.",
    long_about = "Trace every socket bind on this host, with its result, live.\n\n\
        Failed binds keep the address and port that were asked for. Runs as root (CAP_BPF).",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Only these results: errno names in any case or numbers, comma-separated
    /// (EADDRINUSE,eacces,22; -98 as `ret` shows it is 98).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        value_parser = Completed { parse: errno::parse, values: || errno::names().collect() },
        allow_negative_numbers = true,
        hide_possible_values = true
    )]
    pub errno: Vec<i32>,

    /// Only failed binds.
    #[arg(short = 'x', long)]
    pub failed: bool,

    /// Only binds by these process ids (repeat or comma-separate).
    #[arg(short = 'p', long = "pid", value_name = "PID", value_delimiter = ',', value_parser = parse_pid)]
    pub pids: Vec<u32>,

    /// Only binds asking for these ports: PORT or LO-HI (repeat or comma-separate).
    #[arg(
        short = 'P',
        long = "port",
        value_name = "PORT|LO-HI",
        value_delimiter = ',',
        value_parser = parse_port_range,
        allow_negative_numbers = true
    )]
    pub ports: Vec<PortRange>,

    /// Only binds by process PID and the processes it starts from now on (children,
    /// grandchildren, daemons they leave behind), followed in the kernel; with the ones it
    /// already has. Ends when PID exits.
    #[arg(long = "tree", value_name = "PID", value_parser = parse_pid, conflicts_with = "command_line")]
    pub tree: Option<u32>,

    /// Run CMD (after `--`) as this user (a name or uid; its group and supplementary groups
    /// from the user database) instead of the user who ran sudo (SUDO_UID, SUDO_GID).
    #[arg(short = 'u', long, value_name = "USER", requires = "command_line")]
    pub user: Option<String>,

    /// Starts CMD and traces only its process tree, from its first instruction: the
    /// command, everything it forks or execs, their threads, and daemons they start, until
    /// CMD exits. CMD runs as the user who ran sudo (or --user), keeps the terminal, gets
    /// SIGINT, SIGTERM and SIGHUP, and bindtrace exits with its status (128+N for signal N)
    /// after the summary. The events go to stderr (or --file), never into CMD's output.
    #[arg(last = true, value_name = "CMD", num_args = 1.., value_hint = clap::ValueHint::CommandWithArguments)]
    pub command_line: Vec<std::ffi::OsString>,

    /// Only binds by processes with this name (the kernel keeps the first 15 bytes).
    #[arg(long, value_name = "NAME", value_parser = parse_comm)]
    pub comm: Option<String>,

    /// Serve Prometheus/OpenMetrics counters at http://ADDR/metrics while tracing
    /// (127.0.0.1:9750, localhost:9750, [::]:9750; :9750 is every address, as exporters take it).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub metrics: Option<std::net::SocketAddr>,

    /// Ports to label the metrics by (every other port counts as port="other"); at most 64.
    #[arg(long = "metrics-port", value_name = "PORT", value_delimiter = ',', requires = "metrics")]
    pub metrics_ports: Vec<u16>,

    /// Only binds inside this container (a Docker or podman name or id, or a containerd
    /// id), applied in the kernel by its cgroup. Repeat for more.
    #[arg(
        long = "container",
        value_name = "NAME|ID",
        value_parser = clap::builder::NonEmptyStringValueParser::new(),
        value_hint = clap::ValueHint::Other
    )]
    pub containers: Vec<String>,

    /// Only binds by processes in this cgroup v2 group or below it: a path such as
    /// /system.slice/nginx.service or a pod's kubepods slice, relative to the cgroup root or
    /// under its mount. Repeat for more.
    #[arg(long = "cgroup", value_name = "PATH", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub cgroups: Vec<String>,

    /// Only this address family. Without it the table leaves out netlink binds (ss, ip and
    /// language runtimes make them all the time; the summary counts them); NDJSON has them all.
    #[arg(
        long,
        value_name = "4|6|unix|netlink",
        value_parser = Completed { parse: parse_family, values: || vec!["4", "6", "unix", "netlink"] },
        hide_possible_values = true
    )]
    pub family: Option<Family>,

    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,

    /// Output format [default: table on a terminal, ndjson otherwise or with --file; with
    /// -- CMD a table on stderr, unless --file].
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,

    /// Write events to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Stop after this long (30s, 5m, 1h30m).
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many events.
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// No lookups: no holders, no explanations (`diagnosis`), no container, pod or unit names.
    #[arg(long)]
    pub no_diagnosis: bool,

    /// Do not print the summary at exit.
    #[arg(long)]
    pub no_summary: bool,

    /// Kernel hook to use.
    #[arg(long, value_enum, default_value_t = Attach::Auto)]
    pub attach: Attach,

    /// Print what this kernel supports (BTF, ring buffer, each hook, privileges) and exit:
    /// 0 when at least one hook works, 1 otherwise.
    #[arg(long)]
    pub check: bool,

    /// With --check: also make two test binds on 127.0.0.1 (the second refused with
    /// EADDRINUSE) under each hook that attaches, and print what the kernel counted for each
    /// of its programs: runs, time and recursion misses (run statistics are switched on for
    /// the check, BPF_ENABLE_STATS).
    #[arg(short = 'v', long, requires = "check")]
    pub verbose: bool,

    /// Size of the kernel ring buffer: a power of two, at least 4K and one page (4K, 256K, 1M, 16M).
    /// Raise it if bindtrace reports lost events.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// Colour failures in the table.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Who holds a port right now: sockets, states, processes, containers, and a hint.
    Who(WhoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (bindtrace.1 and one per subcommand, roff) into DIR; packaging
    /// installs them.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `bindtrace completions SHELL`: the script for `shell`, from the same definition that parses
/// the command line, so it never falls behind a flag.
pub(crate) fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "bindtrace", out);
    Ok(())
}

/// bindtrace(1) and a page per subcommand (bindtrace-who(1), ...), in roff, from the
/// command-line definition, written into `dir`; bindtrace(1) and bindtrace-who(1) with what
/// clap does not know: exit statuses, signals, where the documents are.
pub(crate) fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    let mut command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    command.build();
    clap_mangen::generate_to(command.clone(), dir)?;
    render_man_page(&command, dir, MAN_TRACER_SECTIONS)?;
    if let Some(who) = command.get_subcommands().find(|s| s.get_name() == "who") {
        render_man_page(who, dir, MAN_WHO_SECTIONS)?;
    }
    Ok(())
}

/// The sections clap_mangen renders for `command` (as its `render` picks them), with `extra`
/// (roff) before the version, over the page `generate_to` wrote.
fn render_man_page(command: &clap::Command, dir: &std::path::Path, extra: &str) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(command.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if command.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if command.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)?;
    }
    if command.get_after_help().is_some() || command.get_after_long_help().is_some() {
        man.render_extra_section(&mut out)?;
    }
    std::io::Write::write_all(&mut out, extra.as_bytes())?;
    if command.get_version().is_some() || command.get_long_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    std::fs::write(dir.join(man.get_filename()), out)
}

const MAN_TRACER_SECTIONS: &str = r#".SH "EXIT STATUS"
.TP
0
Tracing ended as asked: Ctrl-C, SIGTERM, \fB--duration\fR, \fB--count\fR, the end of \fB--tree\fR's process, or the
reader of the output went away.
.TP
CMD's status
With \fB-- CMD\fR: CMD's exit status, or 128+N when signal N ended it, after the summary (a prefix for a CI step).
.TP
1
A failure after the input was accepted: the kernel refused every hook, or the output could not be written.
.TP
2
Bad input or missing privileges, said in one line on stderr before anything is attached (an unusable \fB--file\fR too).
.PP
\fBbindtrace --check\fR exits 0 when at least one hook works, 1 otherwise.
.SH SIGNALS
.TP
SIGINT, SIGTERM
End the trace; the summary is printed (to stderr, or as the last NDJSON record). With \fB-- CMD\fR they are CMD's: a
SIGINT, SIGTERM or SIGHUP a process outside bindtrace's process group sends it is passed on to CMD (one from its own
group, such as \fBtimeout\fR's, reached CMD too), Ctrl-C reaches CMD from the terminal (bindtrace does not act on it),
the trace ends when CMD exits, and bindtrace ends as CMD did: with its status, or by the same signal.
.TP
SIGHUP
With \fB--file\fR: log rotation. The file is opened again by name (appended to if it exists) and the trace goes on there.
If it cannot be opened, bindtrace says so once and goes on writing to the file it had. Without \fB--file\fR SIGHUP ends the
trace like SIGTERM. With \fB-- CMD\fR SIGHUP is CMD's: passed on to it, not a rotation.
.SH FILES
.TP
/usr/share/doc/bindtrace/ndjson-schema.md
Every field of the NDJSON output, the diagnosis kinds and the summary's counters.
.TP
/usr/share/doc/bindtrace/README.md
What bindtrace sees under each kernel hook, and how to run it in containers and Kubernetes.
.SH "SEE ALSO"
bindtrace-who(1), ss(8), bpftool(8)
"#;

const MAN_WHO_SECTIONS: &str = r#".SH "EXIT STATUS"
.TP
0
Something holds the port: a socket (the holders are listed), a container runtime's port table, or a NAT rule (DNAT,
REDIRECT) that takes its traffic before any socket.
.TP
1
Nothing holds the port: a bind to it would not fail with EADDRINUSE now, and no NAT rule bindtrace could read takes its
traffic.
.TP
2
Bad input (a port, a network namespace that is not one), missing privileges, or the lookup could not be made; said in
one line on stderr.
.SH "SEE ALSO"
bindtrace(1), ss(8)
"#;

#[derive(Debug, clap::Args)]
pub(crate) struct WhoArgs {
    /// PORT, PORT/tcp or PORT/udp (both protocols without a suffix).
    #[arg(value_name = "PORT[/tcp|/udp]", value_parser = parse_port_spec)]
    pub target: PortSpec,

    /// Look in this network namespace: a process id or a path such as /run/netns/NAME
    /// [default: bindtrace's own].
    #[arg(long, value_name = "PID|PATH")]
    pub netns: Option<String>,

    /// Look in every network namespace bindtrace can see (every process's, and /run/netns),
    /// naming the container or pod of each holder.
    #[arg(long, conflicts_with = "netns")]
    pub all_netns: bool,

    /// List every socket on the port, each connection too. Without it, the listeners and
    /// other sockets that bind the port are listed, and connections are counted by state
    /// (a busy port has tens of thousands).
    #[arg(long)]
    pub all: bool,

    /// Output format [default: table on a terminal, ndjson otherwise].
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

/// A parser whose values shell completion offers (errno names, families) instead of file
/// names; the help does not list them (`hide_possible_values`), and parsing stays `parse`'s
/// (which takes more spellings than the completions offer).
#[derive(Clone)]
struct Completed<T> {
    parse: fn(&str) -> Result<T, String>,
    values: fn() -> Vec<&'static str>,
}

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Completed<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        clap::builder::TypedValueParser::parse_ref(&self.parse, cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new((self.values)().into_iter().map(clap::builder::PossibleValue::new)))
    }
}

/// A port and, optionally, one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortSpec {
    pub port: u16,
    pub proto: Option<Proto>,
}

pub(crate) fn parse_port_spec(text: &str) -> Result<PortSpec, String> {
    let (port, proto) = match text.split_once('/') {
        Some((port, proto)) => {
            let proto = match proto.to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => return Err(format!("unknown protocol '{other}': use PORT/tcp or PORT/udp")),
            };
            (port, Some(proto))
        }
        None => (text, None),
    };
    Ok(PortSpec { port: parse_port(port)?, proto })
}

/// An inclusive port range; a single port has `low == high`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortRange {
    pub low: u16,
    pub high: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Inet,
    Inet6,
    Unix,
    Netlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    /// One JSON object per line (`json` is accepted for it).
    #[value(alias = "json")]
    Ndjson,
    /// No events (with `--metrics`, an always-on exporter; for `who`, the exit status alone).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Attach {
    /// The first hook this kernel accepts: fexit, then kprobe, then tracepoint (on a
    /// PREEMPT_RT kernel tracepoint first); `--check` says the order.
    Auto,
    /// fentry/fexit on __sys_bind (every bind(2)) and on inet_bind/inet6_bind (io_uring's and
    /// the kernel's own binds), and on __sys_listen.
    Fexit,
    /// kprobe/kretprobe on the same functions, for kernels without BPF trampolines.
    Kprobe,
    /// syscalls:sys_{enter,exit}_bind and _listen (bind(2) and listen(2) of 64-bit processes).
    Tracepoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    Auto,
    Always,
    Never,
}

fn parse_port(text: &str) -> Result<u16, String> {
    let number: u32 = text.trim().parse().map_err(|_| format!("'{text}' is not a port number (1-65535)"))?;
    match u16::try_from(number) {
        Ok(port) if port >= 1 => Ok(port),
        _ => Err(format!("port {number} is outside 1-65535")),
    }
}

pub(crate) fn parse_port_range(text: &str) -> Result<PortRange, String> {
    match text.split_once('-') {
        None => {
            let port = parse_port(text)?;
            Ok(PortRange { low: port, high: port })
        }
        Some((low, high)) if low.trim().is_empty() || high.trim().is_empty() => {
            Err(format!("'{text}' is not a port or a range: use PORT or LO-HI (ports 1-65535)"))
        }
        Some((low, high)) => {
            let (low, high) = (parse_port(low)?, parse_port(high)?);
            if low > high {
                return Err(format!("inverted port range {low}-{high}: write it as {high}-{low}"));
            }
            Ok(PortRange { low, high })
        }
    }
}

/// A listening address as exporters take it: `HOST:PORT` with an address or a name
/// (`localhost`), or `:PORT` for every address (IPv6 and IPv4 where the host has IPv6).
fn parse_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let usage =
        || format!("'{text}' is not an address to listen on: use HOST:PORT (127.0.0.1:9750, localhost:9750) or :PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(usage)?;
    let port: u16 = port.parse().map_err(|_| usage())?;
    if host.is_empty() {
        let every = if std::path::Path::new("/proc/net/if_inet6").exists() {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        };
        return Ok(every);
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(usage());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|err| format!("--metrics {text}: cannot resolve {host}: {err}"))?
        .next()
        .ok_or_else(|| format!("--metrics {text}: {host} has no address"))
}

fn parse_pid(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(pid) if pid > 0 && pid <= i32::MAX as u32 => Ok(pid),
        _ => Err(format!("'{text}' is not a process id")),
    }
}

fn parse_family(text: &str) -> Result<Family, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "4" | "ipv4" | "inet" => Ok(Family::Inet),
        "6" | "ipv6" | "inet6" => Ok(Family::Inet6),
        "unix" | "local" => Ok(Family::Unix),
        "netlink" => Ok(Family::Netlink),
        _ => Err(format!("unknown family '{text}': use 4, 6, unix or netlink")),
    }
}

fn parse_comm(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("empty process name".into());
    }
    if text.bytes().any(|b| b == 0) {
        return Err("a process name cannot contain NUL".into());
    }
    Ok(text.to_owned())
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => trimmed.split_at(at),
        None => (trimmed, ""),
    };
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("'{text}': use a size such as 256K or 4M")),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("'{text}': use a size such as 256K or 4M"))?;
    if !(4096..=(1 << 30)).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!("ring buffer size {text} must be a power of two from 4K to 1G"));
    }
    ring_fits_pages(text, bytes, page_size())?;
    Ok(bytes as u32)
}

/// The running kernel's page size (4K; 16K or 64K on some arm64 kernels).
fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointer.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// A ring buffer is whole pages: below one page the kernel refuses the map with a bare EINVAL.
fn ring_fits_pages(text: &str, bytes: u64, page: u64) -> Result<(), String> {
    if bytes < page {
        return Err(format!(
            "ring buffer size {text} is smaller than this kernel's page size ({}K): use {}K or more",
            page >> 10,
            page >> 10
        ));
    }
    Ok(())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text.trim()).map_err(|e| format!("'{text}': {e} (examples: 30s, 5m, 1h30m)"))?;
    if duration.is_zero() {
        return Err("the duration must be longer than 0".into());
    }
    // A deadline must fit the monotonic clock; ten years is longer than any trace.
    if duration > MAX_DURATION {
        return Err(format!("'{text}' is too long: at most 10 years (use no --duration to trace until Ctrl-C)"));
    }
    Ok(duration)
}

const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bindtrace").chain(args.iter().copied()))
    }

    /// The pages say what clap cannot: exit statuses (of the trace and of `who`), signals
    /// (SIGHUP is log rotation), and where the schema is installed.
    #[test]
    fn man_pages_have_exit_status_signals_and_files() {
        let dir = std::env::temp_dir().join(format!("bindtrace-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        write_man_pages(&dir).expect("man pages");
        let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tracer = page("bindtrace.1");
        for section in [".SH \"EXIT STATUS\"", ".SH SIGNALS", "SIGHUP", "/usr/share/doc/bindtrace/ndjson-schema.md"] {
            assert!(tracer.contains(section), "bindtrace.1 lacks {section}");
        }
        assert_eq!(tracer.matches("bindtrace who 8080").count(), 1, "the who example once");
        let who = page("bindtrace-who.1");
        assert!(who.contains(".SH \"EXIT STATUS\"") && who.contains("Nothing holds the port"), "{who}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Completions offer errno names and families, and no file names for `--container`.
    #[test]
    fn completions_offer_values_not_file_names() {
        let mut script = Vec::new();
        write_completions(clap_complete::Shell::Bash, &mut script).expect("bash completions");
        let script = String::from_utf8(script).expect("utf-8");
        let case = |flag: &str| {
            let start = script.find(&format!("--{flag})")).unwrap_or_else(|| panic!("--{flag}: {script}"));
            script[start..].split(";;").next().unwrap_or_default().to_owned()
        };
        assert!(case("errno").contains("EADDRINUSE EADDRNOTAVAIL"), "{}", case("errno"));
        assert!(case("family").contains("\"4 6 unix netlink\""), "{}", case("family"));
        assert!(!case("container").contains("compgen -f"), "no file names: {}", case("container"));
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("EHWPOISON"), "the help does not list every errno");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn errno_lists_mix_names_numbers_and_repeats() {
        let cli = parse(&["--errno", "EADDRINUSE,eacces", "--errno", "22"]).expect("valid");
        assert_eq!(cli.errno, vec![98, 13, 22]);
        let err = parse(&["--errno", "EBOGUS"]).expect_err("invalid");
        assert!(err.to_string().contains("unknown errno name 'EBOGUS'"), "{err}");
    }

    /// clap artefacts the hardening pass found: a negative number taken for a flag, an empty
    /// value taken for the root cgroup or sent to the container runtimes.
    #[test]
    fn negative_numbers_and_empty_values_are_read_as_the_user_meant() {
        assert_eq!(parse(&["--errno", "-98"]).expect("-98 is ret's spelling of 98").errno, vec![98]);
        assert_eq!(parse(&["--errno=-98,EACCES"]).expect("valid").errno, vec![98, 13]);
        for args in [["-P", "-1"], ["-P=-1", ""], ["--port", "-80"]] {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            let err = parse(&args).expect_err("not a port").to_string();
            assert!(err.contains("is not a port or a range"), "{args:?}: {err}");
        }
        for flag in ["--cgroup", "--container"] {
            let err = parse(&[flag, ""]).expect_err("empty").to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn metrics_addresses_as_exporters_take_them() {
        let addr = |text: &str| parse_listen_addr(text).map(|a| a.to_string());
        assert_eq!(addr("127.0.0.1:9750").as_deref(), Ok("127.0.0.1:9750"));
        assert_eq!(addr("[::1]:9750").as_deref(), Ok("[::1]:9750"));
        let localhost = parse_listen_addr("localhost:9750").expect("localhost resolves");
        assert!(localhost.ip().is_loopback() && localhost.port() == 9750, "{localhost}");
        let every = parse_listen_addr(":9750").expect(":PORT");
        assert!(every.ip().is_unspecified() && every.port() == 9750, "{every}");
        for bad in ["9750", "localhost", ":http", "[::1:9750", "127.0.0.1:99999"] {
            let err = parse_listen_addr(bad).expect_err(bad);
            assert!(err.contains("not an address to listen on") || err.contains("cannot resolve"), "{bad}: {err}");
        }
    }

    #[test]
    fn ports_and_ranges() {
        let cli = parse(&["-P", "8080", "--port", "9000-9010,53"]).expect("valid");
        assert_eq!(
            cli.ports,
            vec![
                PortRange { low: 8080, high: 8080 },
                PortRange { low: 9000, high: 9010 },
                PortRange { low: 53, high: 53 }
            ]
        );
        for (bad, why) in [
            ("0", "outside 1-65535"),
            ("65536", "outside 1-65535"),
            ("9010-9000", "inverted port range"),
            ("http", "not a port number"),
        ] {
            let err = parse(&["-P", bad]).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn pids_family_proto_output_duration_count() {
        let cli = parse(&["-p", "1,42", "--family", "6", "--proto", "udp", "-o", "ndjson", "-d", "1m30s", "-n", "5"])
            .expect("valid");
        assert_eq!(cli.pids, vec![1, 42]);
        assert_eq!(cli.family, Some(Family::Inet6));
        assert_eq!(cli.proto, Some(Proto::Udp));
        assert_eq!(cli.output, Some(OutputFormat::Ndjson));
        assert_eq!(cli.duration, Some(Duration::from_secs(90)));
        // Used to attach and then panic adding it to the clock (issue 11).
        assert!(parse(&["-d", "300000000000y"]).is_err());
        assert!(parse(&["-d", "11y"]).is_err());
        assert!(parse(&["-d", "9y"]).is_ok());
        assert_eq!(cli.count, Some(5));
        assert!(parse(&["-p", "0"]).is_err());
        assert!(parse(&["--family", "5"]).is_err());
        assert!(parse(&["-o", "xml"]).is_err());
        assert!(parse(&["-d", "soon"]).is_err());
        assert!(parse(&["-d", "0s"]).is_err());
        assert!(parse(&["-n", "0"]).is_err());
    }

    #[test]
    fn who_takes_a_port_and_optional_protocol() {
        let cli = parse(&["who", "8080/udp", "--netns", "42"]).expect("valid");
        let Some(Command::Who(who)) = cli.command else { panic!("who") };
        assert_eq!(who.target, PortSpec { port: 8080, proto: Some(Proto::Udp) });
        assert_eq!(who.netns.as_deref(), Some("42"));
        assert_eq!(parse_port_spec("53"), Ok(PortSpec { port: 53, proto: None }));
        assert!(parse_port_spec("53/sctp").is_err());
        assert!(parse_port_spec("0/tcp").is_err());
        assert!(parse(&["-x", "who", "80"]).is_err(), "trace flags do not mix with who");
    }

    #[test]
    fn ring_buffer_sizes() {
        assert_eq!(parse(&[]).expect("default").ring_buffer_size, 1 << 20);
        assert_eq!(parse(&["--ring-buffer-size", "4K"]).expect("4K").ring_buffer_size, 4096);
        assert_eq!(parse(&["--ring-buffer-size", "16m"]).expect("16m").ring_buffer_size, 16 << 20);
        assert_eq!(parse(&["--ring-buffer-size", "8192"]).expect("8192").ring_buffer_size, 8192);
        // A 64K-page arm64 kernel: 16K is not even one page.
        let small = ring_fits_pages("16K", 16 << 10, 64 << 10).expect_err("below a page");
        assert!(small.contains("page size (64K): use 64K or more"), "{small}");
        assert_eq!(ring_fits_pages("64K", 64 << 10, 64 << 10), Ok(()));
        for bad in ["3K", "1K", "2G", "lots", "5X"] {
            assert!(parse(&["--ring-buffer-size", bad]).is_err(), "{bad}");
        }
    }
}
