//! Live aligned columns for a person watching a terminal; the exit report goes to stderr so
//! that it never mixes with redirected output.

use std::{fmt::Write as _, io};

use anstyle::{AnsiColor, Style};
use bindtrace_common::{sock_flags, BindEvent, AF_NETLINK};

use super::{
    columns::{push_cell, Align, Cut},
    Output, Sink,
};
use crate::{
    clock::local_time_of_day,
    decode::{requested_endpoint, Bind, BindEventExt as _},
    errno,
    model::{Enriched, Explained, FollowUp},
    summary::Report,
    text::{self, push_for_terminal},
};

const FAILURE: Style = AnsiColor::Red.on_default().bold();

/// The live table's columns before RESULT: title, width, alignment, and where a value too
/// wide is cut. PROTO fits `udplite`; ADDRESS most IPv6 addresses with their port (a longer one loses its middle).
const COLUMNS: [(&str, usize, Align, Cut); 7] = [
    ("TIME", 12, Align::Left, Cut::End),
    ("PID", 7, Align::Right, Cut::End),
    ("COMM", 16, Align::Left, Cut::End),
    ("CONTAINER", 14, Align::Left, Cut::End),
    ("PROTO", 7, Align::Left, Cut::End),
    ("OPTS", 6, Align::Left, Cut::End),
    ("ADDRESS", 40, Align::Left, Cut::Middle),
];

/// Appends the cells of one row (the titles, or an event's values), each followed by a space;
/// `ppid`, when following a process tree, after PID.
fn push_cells(line: &mut String, values: [&str; 7], ppid: Option<&str>) {
    for (index, ((_, columns, align, cut), value)) in COLUMNS.iter().zip(values).enumerate() {
        push_cell(line, value, *columns, *align, *cut);
        line.push(' ');
        if let (1, Some(ppid)) = (index, ppid) {
            push_cell(line, ppid, PPID_WIDTH, Align::Right, Cut::End);
            line.push(' ');
        }
    }
}

const PPID_WIDTH: usize = 7;
/// COMM is indented a column per level of the tree, up to this many.
const TREE_INDENT_MAX: u16 = 4;

pub(crate) struct TableSink {
    output: Output,
    color: bool,
    /// With `-- CMD` or `--tree`: a PPID column, and COMM indented by depth.
    tree: bool,
    /// The events' output is stderr (`-- CMD`), where the report goes too.
    events_on_stderr: bool,
    header_written: bool,
    line: String,
    /// Netlink binds are left out of the live table (`ss`, `ip` and language runtimes make
    /// them all the time, and nobody debugs them there); counted, and said in the report.
    hide_netlink: bool,
    netlink_hidden: u64,
}

impl TableSink {
    pub(crate) fn new(output: Output, color: bool) -> Self {
        Self {
            output,
            color,
            tree: false,
            events_on_stderr: false,
            header_written: false,
            line: String::with_capacity(160),
            hide_netlink: false,
            netlink_hidden: 0,
        }
    }

    /// The events go to stderr (`-- CMD`): the report is written after them, in the same queue.
    pub(crate) fn events_on_stderr(mut self, yes: bool) -> Self {
        self.events_on_stderr = yes;
        self
    }

    /// Shows each event's place in the followed process tree.
    pub(crate) fn showing_tree(mut self, tree: bool) -> Self {
        self.tree = tree;
        self
    }

    /// Leaves netlink binds out of the table (counted in the report).
    pub(crate) fn hiding_netlink(mut self, hide: bool) -> Self {
        self.hide_netlink = hide;
        self
    }

    fn push_line(&mut self) -> io::Result<()> {
        self.line.push('\n');
        self.output.buffer().extend_from_slice(self.line.as_bytes());
        self.line.clear();
        self.output.write_if_full()
    }

    /// Writes the column titles now, so the operator sees bindtrace is ready before any bind.
    pub(crate) fn header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.header_written = true;
            push_cells(&mut self.line, COLUMNS.map(|(title, ..)| title), self.tree.then_some("PPID"));
            self.line.push_str("RESULT");
            self.push_line()?;
            self.output.flush()?;
        }
        Ok(())
    }
}

/// The followed tree's lines of the report: how its root ended, which of its processes failed
/// to bind (where they sit, their first failure), which still run.
fn push_tree_report(text: &mut String, tree: &crate::summary::TreeReport) {
    let mut root = match &tree.command {
        Some(command) => {
            let mut shown = String::new();
            push_for_terminal(&mut shown, command);
            format!("`{shown}` (pid {})", tree.root_pid)
        }
        None => format!("pid {}", tree.root_pid),
    };
    if let Some(ended) = &tree.ended {
        let _ = write!(root, " {ended}");
    }
    let failed = tree.failed_processes.len() as u64 + tree.failed_processes_unlisted;
    let _ = writeln!(
        text,
        "  tree:       {root}; {}",
        match failed {
            0 => "no traced bind of it failed".to_owned(),
            1 => "1 process of it failed to bind:".to_owned(),
            n => format!("{n} processes of it failed to bind:"),
        }
    );
    for process in &tree.failed_processes {
        let mut comm = String::new();
        push_for_terminal(&mut comm, &process.comm);
        let mut address = String::new();
        push_for_terminal(&mut address, &process.first_address);
        let _ = writeln!(
            text,
            "              pid {} ({comm}, depth {}, started by {}): {} {} on {address}",
            process.pid,
            process.depth,
            process.ppid,
            if process.failures == 1 {
                "failed with".to_owned()
            } else {
                format!("{} failures, first", process.failures)
            },
            process.first_errno,
        );
    }
    if tree.failed_processes_unlisted > 0 {
        let _ = writeln!(text, "              ... and {} more processes (not listed)", tree.failed_processes_unlisted);
    }
    if !tree.still_running.is_empty() {
        let pids: Vec<String> = tree.still_running.iter().map(u32::to_string).collect();
        let _ = writeln!(text, "  tree:       still running (not traced further): pid {}", pids.join(", "));
    }
}

/// Socket options as letters (the legend is in --help); "-" for none, "?" when the socket was
/// not read.
pub(crate) fn options(event: &BindEvent) -> String {
    if !event.has(sock_flags::SOCK_INFO) {
        return "?".to_owned();
    }
    let letters: String = [
        (sock_flags::REUSEADDR, 'a'),
        (sock_flags::REUSEPORT, 'p'),
        (sock_flags::V6ONLY, '6'),
        (sock_flags::FREEBIND, 'f'),
        (sock_flags::TRANSPARENT, 't'),
        (sock_flags::BIND_ADDRESS_NO_PORT, 'n'),
    ]
    .iter()
    .filter(|(flag, _)| event.has(*flag))
    .map(|(_, letter)| *letter)
    .collect();
    if letters.is_empty() {
        "-".to_owned()
    } else {
        letters
    }
}

/// "ok" or "EADDRINUSE (Address already in use)".
pub(crate) fn result_text(ret: i32) -> String {
    if ret >= 0 {
        return "ok".to_owned();
    }
    let errno = ret.saturating_neg();
    match (errno::name(errno), errno::message(errno)) {
        (Some(name), Some(message)) => format!("{name} ({message})"),
        _ => format!("errno {errno}"),
    }
}

/// The requested address; for a successful port-0 bind, with the port the kernel picked
/// (`127.0.0.1:0→41234`), which is what the process will use; an AF_UNIX path or `@name`.
fn address_column(event: &Bind) -> String {
    if event.is_listen() {
        return format!("listen {}", event.endpoint());
    }
    let requested = event.endpoint();
    if event.ret == 0 && event.port == 0 && event.bound_port != 0 && event.requested_ip().is_some() {
        format!("{requested}→{}", event.bound_port)
    } else {
        requested
    }
}

impl Sink for TableSink {
    fn start(&mut self) -> io::Result<()> {
        self.header()
    }

    fn event(&mut self, enriched: &Enriched) -> io::Result<()> {
        let (event, wall_ns) = (&enriched.event, enriched.wall_ns);
        if self.hide_netlink && event.family == AF_NETLINK {
            self.netlink_hidden += 1;
            return Ok(());
        }
        self.header()?;
        let mut comm = String::with_capacity(16);
        let place = event.tree_place();
        if let Some((_, depth)) = place {
            comm.extend(std::iter::repeat_n(' ', usize::from(depth.min(TREE_INDENT_MAX))));
        }
        push_for_terminal(&mut comm, &text::cow_from_bytes(event.comm_bytes()));
        // Escaped like comm: an AF_UNIX path (later) is a name a process chose.
        let mut address = String::with_capacity(48);
        push_for_terminal(&mut address, &address_column(event));
        // The pod or container; "-" on the host; "?" when it could not be resolved; empty
        // when nothing was looked up (--no-diagnosis).
        let mut container = String::with_capacity(16);
        if let Some(identity) = enriched.identity.as_deref() {
            match identity.short() {
                Some(name) => push_for_terminal(&mut container, &name),
                None if identity.unresolved.is_some() => container.push('?'),
                None => container.push('-'),
            }
        }
        push_cells(
            &mut self.line,
            [
                &local_time_of_day(wall_ns),
                &event.tgid.to_string(),
                &comm,
                &container,
                event.proto_name().unwrap_or("-"),
                &options(event),
                &address,
            ],
            self.tree.then(|| place.map_or_else(|| "?".to_owned(), |(ppid, _)| ppid.to_string())).as_deref(),
        );
        let result = result_text(event.ret);
        if event.ret < 0 && self.color {
            let _ = write!(self.line, "{FAILURE}{result}{FAILURE:#}");
        } else {
            self.line.push_str(&result);
        }
        self.push_line()?;
        // A diagnosis that follows or was shed prints nothing here: the follow-up comes as
        // its own line, and shed diagnoses are counted on stderr and in the summary.
        if let Explained::Now(diagnosis) = &enriched.explained {
            // The summary quotes command lines, which processes choose: escaped like comm.
            self.line.push_str("    └ ");
            push_for_terminal(&mut self.line, &diagnosis.summary);
            self.push_line()?;
        }
        Ok(())
    }

    fn follow_up(&mut self, follow_up: &FollowUp) -> io::Result<()> {
        let event = &follow_up.event;
        if self.hide_netlink && event.family == AF_NETLINK {
            return Ok(());
        }
        self.header()?;
        let _ = write!(
            self.line,
            "    └ (for {} pid {} {}) ",
            local_time_of_day(follow_up.wall_ns),
            event.tgid,
            requested_endpoint(event)
        );
        push_for_terminal(&mut self.line, &follow_up.diagnosis.summary);
        self.push_line()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }

    fn reopen(&mut self, writer: Box<dyn std::io::Write + Send>) -> io::Result<()> {
        self.output.replace(writer)
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        self.output.flush()?;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "\n{} bind event{} in {:.1}s (backend: {}); dropped: {}",
            report.events,
            if report.events == 1 { "" } else { "s" },
            report.duration_s,
            report.backend,
            report.dropped
        );
        if self.netlink_hidden > 0 {
            let _ = writeln!(
                text,
                "  hidden:     {} netlink binds (ss, ip, language runtimes): --family netlink or -o ndjson shows them",
                self.netlink_hidden
            );
        }
        if report.output_dropped_lines > 0 {
            let _ = writeln!(
                text,
                "  output:     {} lines dropped: the output did not keep up (a blocked pipe)",
                report.output_dropped_lines
            );
        }
        if !report.by_result.is_empty() {
            let results: Vec<String> = report.by_result.iter().map(|r| format!("{} {}", r.result, r.count)).collect();
            let _ = writeln!(text, "  by result:  {}", results.join(", "));
        }
        if !report.by_port.is_empty() {
            let ports: Vec<String> =
                report.by_port.iter().map(|p| format!("{}/{} {}", p.port, p.proto, p.count)).collect();
            let _ = writeln!(text, "  by port:    {}", ports.join(", "));
        }
        if !report.top_processes.is_empty() {
            let processes: Vec<String> = report
                .top_processes
                .iter()
                .map(|p| {
                    let mut comm = String::new();
                    push_for_terminal(&mut comm, &p.comm);
                    format!("{} ({}) {}", p.pid, comm, p.count)
                })
                .collect();
            let _ = writeln!(text, "  processes:  {}", processes.join(", "));
        }
        if let Some(tree) = &report.tree {
            push_tree_report(&mut text, tree);
            if report.kernel.tree_not_followed > 0 {
                let _ = writeln!(
                    text,
                    "  tree:       {} processes or threads of it were not followed (the kernel's map of the tree was \
                     full): their binds are missing",
                    report.kernel.tree_not_followed
                );
            }
        }
        let k = &report.kernel;
        if report.dropped > 0 || report.decode_errors > 0 || k.address_unreadable > 0 {
            let _ = writeln!(
                text,
                "  kernel:     seen {} filtered {} emitted {}; lost {} (ring buffer full) + {} (entry lost) + {} (hook skipped) + {} (kretprobe missed); \
                 {} without address; {} undecodable",
                k.seen,
                k.filtered,
                k.emitted,
                k.dropped_ring_buffer_full,
                k.dropped_entry_lost,
                k.dropped_recursion,
                k.dropped_return_missed,
                k.address_unreadable,
                report.decode_errors
            );
        }
        let d = &report.diagnoses;
        if d.followed + d.shed + d.lookup_timeouts > 0 {
            let _ = writeln!(
                text,
                "  diagnoses:  {} lookups; {} followed their event; {} skipped (overload or stopped); {} lookups timed out",
                d.lookups, d.followed, d.shed, d.lookup_timeouts
            );
        }
        if d.ports_forwarded > 0 {
            let _ = writeln!(
                text,
                "  NAT:        {} to a port a NAT rule takes before any socket (see their reports)",
                if d.ports_forwarded == 1 { "1 bind".to_owned() } else { format!("{} binds", d.ports_forwarded) },
            );
        }
        if d.ports_shared + d.sharing_unchecked > 0 {
            let _ = writeln!(
                text,
                "  sharing:    {} joined a port another service holds (SO_REUSEPORT/SO_REUSEADDR); {} could not be checked (overload)",
                if d.ports_shared == 1 { "1 bind".to_owned() } else { format!("{} binds", d.ports_shared) },
                d.sharing_unchecked
            );
        }
        // After the lines already queued for stderr, in order.
        crate::say::flush();
        if self.events_on_stderr {
            // The events go to stderr too (`-- CMD`), through the output thread: the report
            // follows them there, never ahead of an event still queued.
            self.output.buffer().extend_from_slice(text.as_bytes());
            return self.output.flush();
        }
        // The report is for the operator: stderr, whatever stdout is.
        use io::Write as _;
        let mut stderr = io::stderr().lock();
        stderr.write_all(text.as_bytes())?;
        stderr.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::tests::sample_event, sink::tests::Shared};

    fn render(color: bool, event: &BindEvent) -> String {
        let shared = Shared::default();
        let mut sink = TableSink::new(Output::new(Box::new(shared.clone())), color);
        sink.event(&Enriched {
            seq: 1,
            event: (*event).into(),
            wall_ns: 1_795_600_931_000_000_000,
            explained: Explained::Nothing,
            identity: None,
        })
        .expect("row");
        sink.flush().expect("flush");
        shared.text()
    }

    /// The live table leaves netlink binds out (counted in the report) unless asked for.
    #[test]
    fn netlink_binds_are_left_out_of_the_table_when_hidden() {
        let mut netlink = sample_event();
        netlink.family = AF_NETLINK;
        netlink.ret = 0;
        for (hide, rows) in [(true, 0), (false, 1)] {
            let shared = Shared::default();
            let mut sink = TableSink::new(Output::new(Box::new(shared.clone())), false).hiding_netlink(hide);
            let enriched =
                Enriched { seq: 1, event: netlink.into(), wall_ns: 0, explained: Explained::Nothing, identity: None };
            sink.event(&enriched).expect("row");
            sink.flush().expect("flush");
            let text = shared.text();
            assert_eq!(text.lines().filter(|l| !l.starts_with("TIME ")).count(), rows, "hide {hide}: {text}");
            assert_eq!(sink.netlink_hidden, u64::from(hide));
        }
    }

    #[test]
    fn rows_align_under_the_header() {
        let text = render(false, &sample_event());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("TIME "));
        let result_col = lines[0].find("RESULT").expect("RESULT column");
        assert_eq!(&lines[1][result_col..], "EADDRINUSE (Address already in use)");
        assert!(lines[1].contains(" 4242 python3 "), "{}", lines[1]);
        assert!(lines[1].contains(" tcp     a      127.0.0.1:8080 "), "{}", lines[1]);
        assert!(!text.contains('\x1b'), "no colour when disabled");
    }

    /// Issue 11: escaped and wide names, `stream`/`udplite` and long IPv6 addresses shifted
    /// the columns after them.
    #[test]
    fn no_value_moves_the_result_column() {
        let header = render(false, &sample_event());
        let result_at = super::super::columns::width(&header[..header.find("RESULT").expect("RESULT")]);
        let mut events = Vec::new();
        for comm in [&b"\x1b[2J\x07\x01\x02\x03\x04\x05"[..], "名前付きプロセ".as_bytes(), b"\xff\xfe\xfd\xfc", b"a\\b"]
        {
            let mut event = sample_event();
            event.comm = [0; 16];
            event.comm[..comm.len().min(15)].copy_from_slice(&comm[..comm.len().min(15)]);
            events.push(event);
        }
        for (sock_type, protocol) in [(1, 0), (2, 136), (1, 262)] {
            let mut event = sample_event();
            event.sock_type = sock_type;
            event.protocol = protocol;
            events.push(event);
        }
        let mut v6 = sample_event();
        v6.family = bindtrace_common::AF_INET6;
        v6.addr = [0x20, 0x01, 0x0d, 0xb8, 0x85, 0xa3, 0x12, 0x34, 0x8a, 0x2e, 0x03, 0x70, 0x73, 0x34, 0xab, 0xcd];
        v6.port = 65535;
        events.push(v6);
        for event in events {
            let text = render(false, &event);
            let row = text.lines().nth(1).expect("row");
            let at = row.find("EADDRINUSE").expect("result");
            assert_eq!(super::super::columns::width(&row[..at]), result_at, "{row}");
        }
    }

    #[test]
    fn a_port_zero_bind_shows_the_port_the_kernel_picked() {
        let mut event = sample_event();
        event.ret = 0;
        event.port = 0;
        event.bound_port = 41234;
        assert!(render(false, &event).contains(" 127.0.0.1:0→41234 "), "{}", render(false, &event));
        event.ret = -98;
        assert!(render(false, &event).contains(" 127.0.0.1:0 "), "a failed bind picked nothing");
    }

    #[test]
    fn options_are_letters() {
        let mut event = sample_event();
        assert_eq!(options(&event), "a");
        event.sock_flags |= sock_flags::REUSEPORT | sock_flags::V6ONLY | sock_flags::FREEBIND;
        assert_eq!(options(&event), "ap6f");
        event.sock_flags = sock_flags::SOCK_INFO;
        assert_eq!(options(&event), "-");
        event.sock_flags = 0;
        assert_eq!(options(&event), "?");
    }

    #[test]
    fn failures_are_coloured_and_names_escaped() {
        let mut event = sample_event();
        event.comm = [0; 16];
        event.comm[..6].copy_from_slice(b"\x1b]0;x\x07");
        let text = render(true, &event);
        assert!(text.contains("\x1b[1m\x1b[31mEADDRINUSE") || text.contains("\x1b[31m"), "{text:?}");
        assert!(text.contains("\\u{1b}]0;x\\u{7}"), "{text:?}");
        assert_eq!(text.matches('\x1b').count(), 3, "only bindtrace's own colour codes: {text:?}");
        let mut ok = sample_event();
        ok.ret = 0;
        assert!(!render(true, &ok).contains('\x1b'), "successes are not highlighted");
    }
}
