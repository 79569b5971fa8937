//! The diagnoses of every case, from constructed facts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bindtrace_common::{BindEvent, AF_INET6};

use super::{
    conflict::conflicts,
    in_use::{CONNECTIONS_SHOWN_MAX, HOLDERS_SHOWN_MAX},
    not_available::is_local_address,
    *,
};
use crate::{
    decode::tests::sample_event,
    enrich::lookup::{Holder, NetnsFacts, OwnersSeen, ProcessFacts, ProcessUnread, SocketTable},
    host::{
        owners::ProcessInfo,
        policy::BindPolicy,
        sockdiag::{DiagSocket, Proto, TCP_LISTEN, TCP_TIME_WAIT},
    },
};

fn socket(local: &str, state: u8, v6only: Option<bool>) -> DiagSocket {
    DiagSocket {
        proto: Proto::Tcp,
        local: local.parse().expect("addr"),
        peer: "0.0.0.0:0".parse().expect("addr"),
        state,
        uid: 0,
        inode: 99,
        timer_ms: None,
        v6only,
    }
}

fn nginx() -> ProcessInfo {
    ProcessInfo {
        pid: 977,
        comm: "nginx".into(),
        cmdline: "nginx: master process".into(),
        cgroup: Some("/system.slice/nginx.service".into()),
        uid: Some(0),
        identity: None,
        forwards: None,
        socket_unit: None,
        start_time: 0,
        session: 0,
    }
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().expect("ip"))
}

#[test]
fn conflict_rules_follow_the_kernel() {
    let v4_any = socket("0.0.0.0:80", TCP_LISTEN, None);
    let v4_lo = socket("127.0.0.1:80", TCP_LISTEN, None);
    let v6_any_dual = socket("[::]:80", TCP_LISTEN, Some(false));
    let v6_any_only = socket("[::]:80", TCP_LISTEN, Some(true));
    let v6_mapped = socket("[::ffff:127.0.0.1]:80", TCP_LISTEN, Some(false));
    assert!(conflicts(ip("127.0.0.1"), false, &v4_any));
    assert!(conflicts(ip("0.0.0.0"), false, &v4_lo));
    assert!(conflicts(ip("127.0.0.1"), false, &v4_lo));
    assert!(!conflicts(ip("127.0.0.2"), false, &v4_lo));
    assert!(conflicts(ip("127.0.0.1"), false, &v6_any_dual), ":: without V6ONLY covers IPv4");
    assert!(!conflicts(ip("127.0.0.1"), false, &v6_any_only), ":: with V6ONLY does not");
    assert!(conflicts(ip("127.0.0.1"), false, &v6_mapped));
    assert!(!conflicts(ip("127.0.0.2"), false, &v6_mapped));
    assert!(conflicts(ip("::"), false, &v4_lo), "[::] without V6ONLY meets IPv4 holders");
    assert!(!conflicts(ip("::"), true, &v4_lo));
    assert!(conflicts(ip("::1"), false, &socket("[::]:80", TCP_LISTEN, Some(true))));
    assert!(!conflicts(ip("::1"), false, &socket("[::2]:80", TCP_LISTEN, Some(true))));
    assert!(conflicts(None, false, &v4_lo), "unknown request address");
}

fn holders_facts(holders: Vec<Holder>) -> Facts {
    Facts::Sockets(Ok(SocketTable::from_holders(holders)))
}

fn run(event: &BindEvent, facts: &[(LookupKey, Facts)], history: &BindHistory) -> Diagnosis {
    diagnose(&(*event).into(), |key| facts.iter().find(|(k, _)| k == key).map(|(_, f)| f), history).expect("a failure")
}

/// Issue 19: every ESTABLISHED socket on a busy port was a "holder" (a 7.2 MB line).
#[test]
fn a_busy_port_names_its_listener_and_counts_the_connections() {
    let event = sample_event(); // 127.0.0.1:8080 tcp EADDRINUSE
    let listener = Holder {
        socket: socket("0.0.0.0:8080", TCP_LISTEN, None),
        processes: vec![nginx(); 40],
        owners: OwnersSeen::Complete,
    };
    let mut holders = vec![listener];
    for i in 0..18_000u32 {
        let mut accepted = socket("127.0.0.1:8080", 1, None);
        accepted.inode = 1_000 + i;
        accepted.peer = SocketAddr::new(IpAddr::from([127, 0, 0, 2 + (i % 3) as u8]), 10_000 + (i % 50_000) as u16);
        holders.push(Holder { socket: accepted, processes: vec![nginx()], owners: OwnersSeen::Complete });
    }
    let facts = vec![(needed_lookups(&event.into()).remove(0), holders_facts(holders))];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::InUse);
    assert_eq!(d.holders.inet()[0].state, "LISTEN");
    assert!(d.holders.len() <= HOLDERS_SHOWN_MAX + CONNECTIONS_SHOWN_MAX, "{}", d.holders.len());
    assert_eq!((d.holders.inet()[0].processes.len(), d.holders.inet()[0].processes_total), (PROCESSES_SHOWN, Some(40)));
    let summary = d.holders_summary.as_ref().expect("counted");
    assert_eq!((summary.total, summary.shown, summary.truncated), (18_001, d.holders.len(), true));
    assert_eq!(summary.by_state.get("ESTABLISHED"), Some(&18_000));
    assert_eq!(summary.by_state.get("LISTEN"), Some(&1));
    assert_eq!(summary.distinct_peers, Some(3));
    assert!(d.summary.contains("(+18000 more sockets)"), "{}", d.summary);
    let json = serde_json::to_string(&d).expect("json");
    assert!(json.len() <= DIAGNOSIS_BYTES_MAX, "{} bytes", json.len());
}

/// Sixteen SO_REUSEPORT listeners with long command lines do not fit: the list is cut,
/// and says so.
#[test]
fn a_diagnosis_too_long_for_a_line_is_cut_to_fit() {
    let mut event = sample_event();
    event.sock_flags |= sock_flags::REUSEPORT;
    let worker = |pid: u32| ProcessInfo { pid, cmdline: format!("worker {}", "x".repeat(500)), ..nginx() };
    let holders: Vec<Holder> = (0..16u32)
        .map(|i| {
            let mut listener = socket("127.0.0.1:8080", TCP_LISTEN, None);
            listener.inode = 100 + i;
            Holder {
                socket: listener,
                processes: (0..8).map(|p| worker(1_000 + i * 8 + p)).collect(),
                owners: OwnersSeen::Complete,
            }
        })
        .collect();
    let facts = vec![(needed_lookups(&event.into()).remove(0), holders_facts(holders))];
    let d = run(&event, &facts, &BindHistory::default());
    let json = serde_json::to_string(&d).expect("json");
    assert!(json.len() <= DIAGNOSIS_BYTES_MAX, "{} bytes", json.len());
    let summary = d.holders_summary.as_ref().expect("says it was cut");
    assert!(summary.truncated && summary.total == 16 && summary.shown == d.holders.len(), "{summary:?}");
    assert!(!d.holders.is_empty(), "the first holder is still named");
}

#[test]
fn listener_holder_is_named_with_its_process_and_bind_time() {
    let event = sample_event(); // 127.0.0.1:8080 tcp EADDRINUSE
    let mut history = BindHistory::default();
    let mut holder_bind = sample_event();
    holder_bind.ret = 0;
    holder_bind.tgid = 977;
    history.record(&holder_bind, 1_795_600_931_000_000_000);
    let key = needed_lookups(&event.into()).remove(0);
    let facts = vec![(key, holders_facts(vec![nginx_listening("0.0.0.0:8080", None)]))];
    let d = run(&event, &facts, &history);
    assert_eq!(d.kind, DiagnosisKind::InUse);
    assert!(
        d.summary
            .starts_with("port 8080/tcp is held by pid 977 (nginx: master process), LISTEN on 0.0.0.0:8080 since "),
        "{}",
        d.summary
    );
    assert!(d.summary.ends_with("; stop it or bind another port"), "{}", d.summary);
    assert_eq!(d.holders.len(), 1);
    assert_eq!(d.holders.inet()[0].processes[0].pid, 977);
    assert!(d.holders.inet()[0].seen_bind.is_some());
}

#[test]
fn time_wait_only_explains_the_reuseaddr_rule() {
    let mut event = sample_event();
    event.sock_flags &= !sock_flags::REUSEADDR;
    let mut tw = socket("127.0.0.1:8080", TCP_TIME_WAIT, None);
    tw.inode = 0;
    tw.timer_ms = Some(40_100);
    tw.peer = "127.0.0.1:50000".parse().expect("peer");
    let facts = vec![(
        needed_lookups(&event.into()).remove(0),
        holders_facts(vec![Holder { socket: tw, processes: vec![], owners: OwnersSeen::Complete }]),
    )];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::TimeWait);
    assert!(
        d.summary.starts_with("only TIME_WAIT sockets hold 8080/tcp (expires in 41 s), no process"),
        "{}",
        d.summary
    );
    assert!(d.summary.contains("set SO_REUSEADDR on the new socket and on the listening socket"), "{}", d.summary);
    assert_eq!(d.facts.time_wait_expires_ms, Some(40_100));
    assert_eq!(d.facts.new_socket_reuseaddr, Some(false));
    assert_eq!(d.holders.inet()[0].peer, Some("127.0.0.1:50000".parse().expect("peer")));

    // The new socket has it, the old listener (seen by bindtrace) did not.
    event.sock_flags |= sock_flags::REUSEADDR;
    let mut history = BindHistory::default();
    let mut listener = sample_event();
    listener.ret = 0;
    listener.sock_flags &= !sock_flags::REUSEADDR;
    history.record(&listener, 1);
    let d = run(&event, &facts, &history);
    assert!(d.summary.contains("the old listening socket did not set SO_REUSEADDR"), "{}", d.summary);
    assert_eq!(d.facts.old_socket_reuseaddr, Some(false));
}

/// A listener of nginx's (pid 977) at `local`.
fn nginx_listening(local: &str, v6only: Option<bool>) -> Holder {
    Holder { socket: socket(local, TCP_LISTEN, v6only), processes: vec![nginx()], owners: OwnersSeen::Complete }
}

/// dnsmasq holds 0.0.0.0:P and [::]:P (IPV6_V6ONLY); a [::] bind fails. The [::] holder
/// is the reason: "set IPV6_V6ONLY" would not have been enough (it used to be the advice).
#[test]
fn a_holder_of_the_same_family_leads_over_a_dual_stack_overlap() {
    let mut event = sample_event();
    event.family = AF_INET6;
    event.addr = std::net::Ipv6Addr::UNSPECIFIED.octets();
    let facts = vec![(
        needed_lookups(&event.into()).remove(0),
        holders_facts(vec![nginx_listening("0.0.0.0:8080", None), nginx_listening("[::]:8080", Some(true))]),
    )];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::InUse, "{}", d.summary);
    assert!(!d.summary.contains("IPV6_V6ONLY"), "{}", d.summary);
    assert!(d.holders.inet().first().is_some_and(|h| h.addr.is_ipv6()), "the [::] holder first: {:?}", d.holders);
    // Only the IPv4 holder: then dual-stack is the reason, and fixing it is enough.
    let facts =
        vec![(needed_lookups(&event.into()).remove(0), holders_facts(vec![nginx_listening("0.0.0.0:8080", None)]))];
    assert_eq!(run(&event, &facts, &BindHistory::default()).kind, DiagnosisKind::InUseDualStack);
}

/// A process that bound 0.0.0.0:P, then [::]:P (IPV6_V6ONLY): an IPv4 failure is blocked by
/// the 0.0.0.0 socket, and its bind is the one reported (it was the later [::] one).
#[test]
fn the_seen_bind_is_the_blocking_sockets_own() {
    let event = sample_event(); // IPv4 127.0.0.1:8080
    let mut history = BindHistory::default();
    let mut v4 = sample_event();
    v4.ret = 0;
    v4.tgid = 977;
    v4.addr = [0; 16];
    history.record(&v4, 1_000_000_000);
    let mut v6 = v4;
    v6.family = AF_INET6;
    v6.sock_flags |= sock_flags::V6ONLY;
    history.record(&v6, 2_000_000_000);
    let facts = vec![(
        needed_lookups(&event.into()).remove(0),
        holders_facts(vec![nginx_listening("0.0.0.0:8080", None), nginx_listening("[::]:8080", Some(true))]),
    )];
    let d = run(&event, &facts, &history);
    let first = d.holders.inet().first().expect("the blocking holder");
    assert!(first.addr.is_ipv4(), "{:?}", d.holders);
    let seen = serde_json::to_value(first).expect("json")["seen_bind"].clone();
    assert_eq!(seen["time"], "00:00:01.000", "the 0.0.0.0 bind's time, not the [::] one's: {seen}");
}

#[test]
fn dual_stack_and_reuseport_cases() {
    let event = sample_event(); // IPv4 127.0.0.1:8080
    let facts = vec![(
        needed_lookups(&event.into()).remove(0),
        holders_facts(vec![Holder {
            socket: socket("[::]:8080", TCP_LISTEN, Some(false)),
            processes: vec![nginx()],
            owners: OwnersSeen::Complete,
        }]),
    )];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::InUseDualStack);
    assert!(d.summary.contains("IPV6_V6ONLY"), "{}", d.summary);

    let mut event = sample_event();
    event.sock_flags |= sock_flags::REUSEPORT;
    event.uid = 1000;
    let mut history = BindHistory::default();
    let mut holder_bind = sample_event();
    holder_bind.ret = 0;
    holder_bind.tgid = 977;
    holder_bind.uid = 0;
    holder_bind.sock_flags |= sock_flags::REUSEPORT;
    history.record(&holder_bind, 1);
    let facts = vec![(
        needed_lookups(&event.into()).remove(0),
        holders_facts(vec![Holder {
            socket: socket("127.0.0.1:8080", TCP_LISTEN, None),
            processes: vec![nginx()],
            owners: OwnersSeen::Complete,
        }]),
    )];
    let d = run(&event, &facts, &history);
    assert_eq!(d.kind, DiagnosisKind::InUseReuseport);
    assert!(d.summary.contains("different users (uid 0 vs 1000)"), "{}", d.summary);
}

#[test]
fn released_port_and_failed_lookup_say_so() {
    let event = sample_event();
    let key = needed_lookups(&event.into()).remove(0);
    let d = run(&event, &[(key, holders_facts(vec![]))], &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::Released);
    let d = run(&event, &[(key, Facts::Sockets(Err("namespace gone".into())))], &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::Unknown);
    assert_eq!(d.unknown, vec!["namespace gone".to_owned()]);
    // Read from /proc/net, an empty list does not prove the port free (only-bound TCP
    // sockets are not in it).
    let mut table = SocketTable::from_holders(vec![]);
    table.from_sock_diag = false;
    let d = run(&event, &[(key, Facts::Sockets(Ok(table)))], &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::Unknown);
    assert!(d.summary.contains("cannot see sockets that are only bound"), "{}", d.summary);
}

#[test]
fn eacces_names_the_sysctl_and_the_capability() {
    let mut event = sample_event();
    event.ret = -libc::EACCES;
    event.port = 80;
    let netns = Facts::Netns(Ok(NetnsFacts { unprivileged_port_start: Some(1024), ..Default::default() }));
    let facts = vec![
        (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
        (
            LookupKey::Process { pid: event.tgid },
            Facts::Process(Ok(ProcessFacts { effective: 0, ..ProcessFacts::default() })),
        ),
    ];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::PrivilegedPort);
    assert!(d.summary.contains("below net.ipv4.ip_unprivileged_port_start (1024)"), "{}", d.summary);
    assert!(d.summary.contains("lacks CAP_NET_BIND_SERVICE"), "{}", d.summary);
    assert_eq!(d.facts.cap_net_bind_service, Some(false));
    assert_eq!(d.facts.cap_eff.as_deref(), Some("0000000000000000"));

    let with_cap = vec![
        (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
        (
            LookupKey::Process { pid: event.tgid },
            Facts::Process(Ok(ProcessFacts { effective: 1 << 10, ..ProcessFacts::default() })),
        ),
    ];
    assert_eq!(run(&event, &with_cap, &BindHistory::default()).kind, DiagnosisKind::RefusedByPolicy);
    event.port = 8080;
    assert_eq!(run(&event, &facts, &BindHistory::default()).kind, DiagnosisKind::RefusedByPolicy);
    let exited = vec![
        (LookupKey::Netns { netns: event.netns_ino }, netns),
        (LookupKey::Process { pid: event.tgid }, Facts::Process(Err(ProcessUnread::Exited))),
    ];
    event.port = 80;
    let d = run(&event, &exited, &BindHistory::default());
    assert!(d.unknown[0].contains("exited"), "{:?}", d.unknown);
    // The capabilities the probe recorded at the failure serve after the exit.
    event.sock_flags |= sock_flags::TASK_FACTS;
    event.cap_effective = 0x3f;
    let d = run(&event, &exited, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::PrivilegedPort, "{d:?}");
    assert_eq!(d.facts.cap_eff.as_deref(), Some("000000000000003f"));
    assert!(d.unknown.is_empty(), "{:?}", d.unknown);
}

#[test]
fn eaddrnotavail_checks_the_namespace_addresses() {
    let mut event = sample_event();
    event.ret = -libc::EADDRNOTAVAIL;
    event.addr[..4].copy_from_slice(&[192, 0, 2, 1]);
    let netns = NetnsFacts {
        nonlocal_bind_v4: Some(0),
        addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)],
        ..Default::default()
    };
    let facts = vec![(LookupKey::Netns { netns: event.netns_ino }, Facts::Netns(Ok(netns)))];
    let d = run(&event, &facts, &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::AddressNotAvailable);
    assert!(d.summary.starts_with("192.0.2.1 is not assigned to any interface"), "{}", d.summary);
    assert!(d.summary.contains("net.ipv4.ip_nonlocal_bind = 0 and IP_FREEBIND is off"), "{}", d.summary);
    assert_eq!(d.facts.address_assigned, Some(false));
    assert!(is_local_address("127.0.0.53".parse().expect("ip"), &[IpAddr::V4(Ipv4Addr::LOCALHOST)]));
    assert!(!is_local_address("10.0.0.1".parse().expect("ip"), &[IpAddr::V4(Ipv4Addr::LOCALHOST)]));
}

/// Issue 12: EACCES/EPERM that capabilities do not explain: the cgroup program in force
/// is named first, then an active LSM; with neither known, the generic wording stays.
#[test]
fn refusals_by_a_cgroup_program_or_an_lsm() {
    let mut event = sample_event();
    event.ret = -libc::EPERM;
    let netns = Facts::Netns(Ok(NetnsFacts { unprivileged_port_start: Some(1024), ..Default::default() }));
    let with = |policy: BindPolicy| {
        let facts = vec![
            (LookupKey::Netns { netns: event.netns_ino }, netns.clone()),
            (
                LookupKey::Process { pid: event.tgid },
                Facts::Process(Ok(ProcessFacts { effective: 0, policy, ..ProcessFacts::default() })),
            ),
        ];
        run(&event, &facts, &BindHistory::default())
    };
    let d = with(BindPolicy {
        cgroup_dir: Some("/sys/fs/cgroup/app.slice".into()),
        bind4_programs: Ok(vec![42]),
        ..BindPolicy::default()
    });
    assert_eq!(d.kind, DiagnosisKind::RefusedByCgroupBpf);
    assert!(d.summary.contains("/sys/fs/cgroup/app.slice (program id 42)"), "{}", d.summary);
    assert_eq!(d.facts.cgroup_bind_programs, Some(vec![42]));
    // EACCES is not what a cgroup program returns: its presence is not named the cause.
    let mut eacces = event;
    eacces.ret = -libc::EACCES;
    let facts = vec![
        (LookupKey::Netns { netns: eacces.netns_ino }, netns.clone()),
        (
            LookupKey::Process { pid: eacces.tgid },
            Facts::Process(Ok(ProcessFacts {
                effective: 0,
                policy: BindPolicy { bind4_programs: Ok(vec![42]), ..BindPolicy::default() },
                ..ProcessFacts::default()
            })),
        ),
    ];
    assert_ne!(run(&eacces, &facts, &BindHistory::default()).kind, DiagnosisKind::RefusedByCgroupBpf);
    let d = with(BindPolicy { lsms: Some(vec!["capability".into(), "apparmor".into()]), ..BindPolicy::default() });
    assert_eq!(d.kind, DiagnosisKind::RefusedByLsm);
    assert!(d.summary.contains("no cgroup BPF bind program is in force, and apparmor is active"), "{}", d.summary);
    let d = with(BindPolicy::default());
    assert_eq!(d.kind, DiagnosisKind::RefusedByPolicy);
    assert!(d.unknown.iter().any(|u| u.contains("LSMs could not be read")), "{:?}", d.unknown);
}

/// Issue 12: a tentative IPv6 address got "missing (or, for IPv6, still tentative)".
#[test]
fn ipv6_addresses_still_in_or_failed_by_duplicate_address_detection() {
    let mut event = sample_event();
    event.ret = -libc::EADDRNOTAVAIL;
    event.family = AF_INET6;
    let v6: Ipv6Addr = "2001:db8::1".parse().expect("ip");
    event.addr = v6.octets();
    for (flags, kind, words) in [
        (0xc0, DiagnosisKind::AddressTentative, "is still tentative"),
        (0x88, DiagnosisKind::AddressDadFailed, "failed duplicate address detection"),
    ] {
        let netns = NetnsFacts {
            addresses: vec![IpAddr::V6(v6)],
            ipv6_states: vec![crate::enrich::lookup::Ipv6State { addr: v6, flags, interface: "eth0".into() }],
            ..Default::default()
        };
        let facts = vec![(LookupKey::Netns { netns: event.netns_ino }, Facts::Netns(Ok(netns)))];
        let d = run(&event, &facts, &BindHistory::default());
        assert_eq!(d.kind, kind);
        assert!(d.summary.starts_with(&format!("2001:db8::1 on eth0 {words}")), "{}", d.summary);
        assert_eq!(d.facts.ipv6_flags.as_deref(), Some(format!("{flags:#04x}").as_str()));
    }
}

#[test]
fn einval_and_other_errnos() {
    let mut event = sample_event();
    event.ret = -libc::EINVAL;
    event.bound_port = 41000;
    event.bound_addr4 = [127, 0, 0, 1];
    let d = run(&event, &[], &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::AlreadyBound);
    assert!(d.summary.contains("already bound to 127.0.0.1:41000"), "{}", d.summary);
    event.bound_port = 0;
    event.sock_flags |= sock_flags::ADDR_SHORT;
    event.addrlen = 8;
    assert!(run(&event, &[], &BindHistory::default()).summary.contains("addrlen 8 is too short"));

    event.ret = -libc::ENOMEM;
    let d = run(&event, &[], &BindHistory::default());
    assert_eq!(d.kind, DiagnosisKind::Other);
    assert_eq!(d.summary, "ENOMEM: Cannot allocate memory");
    let mut ok = sample_event();
    ok.ret = 0;
    assert!(diagnose(&ok.into(), |_| None, &BindHistory::default()).is_none());
}
