//! bindtrace's own capabilities, read once from /proc/self/status: what loading the probe
//! needs, and what the lookups behind a diagnosis can see without them.

use std::sync::OnceLock;

/// The capabilities bindtrace asks about (numbers from linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Capability {
    /// Reading tracefs (mode 0700) and other users' /proc/PID/fd directories.
    DacReadSearch = 2,
    /// Reading other users' /proc/PID/fd links and /proc/PID/ns files.
    SysPtrace = 19,
    /// Entering other network namespaces (setns), mounting tracefs; implies the others for
    /// loading BPF on kernels before 5.8.
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Capability {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }
}

/// The effective set, or `None` when /proc/self/status could not be read.
fn effective() -> Option<u64> {
    static EFFECTIVE: OnceLock<Option<u64>> = OnceLock::new();
    *EFFECTIVE.get_or_init(|| procfs::process::Process::myself().and_then(|p| p.status()).ok().map(|s| s.capeff))
}

/// Is `cap` in bindtrace's effective set? `None` when that could not be read.
pub(crate) fn has(cap: Capability) -> Option<bool> {
    effective().map(|set| set & (1 << cap as u64) != 0)
}

/// Can bindtrace load and attach the probe: CAP_BPF plus CAP_PERFMON, or CAP_SYS_ADMIN?
pub(crate) fn check_can_load() -> anyhow::Result<()> {
    let Some(set) = effective() else {
        anyhow::bail!("cannot read /proc/self/status to check bindtrace's capabilities")
    };
    let has = |cap: Capability| set & (1 << cap as u64) != 0;
    if has(Capability::SysAdmin) || (has(Capability::Bpf) && has(Capability::Perfmon)) {
        Ok(())
    } else {
        anyhow::bail!("loading the probe needs root (CAP_BPF and CAP_PERFMON): run it with sudo")
    }
}

/// One line for each class of lookup bindtrace's capabilities keep it from, said once at
/// start so that a holder shown without a process is never read as "no process".
pub(crate) fn lookup_limits() -> Vec<String> {
    let missing = |caps: &[Capability]| -> Vec<&'static str> {
        caps.iter().filter(|&&cap| has(cap) == Some(false)).map(|cap| cap.name()).collect()
    };
    let mut limits = Vec::new();
    let proc_caps = missing(&[Capability::SysPtrace, Capability::DacReadSearch]);
    if !proc_caps.is_empty() {
        limits.push(format!(
            "without {}, processes of other users that hold a port cannot be named",
            proc_caps.join(" and ")
        ));
    }
    if has(Capability::SysAdmin) == Some(false) {
        limits.push(
            "without CAP_SYS_ADMIN, failures in other network namespaces (containers) cannot be diagnosed".to_owned(),
        );
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_limits_name_exactly_the_missing_capabilities() {
        let lookups = [Capability::SysPtrace, Capability::DacReadSearch, Capability::SysAdmin];
        let all = lookups.iter().all(|&cap| has(cap) == Some(true));
        let limits = lookup_limits();
        assert_eq!(limits.is_empty(), all, "{limits:?}");
        for cap in lookups {
            let named = limits.iter().any(|line| line.contains(cap.name()));
            assert_eq!(named, has(cap) == Some(false), "{}: {limits:?}", cap.name());
        }
        assert_eq!(
            check_can_load().is_ok(),
            has(Capability::SysAdmin) == Some(true)
                || (has(Capability::Bpf) == Some(true) && has(Capability::Perfmon) == Some(true))
        );
    }
}
