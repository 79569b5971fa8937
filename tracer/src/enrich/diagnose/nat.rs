//! Ports a NAT rule claims: a successful bind whose traffic a DNAT or REDIRECT rule sends
//! elsewhere first (it will never see it), and a failure on a port that a rule also claims.

use std::sync::Arc;

use bindtrace_common::{op, sock_flags};

use crate::{
    decode::{Bind, BindEventExt as _},
    enrich::{
        history::effective_port,
        lookup::{Facts, LookupKey},
    },
    host::{
        nat::{NatClaim, NatRules},
        sockdiag::Proto,
    },
    model::{Diagnosis, DiagnosisFacts, DiagnosisKind, Holders},
};

/// A successful bind to a port it chose (not port 0's pick) asks for the NAT rules.
pub(super) fn needed_lookup(event: &Bind) -> Option<LookupKey> {
    let explicit = event.ret == 0
        && event.op == op::BIND
        && event.port != 0
        && event.has(sock_flags::SOCK_INFO)
        && event.requested_ip().is_some();
    (explicit && Proto::from_ipproto(event.protocol).is_some()).then_some(LookupKey::Nat { netns: event.netns_ino })
}

/// The report on a successful bind whose port a NAT rule claims.
pub(super) fn port_forwarded<'a>(event: &Bind, facts: &impl Fn(&LookupKey) -> Option<&'a Facts>) -> Option<Diagnosis> {
    let key = needed_lookup(event)?;
    let Some(Facts::Nat(Ok(rules))) = facts(&key) else { return None };
    let proto = Proto::from_ipproto(event.protocol)?;
    let port = effective_port(event);
    let claims = rules.on_port(proto, port, event.requested_ip(), event.has(sock_flags::V6ONLY));
    let first = claims.first()?;
    let from = if claims.iter().any(|c| c.hook == "prerouting") && claims.iter().any(|c| c.hook == "output") {
        "from other hosts and from this one"
    } else if first.hook == "prerouting" {
        "from other hosts"
    } else {
        "from this host"
    };
    let more = claims.len() - 1;
    Some(Diagnosis {
        kind: DiagnosisKind::PortForwarded,
        summary: format!(
            "port {port}/{} is taken by NAT before any socket: {}{}; connections to it {from} never reach this socket: \
             remove the rule (or stop what made it: a container publishing the port, a Service's NodePort or hostPort), \
             or bind another port",
            proto.name(),
            first.describe(),
            if more > 0 { format!(" (+{more} more rule{})", if more == 1 { "" } else { "s" }) } else { String::new() },
        ),
        holders: Holders::default(),
        holders_summary: None,
        facts: DiagnosisFacts { forwarded_by: claims.into_iter().cloned().collect(), ..DiagnosisFacts::default() },
        unknown: rules.unread.clone(),
    })
}

/// Adds the NAT rules that also claim a failed bind's port to its diagnosis (a port a
/// runtime publishes is both held by its proxy and forwarded by a rule).
pub(super) fn note_claims(diagnosis: &mut Diagnosis, event: &Bind, rules: &Result<Arc<NatRules>, String>) {
    let Some(proto) = Proto::from_ipproto(event.protocol) else { return };
    match rules {
        Ok(rules) => {
            let claims = rules.on_port(proto, event.port, event.requested_ip(), event.has(sock_flags::V6ONLY));
            // The containers the holders already stand for (a docker-proxy, podman's conmon):
            // a rule that forwards to them only says again what the sentence says.
            let named: Vec<&str> = diagnosis
                .holders
                .inet()
                .iter()
                .flat_map(|h| &h.processes)
                .flat_map(|p| {
                    let forwarded = p.forwards.as_ref().and_then(|f| f.container.as_ref());
                    let own = p.identity.as_ref().and_then(|i| i.container.as_ref());
                    [forwarded, own]
                })
                .flatten()
                .map(|c| c.id.as_str())
                .collect();
            let news = |claim: &&&NatClaim| {
                claim.containers.is_empty() || claim.containers.iter().any(|c| !named.contains(&c.id.as_str()))
            };
            let new: Vec<&&NatClaim> = claims.iter().filter(news).collect();
            if let Some(first) = new.first() {
                let more = match new.len() - 1 {
                    0 => String::new(),
                    1 => " (+1 more rule)".to_owned(),
                    n => format!(" (+{n} more rules)"),
                };
                diagnosis.summary = format!("{}; also, {}{more}", diagnosis.summary, first.describe());
            }
            diagnosis.facts.forwarded_by = claims.into_iter().cloned().collect();
        }
        Err(why) => diagnosis.unknown.push(format!("the NAT rules could not be read: {why}")),
    }
}
