//! Scenario by scenario: the event each bind made, field by field, and the same scenario
//! across backends.

use std::collections::HashMap;

use serde_json::Value;

use super::{console::GuestRun, report::Tally};

/// Is `event` the one scenario `s` made? Its pid, and the fields of its `match` object (unix
/// names, the caller's errors), or else its port and address.
pub(super) fn is_event_of(event: &Value, s: &Value) -> bool {
    if event["type"] != "bind" || event["pid"] != s["pid"] {
        return false;
    }
    match s["match"].as_object() {
        Some(fields) => fields.iter().all(|(field, wanted)| event[field] == *wanted),
        None => event["port"] == s["port"] && event["addr"] == s["addr"],
    }
}

/// Checks every scenario against the last bind event of its pid, port and address (or its
/// `match` fields). Returns the failures, in words.
pub(super) fn check(scenarios: &[Value], events: &[Value], backend: &str) -> Vec<String> {
    let mut failures = Vec::new();
    if scenarios.is_empty() {
        failures.push("bind-scenarios printed nothing".to_owned());
    }
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap_or("?");
        if let Some(why) = s["setup_error"].as_str() {
            failures.push(format!("{name}: its setup failed: {why}"));
            continue;
        }
        // A bind some backends cannot see by design (io_uring's, under the syscall
        // tracepoints): under those, seeing it would make the README's table wrong.
        if let Some(seen_by) = s["seen_by"].as_array() {
            if !seen_by.iter().any(|b| b == backend) {
                if events.iter().any(|e| is_event_of(e, s)) {
                    failures.push(format!("{name}: {backend} saw it, but the README says {backend} cannot"));
                }
                continue;
            }
        }
        let Some(event) = events.iter().rev().find(|e| is_event_of(e, s)) else {
            failures.push(format!("{name}: no event for pid {} {}", s["pid"], s.get("match").unwrap_or(&s["port"])));
            continue;
        };
        if let Some(expect) = s["expect"].as_object() {
            let backend_field = ("backend".to_owned(), Value::from(backend));
            for (field, wanted) in expect.iter().chain([(&backend_field.0, &backend_field.1)]) {
                if field == "diagnosis_kind" {
                    // On the event, or in the `diagnosis` record that follows it with its seq.
                    let diagnosis = if event["diagnosis"].is_object() {
                        &event["diagnosis"]
                    } else {
                        events
                            .iter()
                            .find(|e| e["type"] == "diagnosis" && e["seq"] == event["seq"])
                            .map_or(&Value::Null, |record| &record["diagnosis"])
                    };
                    if diagnosis["kind"] != *wanted {
                        failures.push(format!("{name}: the diagnosis is {diagnosis}, expected kind {wanted}"));
                    }
                    continue;
                }
                if event[field] != *wanted {
                    failures.push(format!("{name}: {field} is {} in the event, expected {wanted}", event[field]));
                }
            }
            continue;
        }
        let options: Vec<&str> =
            s["options"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let has = |opt: (i32, i32)| options.contains(&format!("{}:{}", opt.0, opt.1).as_str());
        let mut expect: HashMap<&str, Value> = HashMap::from([
            ("backend", Value::from(backend)),
            ("errno", s["errno"].clone()),
            ("family", s["family"].clone()),
            ("proto", s["proto"].clone()),
            ("reuseaddr", Value::Bool(has((libc::SOL_SOCKET, libc::SO_REUSEADDR)))),
            ("reuseport", Value::Bool(has((libc::SOL_SOCKET, libc::SO_REUSEPORT)))),
            ("freebind", Value::Bool(has((libc::IPPROTO_IP, libc::IP_FREEBIND)))),
            ("transparent", Value::Bool(has((libc::IPPROTO_IP, libc::IP_TRANSPARENT)))),
            ("bind_address_no_port", Value::Bool(has((libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)))),
        ]);
        if s["family"] == "AF_INET6" {
            // The kernel turns IPV6_V6ONLY on when a bind of a specific (not ::, not
            // v4-mapped) IPv6 address succeeds; bindtrace reads the socket after bind().
            let specific = s["addr"].as_str().is_some_and(|a| a != "::" && !a.starts_with("::ffff:"));
            let forced = specific && s["errno"] == 0;
            expect.insert("v6only", Value::Bool(forced || has((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY))));
        }
        let mut fields: Vec<_> = expect.into_iter().collect();
        fields.sort_by_key(|(k, _)| *k);
        for (field, wanted) in fields {
            if event[field] != wanted {
                failures.push(format!("{name}: {field} is {} in the event, expected {wanted}", event[field]));
            }
        }
    }
    failures
}

/// Fields every backend must fill the same way for the same scenario (pids, times and the
/// fd differ between runs or backends by design).
pub(super) const COMPARED_FIELDS: [&str; 17] = [
    "comm",
    "uid",
    "gid",
    "family",
    "addr",
    "port",
    "proto",
    "ret",
    "errno_name",
    "reuseaddr",
    "reuseport",
    "v6only",
    "freebind",
    "transparent",
    "bind_address_no_port",
    "bound_port",
    "netns",
];

/// The event each scenario produced, per backend, compared field by field across backends.
pub(super) fn compare_backends(label: &str, runs: &[GuestRun], tally: &mut Tally) {
    let Some(reference) = runs.first() else { return };
    let event_of = |run: &GuestRun, scenario: &Value| -> Option<Value> {
        let name = &scenario["scenario"];
        let mine = run.scenarios.iter().find(|s| s["scenario"] == *name)?;
        run.events.iter().rev().find(|e| is_event_of(e, mine)).cloned()
    };
    for scenario in &reference.scenarios {
        let Some(expected) = event_of(reference, scenario) else { continue };
        let mut agree = true;
        for run in &runs[1..] {
            let Some(other) = event_of(run, scenario) else { continue };
            for field in COMPARED_FIELDS {
                if other[field] != expected[field] {
                    agree = false;
                    tally.failures.push(format!(
                        "{label}: {} differs between {} ({}) and {} ({}) on {field}",
                        scenario["scenario"], reference.backend, expected[field], run.backend, other[field]
                    ));
                }
            }
        }
        if agree {
            tally.passed += 1;
        } else {
            tally.failed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scenario() -> Value {
        json!({"scenario":"tcp4_ok","pid":7,"family":"AF_INET","proto":"tcp","addr":"127.0.0.1","port":41001,"errno":0,
               "options":[format!("{}:{}", libc::SOL_SOCKET, libc::SO_REUSEADDR)]})
    }

    fn event(reuseaddr: bool, errno: i32) -> Value {
        json!({"type":"bind","backend":"tracepoint","pid":7,"family":"AF_INET","proto":"tcp","addr":"127.0.0.1","port":41001,"errno":errno,
               "reuseaddr":reuseaddr,"reuseport":false,"freebind":false,"transparent":false,"bind_address_no_port":false})
    }

    #[test]
    fn a_matching_event_passes_and_every_difference_is_named() {
        assert!(check(&[scenario()], &[event(true, 0)], "tracepoint").is_empty());
        assert!(check(&[scenario()], &[event(true, 0)], "fexit")[0].contains("backend"));
        let failures = check(&[scenario()], &[event(false, 98)], "tracepoint");
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures.iter().any(|f| f.starts_with("tcp4_ok: errno is 98")));
        assert!(failures.iter().any(|f| f.starts_with("tcp4_ok: reuseaddr is false")));
        assert!(check(&[scenario()], &[], "tracepoint")[0].contains("no event"));
        assert!(!check(&[], &[], "tracepoint").is_empty(), "no scenarios is a failure");
    }

    #[test]
    fn backends_are_compared_on_bind_events_not_on_diagnosis_records() {
        let run = |backend: &str, with_follow_up: bool| {
            let mut events = vec![event(true, 0)];
            if with_follow_up {
                events.push(json!({"type":"diagnosis","seq":1,"pid":7,"addr":"127.0.0.1","port":41001}));
            }
            GuestRun {
                backend: backend.into(),
                exit: "exit=0".into(),
                events,
                scenarios: vec![scenario()],
                ..GuestRun::default()
            }
        };
        let mut tally = Tally::default();
        compare_backends("test", &[run("fexit", false), run("kprobe", true)], &mut tally);
        assert_eq!((tally.passed, tally.failed), (1, 0), "{:?}", tally.failures);
    }
}
