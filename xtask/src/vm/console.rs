//! Cutting a guest's console into what each run printed between the init's `@@` markers.

use serde_json::Value;

/// One backend's run, cut out of the console output.
#[derive(Default)]
pub(super) struct GuestRun {
    pub(super) backend: String,
    pub(super) exit: String,
    pub(super) stderr: Vec<String>,
    pub(super) events: Vec<Value>,
    pub(super) scenarios: Vec<Value>,
    /// The `--cgroup /bt-scope` run: its exit, and its NDJSON records and stderr lines.
    pub(super) scope_exit: String,
    pub(super) scope: Vec<Value>,
    pub(super) scope_stderr: Vec<String>,
    /// The `-- CMD` run: its exit, and its NDJSON records and stderr lines.
    pub(super) tree_exit: String,
    pub(super) tree: Vec<Value>,
    pub(super) tree_stderr: Vec<String>,
    /// `bind-scenarios --count` of the colliding threads' run, when it ran.
    pub(super) collision: Option<Value>,
    /// The same for the sleeping binds' run.
    pub(super) sleepers: Option<Value>,
}

/// What the guest's `bindtrace --check` and `--attach auto` runs said.
#[derive(Default)]
pub(super) struct GuestChecks {
    pub(super) check_lines: Vec<String>,
    pub(super) check_exit: String,
    pub(super) auto_exit: String,
    /// The backend the auto run's summary names.
    pub(super) auto_backend: Option<String>,
    pub(super) auto_output: Vec<String>,
}

impl GuestChecks {
    /// What `--check` said of a backend: `Some(Ok)` yes, `Some(Err(reason))` no.
    pub(super) fn hook(&self, backend: &str) -> Option<std::result::Result<(), String>> {
        let prefix = format!("hook {backend}: ");
        let answer = self.check_lines.iter().find_map(|l| l.strip_prefix(&prefix))?;
        Some(if answer == "yes" { Ok(()) } else { Err(answer.trim_start_matches("no: ").to_owned()) })
    }
}

pub(super) fn parse_checks(console: &str) -> GuestChecks {
    let mut checks = GuestChecks::default();
    let mut section = "";
    for line in console.lines().filter(|l| !is_stamp(l)) {
        if line == "@@CHECK" {
            section = "check";
        } else if let Some(exit) = line.strip_prefix("@@CHECK_EXIT ") {
            checks.check_exit = exit.trim().to_owned();
            section = "";
        } else if let Some(exit) = line.strip_prefix("@@AUTO ") {
            checks.auto_exit = exit.trim().to_owned();
            section = "auto";
        } else if line.starts_with("@@") {
            if section == "auto" {
                break;
            }
            section = "";
        } else if section == "check" {
            checks.check_lines.push(line.to_owned());
        } else if section == "auto" {
            let summary = serde_json::from_str::<Value>(line).ok().filter(|v| v["type"] == "summary");
            if let Some(backend) = summary.as_ref().and_then(|v| v["backend"].as_str()) {
                checks.auto_backend = Some(backend.to_owned());
            }
            checks.auto_output.push(line.to_owned());
        }
    }
    checks
}

pub(super) fn parse_console(console: &str) -> Vec<GuestRun> {
    let mut runs = Vec::new();
    let mut section = "";
    for line in console.lines().filter(|l| !is_stamp(l)) {
        if let Some(rest) = line.strip_prefix("@@BACKEND ") {
            let mut words = rest.split_whitespace();
            runs.push(GuestRun {
                backend: words.next().unwrap_or("?").to_owned(),
                exit: words.next().unwrap_or("").to_owned(),
                ..GuestRun::default()
            });
            section = "";
        } else if let Some(exit) = line.strip_prefix("@@TREE ") {
            if let Some(current) = runs.last_mut() {
                current.tree_exit = exit.trim().to_owned();
            }
            section = "tree";
        } else if let Some(exit) = line.strip_prefix("@@SCOPE ") {
            if let Some(current) = runs.last_mut() {
                current.scope_exit = exit.trim().to_owned();
            }
            section = "scope";
        } else if let Some(marker) = line.strip_prefix("@@") {
            section = match marker {
                "STDERR" => "stderr",
                "EVENTS" => "events",
                "SCENARIOS" => "scenarios",
                "COLLISION" => "collision",
                "SLEEPERS" => "sleepers",
                _ => "",
            };
        } else if let Some(current) = runs.last_mut() {
            match section {
                "stderr" => current.stderr.push(line.to_owned()),
                "events" => current.events.extend(serde_json::from_str::<Value>(line).ok()),
                "scenarios" => current.scenarios.extend(serde_json::from_str::<Value>(line).ok()),
                "collision" | "sleepers" => {
                    if let Ok(counted) = serde_json::from_str::<Value>(line) {
                        *if section == "collision" { &mut current.collision } else { &mut current.sleepers } =
                            Some(counted);
                    }
                }
                "scope" => match serde_json::from_str::<Value>(line) {
                    Ok(record) => current.scope.push(record),
                    Err(_) => current.scope_stderr.push(line.to_owned()),
                },
                "tree" => match serde_json::from_str::<Value>(line) {
                    Ok(record) => current.tree.push(record),
                    Err(_) => current.tree_stderr.push(line.to_owned()),
                },
                _ => {}
            }
        }
    }
    runs
}

/// `@@AT UPTIME STAGE`: the init's time stamps, which cut no section.
fn is_stamp(line: &str) -> bool {
    line.starts_with("@@AT ")
}

/// How long each stage of the init took (from its stamp to the next), and the boot before
/// the first (the guest's uptime then): where a guest's minutes go.
pub(super) fn stages(console: &str) -> Vec<(String, f64)> {
    let stamps: Vec<(f64, &str)> = console
        .lines()
        .filter_map(|l| l.strip_prefix("@@AT "))
        .filter_map(|rest| {
            let (uptime, stage) = rest.split_once(' ')?;
            Some((uptime.parse().ok()?, stage))
        })
        .collect();
    let boot = stamps.first().map(|(at, _)| ("boot".to_owned(), *at));
    boot.into_iter().chain(stamps.windows(2).map(|pair| (pair[0].1.to_owned(), pair[1].0 - pair[0].0))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_tell_each_stage_its_time_and_cut_no_section() {
        let console = "@@BEGIN 6.1\n@@AT 10.5 check\n@@CHECK\nhook kprobe: yes\n@@AT 14.0 check_inner\n@@CHECK_EXIT 0\n@@AT 20.0 end\n@@END\n";
        assert_eq!(
            stages(console),
            vec![("boot".to_owned(), 10.5), ("check".to_owned(), 3.5), ("check_inner".to_owned(), 6.0)]
        );
        let checks = parse_checks(console);
        assert_eq!((checks.check_lines.len(), checks.check_exit.as_str()), (1, "0"));
        let console = "@@BACKEND kprobe exit=0\n@@EVENTS\n{\"type\":\"bind\"}\n@@AT 3.0 kprobe cgroup_scope\n{\"type\":\"bind\"}\n";
        assert_eq!(parse_console(console)[0].events.len(), 2);
    }
}
