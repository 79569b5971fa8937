//! Names of the maps, globals and programs in the probe object, used by the loader to find
//! them.

pub const EVENTS: &str = "EVENTS";
pub const INET_BIND_ARGS: &str = "INET_BIND_ARGS";
pub const THREAD_ENTRIES: &str = "THREAD_ENTRIES";
pub const ATTACH_STATE: &str = "ATTACH_STATE";
pub const STATS: &str = "STATS";
pub const FILTER_PIDS: &str = "FILTER_PIDS";
pub const SELECTED_CGROUPS: &str = "SELECTED_CGROUPS";
pub const FOLLOWED: &str = "FOLLOWED";
/// The process-tree programs (`bindtrace -- CMD`, `--tree PID`) on `sched:` tracepoints.
pub const PROG_TREE_FORK: &str = "bindtrace_sched_process_fork";
pub const PROG_TREE_EXIT: &str = "bindtrace_sched_process_exit";
pub const PROG_TREE_EXEC: &str = "bindtrace_sched_process_exec";
pub const CONFIG: &str = "BINDTRACE_CONFIG";
pub const PROG_ENTER_BIND: &str = "bindtrace_sys_enter_bind";
pub const PROG_EXIT_BIND: &str = "bindtrace_sys_exit_bind";
pub const PROG_KPROBE_INET_BIND: &str = "bindtrace_kprobe_inet_bind";
pub const PROG_KRETPROBE_INET_BIND: &str = "bindtrace_kretprobe_inet_bind";
/// The fexit backend: a program pair per inet_bind function.
pub const PROG_FENTRY_INET_BIND: &str = "bindtrace_fentry_inet_bind";
pub const PROG_FEXIT_INET_BIND: &str = "bindtrace_fexit_inet_bind";
pub const PROG_FENTRY_INET6_BIND: &str = "bindtrace_fentry_inet6_bind";
pub const PROG_FEXIT_INET6_BIND: &str = "bindtrace_fexit_inet6_bind";
/// The kernel functions the inet_bind backends hook.
pub const INET_BIND_FUNCTIONS: [&str; 2] = ["inet_bind", "inet6_bind"];
/// What every bind(2) goes through, whatever the family and the outcome (compat and
/// socketcall callers too): the fexit and kprobe backends hook it as well, and the
/// inet_bind hooks then report only binds that do not come through it (io_uring's, the
/// kernel's own).
pub const SYSCALL_BIND_FUNCTION: &str = "__sys_bind";
pub const PROG_FENTRY_SYS_BIND: &str = "bindtrace_fentry_sys_bind";
pub const PROG_FEXIT_SYS_BIND: &str = "bindtrace_fexit_sys_bind";
pub const PROG_KPROBE_SYS_BIND: &str = "bindtrace_kprobe_sys_bind";
pub const PROG_KRETPROBE_SYS_BIND: &str = "bindtrace_kretprobe_sys_bind";
/// listen(2): the failures are traced too (`op::LISTEN`).
pub const SYSCALL_LISTEN_FUNCTION: &str = "__sys_listen";
pub const PROG_ENTER_LISTEN: &str = "bindtrace_sys_enter_listen";
pub const PROG_EXIT_LISTEN: &str = "bindtrace_sys_exit_listen";
pub const PROG_FENTRY_SYS_LISTEN: &str = "bindtrace_fentry_sys_listen";
pub const PROG_FEXIT_SYS_LISTEN: &str = "bindtrace_fexit_sys_listen";
pub const PROG_KPROBE_SYS_LISTEN: &str = "bindtrace_kprobe_sys_listen";
pub const PROG_KRETPROBE_SYS_LISTEN: &str = "bindtrace_kretprobe_sys_listen";
/// The kprobe backend's backstops: bind(2)'s and listen(2)'s exit tracepoints, which
/// report a call whose kretprobe the kernel skipped.
pub const PROG_BACKSTOP_BIND: &str = "bindtrace_sys_exit_bind_backstop";
pub const PROG_BACKSTOP_LISTEN: &str = "bindtrace_sys_exit_listen_backstop";
