//! The stage's order, deadlines, follow-ups, shedding and caches, with lookups made up.

use super::*;
use crate::decode::tests::sample_event;
use crate::host::runtimes::Runtime;

/// Pops everything ready now.
fn drain(enricher: &mut Enricher, now: Instant) -> Vec<Enriched> {
    std::iter::from_fn(|| enricher.pop(now, false)).collect()
}

async fn next_done(results: &mut UnboundedReceiver<Done>) -> Done {
    tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("lookup answers").expect("worker")
}

/// Stores the answers of the `n` lookups started (a failure asks for its port's sockets
/// and the namespace's NAT rules).
async fn complete(enricher: &mut Enricher, results: &mut UnboundedReceiver<Done>, n: u64) {
    for _ in 0..n {
        enricher.complete(next_done(results).await);
    }
}

/// A success whose socket was not read: only its identity is looked up (no NAT rules,
/// no sharing).
fn success_without_socket() -> BindEvent {
    let mut event = sample_event();
    event.ret = 0;
    event.sock_flags &= !bindtrace_common::sock_flags::SOCK_INFO;
    event
}

#[tokio::test]
async fn a_storm_of_identical_failures_costs_one_lookup_and_keeps_order() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results channel");
    let start = Instant::now();
    let mut ok = sample_event();
    ok.ret = 0;
    ok.port = 1;
    enricher.push(sample_event().into(), 1, start);
    enricher.push(ok.into(), 2, start);
    for i in 0..8_000 {
        enricher.push(sample_event().into(), 3 + i, start);
    }
    assert_eq!(enricher.counters().lookups, 0, "lookups start once the batch is in");
    enricher.poll(start);
    assert_eq!(
        enricher.counters().lookups,
        2,
        "one socket dump and one read of the NAT rules for 8,001 identical failures and a success"
    );
    assert!(enricher.pop(start, false).is_none(), "the first failure waits for its lookup");
    // The lookups were requested as the first event arrived: they serve the events that
    // arrived with it, at the same instant.
    complete(&mut enricher, &mut results, 2).await;
    let out = drain(&mut enricher, start);
    assert_eq!(out.len(), 8_002);
    assert!(out.windows(2).all(|w| w[0].seq + 1 == w[1].seq), "events leave in order");
    let Explained::Now(first) = &out[0].explained else { panic!("diagnosed: {:?}", out[0].explained) };
    assert_eq!(out[1].explained, Explained::Nothing, "successes get no diagnosis");
    let (Explained::Now(a), Explained::Now(b)) = (&out[2].explained, &out[3].explained) else { panic!("diagnosed") };
    assert!(Arc::ptr_eq(a, b) && Arc::ptr_eq(first, a), "identical failures share one diagnosis");
}

#[tokio::test]
async fn an_event_leaves_at_its_deadline_and_its_diagnosis_follows() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results channel");
    let start = Instant::now();
    enricher.push(sample_event().into(), 1, start);
    let mut ok = sample_event();
    ok.ret = 0;
    enricher.push(ok.into(), 2, start);
    enricher.poll(start);
    assert!(enricher.pop(start + EMIT_DEADLINE / 2, false).is_none(), "waits before its deadline");
    assert_eq!(enricher.next_wake(), Some(start + EMIT_DEADLINE));
    let late = start + EMIT_DEADLINE;
    let out = drain(&mut enricher, late);
    assert_eq!(out.len(), 2, "the failure and the success behind it both leave at the deadline");
    assert_eq!((out[0].seq, &out[0].explained), (1, &Explained::Follows));
    assert!(enricher.follow_ups(late, false, usize::MAX).is_empty(), "nothing answered yet");
    let started = enricher.counters().lookups;
    complete(&mut enricher, &mut results, started).await;
    let follow_ups = enricher.follow_ups(late, false, usize::MAX);
    assert_eq!(follow_ups.len(), 1);
    assert_eq!(follow_ups[0].seq, 1, "linked to its event");
    assert!(!enricher.has_pending());
    assert_eq!(enricher.counters().followed, 1);
}

#[tokio::test]
async fn follow_ups_leave_a_slice_at_a_time_in_order() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results channel");
    let start = Instant::now();
    let in_netns = |netns| {
        let mut event = sample_event();
        event.netns_ino = netns;
        Bind::from(event)
    };
    // The first waits for other lookups than the two behind it.
    enricher.push(in_netns(1), 1, start);
    enricher.push(in_netns(2), 2, start);
    enricher.push(in_netns(2), 3, start);
    enricher.poll(start);
    let late = start + EMIT_DEADLINE;
    assert_eq!(drain(&mut enricher, late).len(), 3, "written at their deadline, diagnoses to follow");
    let first_keys = enricher.following.front().expect("following").keys.clone();
    let mut held = Vec::new();
    for _ in 0..enricher.counters().lookups {
        let done = next_done(&mut results).await;
        if first_keys.contains(&done.key) {
            held.push(done);
        } else {
            enricher.complete(done);
        }
    }
    assert!(!held.is_empty(), "the first event's lookups are held back");
    let seqs = |follow_ups: Vec<FollowUp>| follow_ups.iter().map(|f| f.seq).collect::<Vec<_>>();
    assert_eq!(seqs(enricher.follow_ups(late, false, 1)), [2], "one a call, the first answered");
    for done in held {
        enricher.complete(done);
    }
    assert_eq!(seqs(enricher.follow_ups(late, false, 10)), [1, 3], "the rest still in order");
    assert!(!enricher.has_pending());
}

#[tokio::test]
async fn an_answer_from_before_an_event_does_not_explain_it() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results channel");
    let start = Instant::now();
    enricher.push(sample_event().into(), 1, start);
    enricher.poll(start);
    complete(&mut enricher, &mut results, 2).await;
    assert!(matches!(enricher.pop(start, false).map(|e| e.explained), Some(Explained::Now(_))));
    // The same failure again, later: the old answer predates it, and a new lookup starts
    // once MIN_REFRESH has passed.
    let later = start + Duration::from_millis(10);
    enricher.push(sample_event().into(), 2, later);
    enricher.poll(later);
    assert!(enricher.pop(later, false).is_none());
    assert_eq!(enricher.counters().lookups, 2, "not before MIN_REFRESH");
    assert!(enricher.next_wake().is_some_and(|at| at <= start + MIN_REFRESH));
    enricher.poll(start + MIN_REFRESH);
    assert_eq!(enricher.counters().lookups, 3, "the sockets again; the NAT rules' answer lasts");
    complete(&mut enricher, &mut results, 1).await;
    assert!(matches!(enricher.pop(later, false).map(|e| e.explained), Some(Explained::Now(_))));
}

/// Past the queue's cap the oldest events leave before their deadline (their diagnosis
/// follows): a storm's backlog cannot grow the queue without bound.
#[test]
fn past_its_cap_the_queue_lets_the_oldest_go() {
    let mut enricher = Enricher::new(true);
    let start = Instant::now();
    for i in 0..QUEUE_MAX + 100 {
        enricher.push(sample_event().into(), i as i128, start);
    }
    assert_eq!(enricher.over_cap(), 100);
    let out = drain(&mut enricher, start);
    assert_eq!(out.len(), 100, "down to the cap");
    assert_eq!(out[0].explained, Explained::Follows, "its diagnosis follows");
    assert_eq!(enricher.over_cap(), 0);
}

#[test]
fn overload_sheds_diagnoses_never_events() {
    let mut enricher = Enricher::new(true);
    let start = Instant::now();
    let total = FOLLOWING_MAX + 10;
    for i in 0..total {
        let mut event = sample_event();
        event.port = 1000 + (i % 50_000) as u16;
        event.netns_ino = 1 + i as u32; // a key each: answers cannot come in time
        enricher.push(event.into(), i as i128, start);
    }
    let out = drain(&mut enricher, start + EMIT_DEADLINE);
    assert_eq!(out.len(), total, "every event is written");
    let follows = out.iter().filter(|e| e.explained == Explained::Follows).count();
    let shed = out.iter().filter(|e| e.explained == Explained::Shed(SHED_OVERLOAD)).count();
    // Each failure takes two keys (its sockets, its namespace's NAT rules): the keys run
    // out, at KEYS_MAX / 2 failures, before the follow-up queue does; the rest are shed.
    assert_eq!((follows, shed), (KEYS_MAX / 2, total - KEYS_MAX / 2));
    assert_eq!(enricher.counters().shed, shed as u64);
    assert!(enricher.keys.len() <= KEYS_MAX);
}

/// A success of this process, in its own cgroup.
fn own_success() -> BindEvent {
    let mut event = success_without_socket();
    event.tgid = std::process::id();
    event.cgroup_id = cgroup::ProcessCgroups::read(event.tgid)
        .and_then(|c| c.v2)
        .and_then(|path| cgroup::id_of_path(&path).ok())
        .map_or(1, |(id, _)| id);
    event
}

#[tokio::test]
async fn a_resolved_identity_is_looked_up_once_and_serves_later_events() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results");
    let start = Instant::now();
    enricher.push(own_success().into(), 0, start);
    enricher.poll(start);
    assert!(drain(&mut enricher, start).is_empty(), "a success waits for its identity");
    enricher.complete(next_done(&mut results).await);
    let first = drain(&mut enricher, Instant::now());
    assert_eq!(first.len(), 1);
    let identity = first[0].identity.clone().expect("an identity");
    assert_eq!(identity.unresolved, None, "{identity:?}");
    assert!(identity.cgroup.is_some() && identity.container.is_none(), "the test runs on the host: {identity:?}");
    // A later event of the same cgroup is served by that answer, at once.
    let later = Instant::now();
    enricher.push(own_success().into(), 0, later);
    enricher.poll(later);
    let second = drain(&mut enricher, later);
    assert_eq!(second.len(), 1, "served without a lookup");
    assert_eq!(second[0].identity, Some(identity));
    assert_eq!(enricher.counters().lookups, 1);
}

/// A cgroup whose path names no container (a service, a session) is known at once: the
/// event waits for no lookup, and its identity is there even if the process and its
/// cgroup are gone by the time a lookup would run.
#[tokio::test]
async fn a_host_cgroup_is_known_from_its_path_at_once() {
    let Some(mount) = cgroup::v2_mount() else {
        if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
            panic!("no cgroup v2 hierarchy is mounted");
        }
        eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
        return;
    };
    let name = format!("bindtrace-quick-{}.scope", std::process::id());
    let dir = mount.join(&name);
    if let Err(err) = std::fs::create_dir(&dir) {
        if std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_some() {
            panic!("cannot make a cgroup: {err}");
        }
        eprintln!("SKIPPED: cannot make a cgroup: {err}");
        return;
    }
    let (id, _) = cgroup::id_of_path(&format!("/{name}")).expect("its id");
    let mut enricher = Enricher::new(true);
    let mut event = success_without_socket();
    event.tgid = u32::MAX - 9; // no such process
    event.cgroup_id = id;
    let start = Instant::now();
    enricher.push(event.into(), 0, start);
    enricher.poll(start);
    let out = drain(&mut enricher, start);
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(out.len(), 1, "written at once, no lookup awaited");
    let identity = out[0].identity.clone().expect("an identity");
    assert_eq!(identity.unresolved, None, "{identity:?}");
    assert_eq!(identity.cgroup.as_deref(), Some(format!("/{name}").as_str()));
    assert_eq!(identity.unit.as_deref(), Some(name.as_str()));
    assert_eq!(enricher.counters().lookups, 0);
}

/// A container's identity not answered by the event's deadline still says what its
/// cgroup's path says: the runtime and the container's id (its name unknown, and why).
#[test]
fn past_its_deadline_a_containers_event_still_names_the_container_by_its_path() {
    let Some(mount) = cgroup::v2_mount() else {
        assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "no cgroup v2 hierarchy is mounted");
        eprintln!("SKIPPED: no cgroup v2 hierarchy is mounted");
        return;
    };
    let id_text = format!("{:064x}", u64::from(std::process::id()));
    let dir = mount.join(format!("docker-{id_text}.scope"));
    if let Err(err) = std::fs::create_dir(&dir) {
        assert!(std::env::var_os("BINDTRACE_REQUIRE_ROOT").is_none(), "cannot make a cgroup: {err}");
        eprintln!("SKIPPED: cannot make a cgroup: {err}");
        return;
    }
    let (id, _) = cgroup::id_of_path(&format!("/docker-{id_text}.scope")).expect("its id");
    let mut enricher = Enricher::new(true);
    let mut event = success_without_socket();
    event.cgroup_id = id;
    let start = Instant::now();
    enricher.push(event.into(), 0, start);
    // No poll: the lookup never starts, as if the runtime were slow.
    let out = drain(&mut enricher, start + EMIT_DEADLINE);
    let _ = std::fs::remove_dir(&dir);
    let identity = out[0].identity.clone().expect("an identity");
    let container = identity.container.as_ref().expect("the container its path names");
    assert_eq!(
        (container.runtime, container.id.as_str(), container.name.as_deref()),
        (Runtime::Docker, id_text.as_str(), None)
    );
    assert!(identity.unresolved.as_deref().is_some_and(|why| why.contains("100 ms")), "{identity:?}");
}

#[tokio::test]
async fn an_unresolved_identity_is_asked_again_and_never_reads_as_none() {
    let mut enricher = Enricher::new(true);
    let mut results = enricher.take_results().expect("results");
    // A cgroup that does not exist, of a process that does not either.
    let mut event = success_without_socket();
    event.tgid = u32::MAX - 7;
    event.cgroup_id = u64::MAX - 7;
    let start = Instant::now();
    enricher.push(event.into(), 0, start);
    enricher.poll(start);
    enricher.complete(next_done(&mut results).await);
    let out = drain(&mut enricher, Instant::now());
    let identity = out[0].identity.clone().expect("an identity");
    assert!(identity.unresolved.is_some(), "{identity:?}");
    assert_eq!(identity.container, None);
    // The failed answer does not serve a later event: that one is looked up again.
    let later = Instant::now() + MIN_REFRESH;
    enricher.push(event.into(), 0, later);
    enricher.poll(later);
    assert!(drain(&mut enricher, later).is_empty(), "waits for a new lookup");
    assert_eq!(enricher.counters().lookups, 2);
    // Past its deadline it leaves, saying why it has no identity.
    let due = drain(&mut enricher, later + EMIT_DEADLINE);
    assert!(due[0].identity.as_ref().is_some_and(|i| i.unresolved.is_some()));
}

/// A pid reused by another program is not served the old process's identity (issue 19):
/// on an id shared by every process (the hierarchy's root) the key is the pid and name.
#[test]
fn a_reused_pid_with_another_name_is_looked_up_again() {
    let root = cgroup::v2_mount().and_then(|mount| std::fs::metadata(mount).ok()).map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.ino()
    });
    let Some(root) = root else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy on this host");
        return;
    };
    let mut enricher = Enricher::new(true);
    let start = Instant::now();
    let mut first = sample_event();
    first.ret = 0;
    first.cgroup_id = root;
    let mut reused = first;
    reused.comm = *b"other-program\0\0\0";
    enricher.push(first.into(), 0, start);
    enricher.push(first.into(), 0, start);
    enricher.push(reused.into(), 0, start);
    let identity_keys: HashSet<LookupKey> = enricher.queue.iter().filter_map(|p| p.identity_key).collect();
    assert_eq!(identity_keys.len(), 2, "one key per (pid, name): {identity_keys:?}");
}

#[test]
fn disabled_passes_through_and_force_empties_the_queue() {
    let start = Instant::now();
    let mut off = Enricher::new(false);
    off.push(sample_event().into(), 1, start);
    let out = off.pop(start, false).expect("no waiting when disabled");
    assert_eq!(out.explained, Explained::Nothing);

    let mut on = Enricher::new(true);
    on.push(sample_event().into(), 1, start);
    let forced = on.pop(start, true).expect("forced");
    let Explained::Now(diagnosis) = forced.explained else { panic!("a diagnosis even without facts") };
    assert_eq!(diagnosis.kind, DiagnosisKind::Unknown);
    assert!(diagnosis.unknown.iter().any(|u| u.contains("did not finish")), "{diagnosis:?}");
    assert!(!on.has_pending());
}
