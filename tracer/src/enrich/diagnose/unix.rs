//! EADDRINUSE on an AF_UNIX path or abstract name: who holds it, or why nothing does (a
//! stale socket file a crashed server left, a file that is not a socket).

use super::super::lookup::{Facts, OwnersSeen, UnixFacts, UnixFile, UnixHolder};
use crate::decode::{Bind, UnixPath};
use crate::model::{
    Diagnosis, DiagnosisFacts, DiagnosisKind, Holders, UnixFileReport, UnixHolderReport, PROCESSES_SHOWN_MAX,
};

fn unknown(summary: String, why: String) -> Diagnosis {
    Diagnosis {
        kind: DiagnosisKind::Unknown,
        summary,
        holders: Holders::default(),
        holders_summary: None,
        facts: DiagnosisFacts::default(),
        unknown: vec![why],
    }
}

fn holder_report(holder: &UnixHolder) -> UnixHolderReport {
    UnixHolderReport {
        sock_type: holder.socket.type_name(),
        state: holder.socket.state_name(),
        inode: holder.socket.inode,
        name: UnixPath::new(&holder.socket.name).display_text(),
        processes: holder.processes.iter().take(PROCESSES_SHOWN_MAX).cloned().collect(),
        processes_total: (holder.processes.len() > PROCESSES_SHOWN_MAX).then_some(holder.processes.len()),
        processes_hidden: match holder.owners {
            OwnersSeen::Partial(blind) => blind.reason(),
            _ => None,
        },
    }
}

/// "pid 4242 (/usr/bin/app --serve)", or what is known of a socket without a process.
fn who(holder: &UnixHolder, failing_pid: u32) -> String {
    match holder.processes.as_slice() {
        [first, ..] if first.pid == failing_pid => format!("pid {} itself (another of its sockets)", first.pid),
        [first, rest @ ..] => {
            let name = if first.cmdline.is_empty() { &first.comm } else { &first.cmdline };
            let more = match rest.len() {
                0 => String::new(),
                1 => " and 1 more process".to_owned(),
                n => format!(" and {n} more processes"),
            };
            format!("pid {} ({}){more}", first.pid, name.chars().take(80).collect::<String>())
        }
        [] => match holder.owners {
            OwnersSeen::Partial(_) => {
                format!("a socket (inode {}) whose process bindtrace cannot see", holder.socket.inode)
            }
            _ => format!("a socket (inode {}) that no process has open", holder.socket.inode),
        },
    }
}

fn modified(mtime_s: i64) -> (String, String) {
    let at = chrono::DateTime::from_timestamp(mtime_s, 0).unwrap_or_default();
    let local = at.with_timezone(&chrono::Local);
    (local.format("%Y-%m-%d %H:%M:%S").to_string(), at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn file_report(facts: &UnixFacts) -> Option<UnixFileReport> {
    let (kind, owner_uid, modified_at) = match &facts.file {
        UnixFile::NoFile => return None,
        UnixFile::Missing => ("missing", None, None),
        UnixFile::NotSocket { kind } => (*kind, None, None),
        UnixFile::Socket { uid, mtime_s, .. } => ("socket", Some(*uid), Some(modified(*mtime_s).1)),
        UnixFile::Unreadable(_) => ("unreadable", None, None),
    };
    Some(UnixFileReport { kind, owner_uid, modified: modified_at, looked_at: facts.looked_at.clone() })
}

/// The diagnosis of EADDRINUSE on an AF_UNIX bind, from its [`Facts::Unix`] answer.
pub(super) fn unix_in_use(event: &Bind, answer: Option<&Facts>) -> Diagnosis {
    let shown = event.endpoint();
    let facts = match answer {
        Some(Facts::Unix(Ok(facts))) if Some(&facts.path) == event.unix_path.as_ref() => facts,
        Some(Facts::Unix(Err(why))) => {
            return unknown(format!("{shown} is in use; its holder could not be looked up"), why.clone())
        }
        _ => {
            return unknown(
                format!("{shown} is in use; its holder could not be looked up"),
                "the lookup did not finish".to_owned(),
            )
        }
    };
    let mut details = DiagnosisFacts { unix_file: file_report(facts), ..DiagnosisFacts::default() };
    let unix_holders: Vec<UnixHolderReport> = facts.holders.iter().map(holder_report).collect();
    let mut unknown_facts = Vec::new();
    let (kind, summary) = if let Some(first) = facts.holders.first() {
        let itself = first.processes.iter().any(|p| p.pid == event.tgid);
        let summary = format!(
            "{shown} is held by {} ({}, {}); {}",
            who(first, event.tgid),
            first.socket.type_name(),
            first.socket.state_name(),
            if itself {
                "the process already bound this name on another socket: bind each name once"
            } else {
                "stop it or bind another path"
            }
        );
        (if itself { DiagnosisKind::InUseSelf } else { DiagnosisKind::InUse }, summary)
    } else {
        match &facts.file {
            UnixFile::NoFile => (
                DiagnosisKind::Released,
                format!("nothing holds {shown} now: the socket that had it was closed since; retry the bind"),
            ),
            UnixFile::Missing => (
                DiagnosisKind::Released,
                format!("nothing is at {shown} now: the file was removed since the bind failed; retry the bind"),
            ),
            UnixFile::NotSocket { kind } => (
                DiagnosisKind::PathExists,
                format!(
                    "{shown} exists and is a {kind}, not a socket: bind() never replaces an existing file; bind another path"
                ),
            ),
            UnixFile::Unreadable(why) => {
                unknown_facts.push(why.clone());
                (DiagnosisKind::Unknown, format!("bind() found {shown} taken (a file is there, or a socket holds the name), and it could not be looked at: {why}"))
            }
            UnixFile::Socket { uid, mtime_s, .. } => {
                let (when, _) = modified(*mtime_s);
                // The command to run names the file as the process saw it: a relative path
                // from its working directory, not the reader's.
                let rm = facts
                    .looked_at
                    .as_deref()
                    .and_then(|at| at.strip_prefix("/proc/")?.split_once("/root").map(|(_, path)| path.to_owned()))
                    .filter(|path| path.starts_with('/'))
                    .unwrap_or_else(|| shown.clone());
                let searched = facts.namespaces_searched;
                if facts.namespaces_unsearchable == 0 {
                    (
                        DiagnosisKind::StaleSocketFile,
                        format!(
                            "{shown} is a stale socket file (owner uid {uid}, modified {when}): no socket is bound to it, \
                             the server that created it exited without removing it; removing it before binding is safe \
                             (rm {rm}, or unlink() the path before bind())"
                        ),
                    )
                } else {
                    unknown_facts.push(format!(
                        "bindtrace could not search everywhere a socket could hold {shown} ({} place(s): network \
                         namespaces it could not read, or a socket list without socket files)",
                        facts.namespaces_unsearchable
                    ));
                    (
                        DiagnosisKind::StaleSocketFile,
                        format!(
                            "{shown} is a socket file (owner uid {uid}, modified {when}) that no socket bindtrace can see is \
                             bound to ({searched} network namespace(s) searched): most likely stale, left by a server that \
                             exited; removing it before binding is then safe (rm {rm})"
                        ),
                    )
                }
            }
        }
    };
    if facts.holders.iter().all(|h| h.processes.is_empty()) {
        if let Some(why) = facts.holders.first().and_then(|h| holder_report(h).processes_hidden) {
            unknown_facts.push(format!("the process holding {shown} is not visible: {why}"));
        }
    }
    details.unix_file = details.unix_file.take();
    Diagnosis {
        kind,
        summary,
        holders: Holders::Unix(unix_holders),
        holders_summary: None,
        facts: details,
        unknown: unknown_facts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{
        owners::{Blind, ProcessInfo},
        unixdiag::UnixSocket,
    };

    fn unix_holders(d: &Diagnosis) -> &[UnixHolderReport] {
        match &d.holders {
            Holders::Unix(holders) => holders,
            Holders::Inet(holders) => panic!("inet holders in an AF_UNIX diagnosis: {holders:?}"),
        }
    }

    fn event(path: &[u8]) -> Bind {
        let mut bind = Bind::from(crate::decode::tests::sample_event());
        bind.event.family = bindtrace_common::AF_UNIX;
        bind.event.port = 0;
        bind.unix_path = Some(UnixPath::new(path));
        bind
    }

    fn facts(path: &[u8], file: UnixFile, holders: Vec<UnixHolder>, unsearchable: usize) -> Facts {
        Facts::Unix(Ok(UnixFacts {
            path: UnixPath::new(path),
            looked_at: Some("/proc/4242/root/run/app.sock".to_owned()),
            file,
            holders,
            namespaces_searched: 3,
            namespaces_unsearchable: unsearchable,
        }))
    }

    fn holder(pid: Option<u32>, owners: OwnersSeen) -> UnixHolder {
        UnixHolder {
            socket: UnixSocket {
                inode: 77,
                sock_type: 1,
                state: 10,
                name: b"/run/app.sock".to_vec(),
                file: Some((5, 6)),
            },
            processes: pid
                .map(|pid| ProcessInfo {
                    pid,
                    comm: "app".into(),
                    cmdline: "/usr/bin/app --serve".into(),
                    cgroup: None,
                    uid: Some(0),
                    identity: None,
                    forwards: None,
                    socket_unit: None,
                    start_time: 0,
                    session: 0,
                })
                .into_iter()
                .collect(),
            owners,
        }
    }

    const SOCKET_FILE: UnixFile = UnixFile::Socket { ino: 5, dev: 6, uid: 1000, mtime_s: 1_795_600_000 };

    #[test]
    fn a_held_path_names_its_process() {
        let d = unix_in_use(
            &event(b"/run/app.sock"),
            Some(&facts(b"/run/app.sock", SOCKET_FILE, vec![holder(Some(977), OwnersSeen::Complete)], 0)),
        );
        assert_eq!(d.kind, DiagnosisKind::InUse);
        assert!(
            d.summary.starts_with("/run/app.sock is held by pid 977 (/usr/bin/app --serve) (stream, LISTEN)"),
            "{}",
            d.summary
        );
        assert_eq!(unix_holders(&d)[0].processes[0].pid, 977);
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(json["holders"][0]["type"], "stream", "{json}");
        assert_eq!(json["facts"]["unix_file"]["kind"], "socket");
    }

    #[test]
    fn a_path_the_failing_process_holds_itself_says_so() {
        let d = unix_in_use(
            &event(b"/run/app.sock"),
            Some(&facts(b"/run/app.sock", SOCKET_FILE, vec![holder(Some(4242), OwnersSeen::Complete)], 0)),
        );
        assert_eq!(d.kind, DiagnosisKind::InUseSelf);
        assert!(d.summary.contains("pid 4242 itself"), "{}", d.summary);
    }

    #[test]
    fn a_socket_file_nothing_is_bound_to_is_stale_and_safe_to_remove() {
        let d = unix_in_use(&event(b"/run/app.sock"), Some(&facts(b"/run/app.sock", SOCKET_FILE, vec![], 0)));
        assert_eq!(d.kind, DiagnosisKind::StaleSocketFile);
        assert!(d.summary.contains("stale socket file (owner uid 1000, modified "), "{}", d.summary);
        assert!(d.summary.contains("removing it before binding is safe"), "{}", d.summary);
        assert_eq!(d.facts.unix_file.as_ref().and_then(|f| f.owner_uid), Some(1000));
    }

    #[test]
    fn a_socket_file_with_unsearched_namespaces_is_not_called_certainly_stale() {
        let d = unix_in_use(&event(b"/run/app.sock"), Some(&facts(b"/run/app.sock", SOCKET_FILE, vec![], 2)));
        assert_eq!(d.kind, DiagnosisKind::StaleSocketFile);
        assert!(
            d.summary.contains("no socket bindtrace can see") && d.summary.contains("most likely stale"),
            "{}",
            d.summary
        );
        assert!(d.unknown.iter().any(|u| u.contains("could not read")), "{:?}", d.unknown);
    }

    #[test]
    fn an_invisible_holder_is_not_called_absent() {
        let blind = Blind { own_pid_namespace: true, ..Blind::default() };
        let d = unix_in_use(
            &event(b"/run/app.sock"),
            Some(&facts(b"/run/app.sock", SOCKET_FILE, vec![holder(None, OwnersSeen::Partial(blind))], 0)),
        );
        assert!(d.summary.contains("whose process bindtrace cannot see"), "{}", d.summary);
        assert!(!d.summary.contains("no process"), "{}", d.summary);
    }

    #[test]
    fn a_file_that_is_not_a_socket_and_a_removed_one() {
        let d = unix_in_use(
            &event(b"/run/app.sock"),
            Some(&facts(b"/run/app.sock", UnixFile::NotSocket { kind: "regular file" }, vec![], 0)),
        );
        assert_eq!(d.kind, DiagnosisKind::PathExists);
        assert!(d.summary.contains("is a regular file, not a socket"), "{}", d.summary);
        let d = unix_in_use(&event(b"/run/app.sock"), Some(&facts(b"/run/app.sock", UnixFile::Missing, vec![], 0)));
        assert_eq!(d.kind, DiagnosisKind::Released);
    }

    #[test]
    fn abstract_names_and_answers_for_another_path() {
        let d = unix_in_use(&event(b"\0app"), Some(&facts(b"\0app", UnixFile::NoFile, vec![], 0)));
        assert_eq!(d.kind, DiagnosisKind::Released);
        assert!(d.summary.contains("@app"), "{}", d.summary);
        let d = unix_in_use(&event(b"/run/a.sock"), Some(&facts(b"/run/b.sock", SOCKET_FILE, vec![], 0)));
        assert_eq!(d.kind, DiagnosisKind::Unknown, "an answer for another path is not used");
    }
}
