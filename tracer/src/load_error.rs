//! Turns the kernel's refusal of a program (BPF_PROG_LOAD's errno and the verifier's log) into
//! one line that names the cause: the verifier writes the trace of its walk first and the
//! reason last, and names a helper it does not know only by number.

use aya::programs::ProgramError;

/// BPF helpers the probe (and aya-log) may call, by the number the verifier prints, with the
/// first Linux release that has each. Numbers are UAPI (`enum bpf_func_id`).
const HELPERS: [(u32, &str, &str); 19] = [
    (1, "bpf_map_lookup_elem", "3.19"),
    (2, "bpf_map_update_elem", "3.19"),
    (3, "bpf_map_delete_elem", "3.19"),
    (5, "bpf_ktime_get_ns", "4.1"),
    (14, "bpf_get_current_pid_tgid", "4.2"),
    (15, "bpf_get_current_uid_gid", "4.2"),
    (16, "bpf_get_current_comm", "4.2"),
    (25, "bpf_perf_event_output", "4.4"),
    (35, "bpf_get_current_task", "4.8"),
    (80, "bpf_get_current_cgroup_id", "4.18"),
    (112, "bpf_probe_read_user", "5.5"),
    (113, "bpf_probe_read_kernel", "5.5"),
    (123, "bpf_get_current_ancestor_cgroup_id", "5.14 (in tracing programs)"),
    (130, "bpf_ringbuf_output", "5.8"),
    (131, "bpf_ringbuf_reserve", "5.8"),
    (132, "bpf_ringbuf_submit", "5.8"),
    (134, "bpf_ringbuf_query", "5.8"),
    (158, "bpf_get_current_task_btf", "5.11"),
    (175, "bpf_task_pt_regs", "5.15"),
];

/// The verifier's reason, in words, from its log: a helper it does not have, named with the
/// release that added it; otherwise the last line that is not a statistic.
pub(crate) fn cause_of(log: &str) -> Option<String> {
    if let Some(id) = log.lines().find_map(unknown_helper_id) {
        return Some(match HELPERS.iter().find(|(number, ..)| *number == id) {
            Some((_, name, since)) => {
                format!("this kernel lacks the BPF helper {name} (helper {id}, in Linux {since} and later)")
            }
            None => format!("this kernel lacks BPF helper {id}"),
        });
    }
    log.lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty() && !is_statistic(line))
        .map(|line| format!("the verifier refused it: {line}"))
}

/// `invalid func unknown#158` (or `unknown func bpf_xxx#158` on some kernels) → 158.
fn unknown_helper_id(line: &str) -> Option<u32> {
    let rest = line
        .strip_prefix("invalid func unknown#")
        .or_else(|| line.strip_prefix("unknown func ").and_then(|r| r.split_once('#')).map(|(_, number)| number))?;
    rest.trim().parse().ok()
}

/// The verifier's closing statistics, which follow the reason.
fn is_statistic(line: &str) -> bool {
    ["processed ", "verification time", "stack depth", "max_states_per_insn", "peak_states", "mark_read"]
        .iter()
        .any(|prefix| line.starts_with(prefix))
}

/// ENOTSUPP, the kernel-internal errno a BPF trampoline attach returns where the
/// architecture or the kernel's configuration has none (Debian's arm64 6.1); libc has no name
/// for it, and strerror says "Unknown error 524".
const ENOTSUPP: i32 = 524;

/// Replaces a program-load error by one naming its cause, and logs the whole verifier log
/// at debug level; names ENOTSUPP on attach. Other errors pass unchanged.
pub(crate) fn explain(err: anyhow::Error) -> anyhow::Error {
    let os_error = |e: &(dyn std::error::Error + 'static)| e.downcast_ref::<std::io::Error>()?.raw_os_error();
    if err.chain().any(|e| os_error(e) == Some(ENOTSUPP)) {
        return anyhow::anyhow!(
            "{err}: this kernel cannot attach BPF trampolines here (ENOTSUPP, 524: no fentry/fexit support for \
             this architecture or kernel configuration)"
        );
    }
    let Some(ProgramError::LoadError { io_error, verifier_log }) = err.chain().find_map(|e| e.downcast_ref()) else {
        return err;
    };
    let log = format!("{verifier_log:?}");
    log::debug!("verifier log:\n{log}");
    let cause = cause_of(&log).unwrap_or_else(|| format!("BPF_PROG_LOAD failed: {io_error}"));
    // The context the caller added ("loading the sys_exit_bind program failed") stays first.
    let context = err.to_string();
    anyhow::anyhow!("{context}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_helper_is_named_with_its_release() {
        let log = "arg#0 type is not a struct\nUnrecognized arg#0 type PTR\n; let task = ...\n0: (85) call unknown#158\ninvalid func unknown#158\nprocessed 12 insns (limit 1000000)\n";
        assert_eq!(
            cause_of(log).as_deref(),
            Some("this kernel lacks the BPF helper bpf_get_current_task_btf (helper 158, in Linux 5.11 and later)")
        );
        assert_eq!(cause_of("invalid func unknown#9999").as_deref(), Some("this kernel lacks BPF helper 9999"));
    }

    #[test]
    fn enotsupp_on_attach_is_named() {
        let err =
            anyhow::Error::new(std::io::Error::from_raw_os_error(524)).context("attaching fentry to inet_bind failed");
        let explained = explain(err).to_string();
        assert!(explained.starts_with("attaching fentry to inet_bind failed: "), "{explained}");
        assert!(explained.contains("ENOTSUPP, 524"), "{explained}");
        let other = explain(anyhow::anyhow!("something else")).to_string();
        assert_eq!(other, "something else");
    }

    #[test]
    fn otherwise_the_last_line_before_the_statistics_is_the_reason() {
        let log = "arg#0 type is not a struct\n12: (85) call bpf_probe_read_user#112\ninvalid indirect read from stack R1 off -80+8 size 27\nprocessed 40 insns (limit 1000000) max_states_per_insn 0\n\n";
        assert_eq!(
            cause_of(log).as_deref(),
            Some("the verifier refused it: invalid indirect read from stack R1 off -80+8 size 27")
        );
        assert_eq!(cause_of("\n\n"), None);
    }
}
