//! Ports claimed by NAT, not by a socket: DNAT and REDIRECT rules of nftables and iptables
//! (Docker with `--userland-proxy=false`, CNI's portmap for Kubernetes hostPort, kube-proxy's
//! NodePorts). Such a port may have no socket at all, or a socket that never sees the
//! traffic, because the rule rewrites its destination first.
//!
//! Two sources, each for what it decodes:
//! - `nft -j list ruleset`: native nftables rules (kube-proxy's nftables mode, firewalld, rules
//!   written by hand), whose `dnat`/`redirect` statements the JSON spells out.
//! - `iptables-nft-save -t nat` and `iptables-legacy-save -t nat` (and ip6tables'): rules made
//!   with iptables (legacy ones when the namespace has a legacy nat table). nft's JSON shows an iptables-nft DNAT target only as `xt DNAT`, without its
//!   destination, and cannot see iptables-legacy at all; the `-save` output is the format
//!   `iptables-restore` reads back (one rule a line, options as written), not `iptables -L`'s
//!   listing. The nft tables that iptables-nft owns (`ip nat`, `ip6 nat`) are then read from
//!   it only.
//!
//! What neither decodes (nft verdict maps, an `xt` target with no iptables-nft-save to read it)
//! is said in `unread`, never taken for "no rule". Each tool runs within a deadline, and its
//! output is capped: a lookup thread must not hang on a huge or stuck ruleset.
//!
//! Rules are followed from the nat base chains (prerouting: traffic from other hosts; output:
//! traffic from this host) through jumps and gotos, so that a port matched in one chain and
//! rewritten in another (Docker's `DOCKER` chain, kube-proxy's `KUBE-NODEPORTS` ->
//! `KUBE-SVC-*` -> `KUBE-SEP-*`) is found with where it goes.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::Value;

use super::sockdiag::Proto;

/// Chains followed from a base chain at most (kube-proxy: NODEPORTS -> EXT -> SVC -> SEP).
const DEPTH_MAX: usize = 8;
/// Destinations listed per claim at most (a Service with many endpoints).
const DESTINATIONS_MAX: usize = 16;

/// An address condition of a rule: `daddr` in `net`/`prefix` (or not, `negated`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct AddressMatch {
    pub net: IpAddr,
    pub prefix: u8,
    pub negated: bool,
}

impl AddressMatch {
    fn matches(&self, addr: IpAddr) -> bool {
        let inside = match (self.net, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix.min(32))).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix.min(128))).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => return false,
        };
        inside != self.negated
    }
}

/// What a rule does with a packet that matches it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Rewrites the destination: `addr:port` as written (either may be absent).
    Dnat(String),
    /// To a port of this host.
    Redirect(Option<String>),
    Jump(String),
    /// Anything else (ACCEPT, RETURN, MASQUERADE, a counter...).
    Other,
}

/// One rule, reduced to what matters here.
#[derive(Clone, Debug)]
struct Rule {
    proto: Option<Proto>,
    /// Destination ports (inclusive ranges); empty: any.
    ports: Vec<(u16, u16)>,
    daddr: Option<AddressMatch>,
    comment: Option<String>,
    verdict: Verdict,
}

/// One nat table: chains by name, and the base chains' hooks.
#[derive(Debug, Default)]
struct Table {
    /// How the table is named in its tool (`nftables ip bindtrace`, `iptables nat`).
    name: String,
    /// `ipv4`, `ipv6` or `any`.
    family: &'static str,
    chains: HashMap<String, Vec<Rule>>,
    /// (chain, hook) of the base chains: `prerouting` or `output`.
    bases: Vec<(String, &'static str)>,
    /// What its rules hold that is not decoded (nftables tables), said when it is a nat table.
    undecoded: Vec<String>,
}

/// A rule that takes traffic to a port before any socket sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct NatClaim {
    /// `nftables ip nat`, `iptables nat`, `iptables-legacy nat`, `ip6tables nat`.
    pub table: String,
    /// The address family the rule sees: `ipv4`, `ipv6`, or `any` (an nftables inet table).
    pub family: &'static str,
    /// The chains from the base chain to the rule that matched the port.
    pub chains: Vec<String>,
    /// Traffic it applies to: `prerouting` (from other hosts), `output` (from this host).
    pub hook: &'static str,
    pub proto: Option<Proto>,
    /// The ports it matches, as written (`8080`, `30000-32767`).
    pub ports: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daddr: Option<AddressMatch>,
    /// Where it sends the traffic: `10.88.0.2:80`, or `port 8080 of this host` (REDIRECT).
    pub to: Vec<String>,
    /// `to` lists only some.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub to_truncated: bool,
    /// The rule's comment (kube-proxy names the Service there: `default/web:http`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The containers at those destinations, as their runtime names them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<super::runtimes::Container>,
}

impl NatClaim {
    /// "a DNAT rule (iptables nat, chain DOCKER) sends tcp 18777 from other hosts to 10.0.0.2:80"
    pub(crate) fn describe(&self) -> String {
        let chain = self.chains.last().map(String::as_str).unwrap_or("?");
        let from = match self.hook {
            "prerouting" => "from other hosts",
            _ => "from this host",
        };
        let to = if self.to.is_empty() {
            "elsewhere (its destination could not be read)".to_owned()
        } else {
            let mut to = self.to.join(", ");
            if self.to_truncated {
                to.push_str(", ...");
            }
            to
        };
        let to = match self.containers.as_slice() {
            [] => to,
            containers => format!(
                "{to} ({})",
                containers
                    .iter()
                    .map(|c| format!("{} container {}", c.runtime.name(), c.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let comment = self.comment.as_ref().map(|c| format!(" \"{c}\"")).unwrap_or_default();
        let daddr = match &self.daddr {
            Some(d) => format!(" to {}{}/{}", if d.negated { "any address but " } else { "" }, d.net, d.prefix),
            None => String::new(),
        };
        format!(
            "a NAT rule{comment} ({}, chain {chain}) sends {} port {}{daddr} {from} to {to}",
            self.table,
            self.proto.map_or("any", Proto::name),
            self.ports
        )
    }
}

/// The nat rules of a network namespace, and the sources that could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NatRules {
    pub claims: Vec<NatClaim>,
    /// Why a source could not be read (not installed, refused, too slow) or what it holds
    /// that could not be decoded: a port found in no rule may still be claimed there.
    pub unread: Vec<String>,
    /// The namespace's own addresses: a rule for another destination (a Service's ClusterIP)
    /// does not take a wildcard bind's traffic, and one that sends the port to this host
    /// keeps it here.
    pub local: Vec<IpAddr>,
}

/// How long the tools may run, all together (below the lookups' 5 s, past which a lookup
/// thread is taken for hung), and how much of each one's output is read.
const READ_BUDGET: Duration = Duration::from_secs(3);
const TOOL_OUTPUT_MAX: usize = 64 << 20;

impl NatRules {
    /// Reads the rules of the calling thread's network namespace.
    pub(crate) fn read() -> Self {
        let deadline = Instant::now() + READ_BUDGET;
        let mut tables = Vec::new();
        let mut unread = Vec::new();
        let mut iptables_nft_read = Vec::new();
        for (tool, family) in [("iptables-nft-save", "ip"), ("ip6tables-nft-save", "ip6")] {
            match save_output(tool, deadline) {
                Ok(Some(text)) => {
                    iptables_nft_read.push(family);
                    let label = if family == "ip" { "iptables nat" } else { "ip6tables nat" };
                    // A nat table iptables cannot show (one written with nft): read from nft.
                    if text.contains("is incompatible") {
                        iptables_nft_read.pop();
                    }
                    tables.extend(parse_save(&text, label, if family == "ip" { "ipv4" } else { "ipv6" }));
                }
                Ok(None) => {}
                Err(why) => unread.push(why),
            }
        }
        // iptables-legacy's tables exist only once something loaded them; the namespace is
        // the thread's (the lookups enter others with setns).
        for (names, tool, family) in [
            ("/proc/thread-self/net/ip_tables_names", "iptables-legacy-save", "ipv4"),
            ("/proc/thread-self/net/ip6_tables_names", "ip6tables-legacy-save", "ipv6"),
        ] {
            let loaded = std::fs::read_to_string(names).unwrap_or_default();
            if !loaded.lines().any(|l| l.trim() == "nat") {
                continue;
            }
            let label = if family == "ipv4" { "iptables-legacy nat" } else { "ip6tables-legacy nat" };
            match save_output(tool, deadline) {
                Ok(Some(text)) => tables.extend(parse_save(&text, label, family)),
                Ok(None) => unread.push(format!("a legacy {label} table is loaded, but {tool} is not installed")),
                Err(why) => unread.push(why),
            }
        }
        match nft_ruleset(deadline) {
            Ok(json) => tables.extend(parse_nft(&json, &iptables_nft_read, &mut unread)),
            Err(why) => unread.push(why),
        }
        let claims = tables.iter().flat_map(claims_of).collect();
        Self { claims, unread, local: local_addresses() }
    }

    /// The claims on `port` of `proto` for traffic to `addr` (a wildcard: any of the
    /// namespace's addresses), of the family a socket bound there receives (`v6only`: IPv6
    /// alone). A loopback address sees only this host's own traffic (the output hook).
    pub(crate) fn on_port(&self, proto: Proto, port: u16, addr: Option<IpAddr>, v6only: bool) -> Vec<&NatClaim> {
        let ipv4 = match addr {
            Some(IpAddr::V4(_)) => true,
            Some(IpAddr::V6(v6)) => v6.is_unspecified() && !v6only || v6.to_ipv4_mapped().is_some(),
            None => true,
        };
        let ipv6 = !matches!(addr, Some(IpAddr::V4(_)));
        self.claims
            .iter()
            .filter(|c| c.proto.is_none_or(|p| p == proto))
            .filter(|c| match c.family {
                "ipv4" => ipv4,
                "ipv6" => ipv6,
                _ => true,
            })
            .filter(|c| c.hook == "output" || !addr.is_some_and(|a| a.is_loopback()))
            .filter(|c| covers(&c.ports, port))
            .filter(|c| match (&c.daddr, addr) {
                (Some(daddr), Some(addr)) if !addr.is_unspecified() => daddr.matches(addr),
                // A wildcard takes every local address: a rule for others does not concern it.
                (Some(daddr), _) if !daddr.negated => self.local.iter().any(|a| daddr.matches(*a)),
                _ => true,
            })
            // Sent to this host on the same port: the socket still gets it.
            .filter(|c| !c.to.iter().all(|to| self.stays_here(to, port)) || c.to.is_empty())
            .collect()
    }

    fn stays_here(&self, to: &str, port: u16) -> bool {
        if to == format!("port {port} of this host") {
            return true;
        }
        to.parse::<std::net::SocketAddr>().is_ok_and(|at| at.port() == port && self.local.contains(&at.ip()))
    }
}

/// The addresses of the calling thread's network namespace.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addresses
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}

/// Runs `program ARGS` until `deadline` at most, reading at most [`TOOL_OUTPUT_MAX`] of its
/// output: (status, stdout, stderr). Killed past the deadline.
fn run_within(
    program: &str,
    args: &[&str],
    deadline: Instant,
) -> std::io::Result<(std::process::ExitStatus, Vec<u8>, String)> {
    if Instant::now() >= deadline {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{program} was not run: reading the rules took {} s already", READ_BUDGET.as_secs()),
        ));
    }
    use std::io::Read as _;
    let mut child =
        Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other("no pipes to the tool"));
    };
    // Read beside the wait, so that a large output never fills the pipe and stalls it.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.take(TOOL_OUTPUT_MAX as u64).read_to_end(&mut out);
        out
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{program} did not finish within the {} s the rules may take", READ_BUDGET.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = reader.join().unwrap_or_default();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    Ok((status, out, err))
}

fn covers(ports: &str, port: u16) -> bool {
    ports.split(',').any(|part| match part.split_once('-') {
        Some((lo, hi)) => lo.parse::<u16>().is_ok_and(|lo| lo <= port) && hi.parse::<u16>().is_ok_and(|hi| port <= hi),
        None => part.parse::<u16>().is_ok_and(|p| p == port),
    })
}

/// A `*-save -t nat` run: `Ok(None)` when the tool is not installed (nothing of it to read),
/// `Err` when it is and failed.
fn save_output(tool: &str, deadline: Instant) -> Result<Option<String>, String> {
    match run_within(tool, &["-t", "nat"], deadline) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("{tool} could not be run: {err}")),
        Ok((status, out, _)) if status.success() => Ok(Some(String::from_utf8_lossy(&out).into_owned())),
        Ok((_, _, stderr)) => {
            // No nat table in this namespace: nothing to read.
            if stderr.contains("does not exist") {
                return Ok(None);
            }
            Err(format!("{tool} -t nat failed: {}", stderr.lines().next().unwrap_or("").trim()))
        }
    }
}

fn nft_ruleset(deadline: Instant) -> Result<Value, String> {
    let (status, out, stderr) = run_within("nft", &["-j", "list", "ruleset"], deadline).map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            "nftables rules were not read: nft is not installed (apt-get install nftables)".to_owned()
        } else {
            format!("nft could not be run: {err}")
        }
    })?;
    if !status.success() {
        return Err(format!("nft -j list ruleset failed: {}", stderr.lines().next().unwrap_or("").trim()));
    }
    serde_json::from_slice(&out).map_err(|err| format!("nft's JSON could not be read: {err}"))
}

/// Splits an iptables-save line into words, keeping quoted strings (`--comment "a b"`) whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => current.extend(chars.next()),
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn parse_address(text: &str) -> Option<(IpAddr, u8)> {
    match text.split_once('/') {
        Some((addr, len)) => {
            let addr: IpAddr = addr.parse().ok()?;
            // iptables-save writes prefixes as lengths; a dotted mask is read as one.
            let prefix = len
                .parse::<u8>()
                .ok()
                .or_else(|| len.parse::<std::net::Ipv4Addr>().ok().map(|mask| u32::from(mask).count_ones() as u8))?;
            Some((addr, prefix))
        }
        None => {
            let addr: IpAddr = text.parse().ok()?;
            Some((addr, if addr.is_ipv4() { 32 } else { 128 }))
        }
    }
}

fn parse_ports(text: &str) -> Vec<(u16, u16)> {
    text.split(',')
        .filter_map(|part| match part.split_once(':') {
            Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
            None => part.parse().ok().map(|p| (p, p)),
        })
        .collect()
}

/// The tables of one `*-save -t nat` output.
fn parse_save(text: &str, label: &str, family: &'static str) -> Option<Table> {
    let mut table = Table { name: label.to_owned(), family, ..Table::default() };
    let mut in_nat = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_nat = name.trim() == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or("").to_owned();
            match name.as_str() {
                "PREROUTING" => table.bases.push((name.clone(), "prerouting")),
                "OUTPUT" => table.bases.push((name.clone(), "output")),
                _ => {}
            }
            table.chains.entry(name).or_default();
            continue;
        }
        let words = words(line);
        if words.first().map(String::as_str) != Some("-A") {
            continue;
        }
        let Some(chain) = words.get(1) else { continue };
        let mut rule = Rule { proto: None, ports: Vec::new(), daddr: None, comment: None, verdict: Verdict::Other };
        let mut negate = false;
        let mut i = 2;
        while i < words.len() {
            let word = words[i].as_str();
            let value = words.get(i + 1).map(String::as_str);
            match (word, value) {
                ("!", _) => {
                    negate = true;
                    i += 1;
                    continue;
                }
                ("-p", Some(p)) => rule.proto = Proto::from_name(p),
                ("--dport" | "--dports" | "--destination-port" | "--destination-ports", Some(p)) if !negate => {
                    rule.ports = parse_ports(p)
                }
                ("-d" | "--destination", Some(d)) => {
                    rule.daddr = parse_address(d).map(|(net, prefix)| AddressMatch { net, prefix, negated: negate })
                }
                ("--comment", Some(c)) => rule.comment = Some(c.to_owned()),
                ("-j" | "-g", Some(target)) => {
                    rule.verdict = match target {
                        "DNAT" => Verdict::Dnat(String::new()),
                        "REDIRECT" => Verdict::Redirect(None),
                        _ if table.chains.contains_key(target) => Verdict::Jump(target.to_owned()),
                        _ => Verdict::Other,
                    }
                }
                ("--to-destination", Some(to)) => {
                    if let Verdict::Dnat(dest) = &mut rule.verdict {
                        if dest.is_empty() {
                            to.clone_into(dest);
                        }
                    }
                }
                ("--to-ports", Some(to)) => {
                    if let Verdict::Redirect(dest) = &mut rule.verdict {
                        *dest = Some(to.to_owned());
                    }
                }
                _ => {}
            }
            negate = false;
            i += 1;
        }
        table.chains.entry(chain.clone()).or_default().push(rule);
    }
    (!table.chains.is_empty()).then_some(table)
}

/// The native nftables tables with a nat chain; those iptables-nft owns (read from
/// iptables-nft-save) are left out.
fn parse_nft(json: &Value, iptables_nft_read: &[&str], unread: &mut Vec<String>) -> Vec<Table> {
    let Some(items) = json.get("nftables").and_then(Value::as_array) else { return Vec::new() };
    let mut tables: HashMap<(String, String), Table> = HashMap::new();
    let key = |object: &Value| -> Option<(String, String)> {
        Some((object.get("family")?.as_str()?.to_owned(), object.get("table")?.as_str()?.to_owned()))
    };
    let owned_by_iptables = |family: &str, table: &str| table == "nat" && iptables_nft_read.contains(&family);
    for item in items {
        if let Some(chain) = item.get("chain") {
            let Some((family, table)) = key(chain) else { continue };
            if owned_by_iptables(&family, &table) {
                continue;
            }
            let Some(name) = chain.get("name").and_then(Value::as_str) else { continue };
            let entry = tables.entry((family.clone(), table.clone())).or_insert_with(|| nft_table(&family, &table));
            entry.chains.entry(name.to_owned()).or_default();
            let is_nat = chain.get("type").and_then(Value::as_str) == Some("nat");
            match chain.get("hook").and_then(Value::as_str) {
                Some("prerouting") if is_nat => entry.bases.push((name.to_owned(), "prerouting")),
                Some("output") if is_nat => entry.bases.push((name.to_owned(), "output")),
                _ => {}
            }
        }
        if let Some(rule) = item.get("rule") {
            let Some((family, table)) = key(rule) else { continue };
            if owned_by_iptables(&family, &table) {
                continue;
            }
            let Some(chain) = rule.get("chain").and_then(Value::as_str) else { continue };
            let parsed = parse_nft_rule(rule);
            let exprs = rule.get("expr").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            // What could hide a rewrite: a verdict map (kube-proxy's nftables mode jumps
            // through them), or an iptables target (matches only select packets).
            let xt_target =
                |e: &Value| e.get("xt").and_then(|x| x.get("type")).and_then(Value::as_str) == Some("target");
            let undecoded = if exprs.iter().any(|e| e.get("vmap").is_some()) {
                Some("a verdict map")
            } else if exprs.iter().any(xt_target) && parsed.verdict == Verdict::Other {
                Some("an iptables target")
            } else {
                None
            };
            let entry = tables.entry((family.clone(), table.clone())).or_insert_with(|| nft_table(&family, &table));
            if let Some(what) = undecoded {
                let note =
                    format!("nftables table {family} {table}, chain {chain}, has {what} bindtrace does not decode");
                if !entry.undecoded.contains(&note) {
                    entry.undecoded.push(note);
                }
            }
            entry.chains.entry(chain.to_owned()).or_default().push(parsed);
        }
    }
    // Only tables with a nat chain can rewrite a destination: what the others hold does not
    // matter here (a filter table's FORWARD chain, say).
    let nat: Vec<Table> = tables.into_values().filter(|t| !t.bases.is_empty()).collect();
    for table in &nat {
        unread.extend(table.undecoded.iter().cloned());
    }
    nat
}

fn nft_table(family: &str, table: &str) -> Table {
    let family_seen = match family {
        "ip" => "ipv4",
        "ip6" => "ipv6",
        _ => "any",
    };
    Table { name: format!("nftables {family} {table}"), family: family_seen, ..Table::default() }
}

fn nft_ports(right: &Value) -> Vec<(u16, u16)> {
    let one = |v: &Value| -> Option<(u16, u16)> {
        if let Some(p) = v.as_u64() {
            let p = u16::try_from(p).ok()?;
            return Some((p, p));
        }
        let range = v.get("range")?.as_array()?;
        Some((u16::try_from(range.first()?.as_u64()?).ok()?, u16::try_from(range.get(1)?.as_u64()?).ok()?))
    };
    match right.get("set").and_then(Value::as_array) {
        Some(set) => set.iter().filter_map(one).collect(),
        None => one(right).into_iter().collect(),
    }
}

fn nft_address(right: &Value, negated: bool) -> Option<AddressMatch> {
    if let Some(text) = right.as_str() {
        let (net, prefix) = parse_address(text)?;
        return Some(AddressMatch { net, prefix, negated });
    }
    let prefix = right.get("prefix")?;
    let net: IpAddr = prefix.get("addr")?.as_str()?.parse().ok()?;
    let len = u8::try_from(prefix.get("len")?.as_u64()?).ok()?;
    Some(AddressMatch { net, prefix: len, negated })
}

fn parse_nft_rule(rule: &Value) -> Rule {
    let mut parsed = Rule {
        proto: None,
        ports: Vec::new(),
        daddr: None,
        comment: rule.get("comment").and_then(Value::as_str).map(str::to_owned),
        verdict: Verdict::Other,
    };
    for expr in rule.get("expr").and_then(Value::as_array).into_iter().flatten() {
        if let Some(m) = expr.get("match") {
            let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
            let (Some(left), Some(right)) = (m.get("left"), m.get("right")) else { continue };
            if let Some(payload) = left.get("payload") {
                let protocol = payload.get("protocol").and_then(Value::as_str).unwrap_or("");
                match payload.get("field").and_then(Value::as_str) {
                    Some("dport") if op == "==" || op == "in" => {
                        parsed.proto = Proto::from_name(protocol).or(parsed.proto);
                        parsed.ports = nft_ports(right);
                    }
                    Some("daddr") if protocol == "ip" || protocol == "ip6" => {
                        parsed.daddr = nft_address(right, op == "!=");
                    }
                    _ => {}
                }
            } else if left.get("meta").and_then(|m| m.get("key")).and_then(Value::as_str) == Some("l4proto") {
                if let Some(name) = right.as_str() {
                    parsed.proto = Proto::from_name(name).or(parsed.proto);
                }
            }
        } else if let Some(dnat) = expr.get("dnat") {
            let addr = dnat.get("addr").map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_owned));
            let port = dnat.get("port").map(|p| p.as_u64().map_or_else(|| p.to_string(), |p| p.to_string()));
            parsed.verdict = Verdict::Dnat(match (addr, port) {
                (Some(addr), Some(port)) if addr.contains(':') => format!("[{addr}]:{port}"),
                (Some(addr), Some(port)) => format!("{addr}:{port}"),
                (Some(addr), None) => addr,
                (None, Some(port)) => format!(":{port}"),
                (None, None) => String::new(),
            });
        } else if let Some(redirect) = expr.get("redirect") {
            parsed.verdict = Verdict::Redirect(redirect.get("port").map(|p| p.to_string()));
        } else if let Some(target) = expr.get("jump").or_else(|| expr.get("goto")) {
            if let Some(chain) = target.get("target").and_then(Value::as_str) {
                parsed.verdict = Verdict::Jump(chain.to_owned());
            }
        }
    }
    parsed
}

fn port_text(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .map(|&(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// Every port claim of a table: the rules reached from its base chains that match a port
/// (or are reached through one that does) and rewrite the destination, or jump to chains that
/// do.
fn claims_of(table: &Table) -> Vec<NatClaim> {
    let mut claims = Vec::new();
    for (base, hook) in &table.bases {
        let mut path = vec![base.clone()];
        walk(table, base, hook, &Context::default(), &mut path, &mut claims);
    }
    claims
}

/// What the rules on the way into a chain required: the port match (with its chain path and
/// comment) and the address conditions.
#[derive(Clone, Default)]
struct Context {
    proto: Option<Proto>,
    ports: Vec<(u16, u16)>,
    daddr: Option<AddressMatch>,
    comment: Option<String>,
    chains: Vec<String>,
}

fn walk(
    table: &Table,
    chain: &str,
    hook: &'static str,
    context: &Context,
    path: &mut Vec<String>,
    claims: &mut Vec<NatClaim>,
) {
    let Some(rules) = table.chains.get(chain) else { return };
    for rule in rules {
        let mut here = context.clone();
        if rule.proto.is_some() {
            here.proto = rule.proto;
        }
        if rule.daddr.is_some() {
            here.daddr.clone_from(&rule.daddr);
        }
        if !rule.ports.is_empty() {
            here.ports.clone_from(&rule.ports);
            here.chains.clone_from(path);
            // The comment of the rule that matched the port names what it is for.
            if rule.comment.is_some() {
                here.comment.clone_from(&rule.comment);
            }
        } else if here.ports.is_empty() {
            here.comment = None;
        }
        match &rule.verdict {
            Verdict::Dnat(_) | Verdict::Redirect(_) if !here.ports.is_empty() => {
                push_claims(claims, table, hook, &here, vec![destination(&rule.verdict)]);
            }
            Verdict::Jump(next) if path.len() < DEPTH_MAX && !path.contains(next) => {
                path.push(next.clone());
                let mut found = Vec::new();
                if !here.ports.is_empty() {
                    // The port was matched: the destinations are whatever the chains below
                    // rewrite it to.
                    destinations_below(table, next, path, &mut found);
                }
                if found.is_empty() {
                    walk(table, next, hook, &here, path, claims);
                } else {
                    push_claims(claims, table, hook, &here, found);
                }
                path.pop();
            }
            _ => {}
        }
    }
}

fn destination(verdict: &Verdict) -> Option<String> {
    match verdict {
        Verdict::Dnat(to) if !to.is_empty() => Some(to.clone()),
        Verdict::Dnat(_) => None,
        Verdict::Redirect(port) => {
            Some(port.as_ref().map_or_else(|| "this host".to_owned(), |p| format!("port {p} of this host")))
        }
        _ => None,
    }
}

/// The destinations of the DNAT/REDIRECT rules below `chain` (through jumps), for a port
/// matched above it. `None` entries are rewrites whose destination could not be read.
fn destinations_below(table: &Table, chain: &str, path: &mut Vec<String>, found: &mut Vec<Option<String>>) {
    let Some(rules) = table.chains.get(chain) else { return };
    for rule in rules {
        match &rule.verdict {
            Verdict::Dnat(_) | Verdict::Redirect(_) => found.push(destination(&rule.verdict)),
            Verdict::Jump(next) if path.len() < DEPTH_MAX && !path.contains(next) => {
                path.push(next.clone());
                destinations_below(table, next, path, found);
                path.pop();
            }
            _ => {}
        }
    }
}

fn push_claims(claims: &mut Vec<NatClaim>, table: &Table, hook: &'static str, m: &Context, found: Vec<Option<String>>) {
    let mut seen = HashSet::new();
    let to: Vec<String> = found.into_iter().flatten().filter(|t| seen.insert(t.clone())).collect();
    let truncated = to.len() > DESTINATIONS_MAX;
    claims.push(NatClaim {
        table: table.name.clone(),
        family: table.family,
        chains: m.chains.clone(),
        hook,
        proto: m.proto,
        ports: port_text(&m.ports),
        daddr: m.daddr.clone(),
        to: to.into_iter().take(DESTINATIONS_MAX).collect(),
        to_truncated: truncated,
        comment: m.comment.clone(),
        containers: Vec::new(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 10.213.0.0/24 ! -o bt-nat0 -j MASQUERADE
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 18777 -j DNAT --to-destination 10.213.0.2:80
COMMIT
";

    const KUBE_PROXY: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-EXT-ABC - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-1 - [0:0]
:KUBE-SEP-2 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment \"shop/web:http\" -m tcp --dport 30080 -j KUBE-EXT-ABC
-A KUBE-EXT-ABC -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -m statistic --mode random --probability 0.5 -j KUBE-SEP-1
-A KUBE-SVC-ABC -j KUBE-SEP-2
-A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination 10.244.2.7:8080
COMMIT
";

    #[test]
    fn docker_without_its_userland_proxy() {
        let table = parse_save(DOCKER, "iptables nat", "ipv4").expect("a table");
        let claims = claims_of(&table);
        let rules = NatRules { claims, ..NatRules::default() };
        let found = rules.on_port(Proto::Tcp, 18777, None, false);
        assert_eq!(found.len(), 2, "from other hosts and from this one: {found:?}");
        assert!(found
            .iter()
            .all(|c| c.to == ["10.213.0.2:80"] && c.chains == ["PREROUTING", "DOCKER"]
                || c.chains == ["OUTPUT", "DOCKER"]));
        let output = found.iter().find(|c| c.hook == "output").expect("output");
        // OUTPUT skips 127.0.0.0/8: a bind to 127.0.0.1 sees this host's own connections.
        assert!(rules.on_port(Proto::Tcp, 18777, Some("127.0.0.1".parse().expect("ip")), false).is_empty());
        // An IPv6-only socket does not get IPv4 traffic.
        assert!(rules.on_port(Proto::Tcp, 18777, Some("::".parse().expect("ip")), true).is_empty());
        assert_eq!(rules.on_port(Proto::Tcp, 18777, Some("::".parse().expect("ip")), false).len(), 2);
        assert!(
            output
                .describe()
                .contains("sends tcp port 18777 to any address but 127.0.0.0/8 from this host to 10.213.0.2:80"),
            "{}",
            output.describe()
        );
        assert!(rules.on_port(Proto::Udp, 18777, None, false).is_empty());
        assert!(rules.on_port(Proto::Tcp, 18778, None, false).is_empty());
    }

    #[test]
    fn kube_proxy_nodeports_name_the_service_and_its_endpoints() {
        let table = parse_save(KUBE_PROXY, "iptables nat", "ipv4").expect("a table");
        let rules = NatRules { claims: claims_of(&table), ..NatRules::default() };
        let found = rules.on_port(Proto::Tcp, 30080, None, false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].comment.as_deref(), Some("shop/web:http"));
        assert_eq!(found[0].to, ["10.244.1.5:8080", "10.244.2.7:8080"]);
        assert_eq!(found[0].chains, ["PREROUTING", "KUBE-SERVICES", "KUBE-NODEPORTS"]);
    }

    #[test]
    fn native_nftables_rules() {
        let json: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"ip","name":"nat","handle":1}},
            {"chain":{"family":"ip","table":"nat","name":"PREROUTING","handle":5,"type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
            {"rule":{"family":"ip","table":"nat","chain":"PREROUTING","handle":9,"expr":[{"xt":{"type":"target","name":"DNAT"}}]}},
            {"table":{"family":"ip","name":"filter","handle":3}},
            {"chain":{"family":"ip","table":"filter","name":"FORWARD","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"accept"}},
            {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":2,"expr":[{"xt":{"type":"match","name":"conntrack"}},{"xt":{"type":"target","name":"LOG"}}]}},
            {"table":{"family":"ip","name":"hostports","handle":2}},
            {"chain":{"family":"ip","table":"hostports","name":"pre","handle":1,"type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}},
            {"chain":{"family":"ip","table":"hostports","name":"pods","handle":2}},
            {"rule":{"family":"ip","table":"hostports","chain":"pre","handle":3,"comment":"hostPort web","expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":{"set":[8443,{"range":[9000,9010]}]}}},
              {"jump":{"target":"pods"}}]}},
            {"rule":{"family":"ip","table":"hostports","chain":"pods","handle":4,"expr":[
              {"dnat":{"family":"ip","addr":"10.88.0.9","port":443}}]}},
            {"rule":{"family":"ip","table":"hostports","chain":"pre","handle":5,"expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"192.0.2.1"}},
              {"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":53}},
              {"redirect":{"port":5353}}]}}
            ]}"#,
        )
        .expect("json");
        let mut unread = Vec::new();
        let tables = parse_nft(&json, &["ip"], &mut unread);
        assert_eq!(tables.len(), 1, "the iptables-nft table is read from iptables-nft-save");
        assert!(unread.is_empty(), "a filter table's iptables target cannot rewrite a port: {unread:?}");
        let local = vec!["192.0.2.1".parse().expect("ip")];
        let rules = NatRules { claims: tables.iter().flat_map(claims_of).collect(), local, ..NatRules::default() };
        let web = rules.on_port(Proto::Tcp, 9005, None, false);
        assert_eq!(web.len(), 1, "{:?}", rules.claims);
        assert_eq!(web[0].to, ["10.88.0.9:443"]);
        assert_eq!(web[0].comment.as_deref(), Some("hostPort web"));
        assert_eq!(web[0].ports, "8443,9000-9010");
        let dns = rules.on_port(Proto::Udp, 53, Some("192.0.2.1".parse().expect("ip")), false);
        assert_eq!(dns.len(), 1);
        assert_eq!(dns[0].to, ["port 5353 of this host"]);
        assert!(rules.on_port(Proto::Udp, 53, Some("192.0.2.2".parse().expect("ip")), false).is_empty());
        // A wildcard bind: the rule is for a local address, so it applies.
        assert_eq!(rules.on_port(Proto::Udp, 53, None, false).len(), 1);
        // Redirected to the same port of this host: the socket still gets it.
        assert!(rules.on_port(Proto::Udp, 5353, None, false).is_empty());
    }

    #[test]
    fn quoted_words_and_masks() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b\"c" -j Y"#),
            ["-A", "X", "-m", "comment", "--comment", "a b\"c", "-j", "Y"]
        );
        assert_eq!(parse_address("10.0.0.0/255.255.0.0"), Some(("10.0.0.0".parse().expect("ip"), 16)));
        assert_eq!(parse_ports("80,8000:8080"), vec![(80, 80), (8000, 8080)]);
    }
}
